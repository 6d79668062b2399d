-- Whether a zone accepts dynamic client registration (short-lived `dcr` applications).
ALTER TABLE zones ADD COLUMN dcr_enabled {BIGINT} NOT NULL DEFAULT 0;
