-- The admin API: zones are archived rather than deleted, and a live application's name is
-- unique in its zone regardless of case.
ALTER TABLE zones ADD COLUMN archived_at_ms {BIGINT};
CREATE UNIQUE INDEX applications_live_name ON applications (zone_id, lower(name))
    WHERE archived_at_ms IS NULL;
