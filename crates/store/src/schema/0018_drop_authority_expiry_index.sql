-- Every authority record is one of three statuses, so (status, expires_at_ms) serves the
-- retention cut by expiry as well (`status IN (…) AND expires_at_ms < $1`): the index on
-- expires_at_ms alone only cost every mint one more B-tree insert and every commit one more
-- page.
DROP INDEX authority_records_expiry;
