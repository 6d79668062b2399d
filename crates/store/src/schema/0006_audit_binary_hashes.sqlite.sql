-- The chain hashes are stored as 32 raw bytes instead of 64 hex characters (a third less per
-- row); the API, exports and the sweep still speak lower-case hex. SQLite cannot change a
-- column's type, so the table is rebuilt.
CREATE TABLE audit_events_binary (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    request_id TEXT NOT NULL,
    decision TEXT NOT NULL,
    policy_set_id TEXT,
    policy_set_version_id TEXT,
    manifest_sha TEXT,
    evaluation_status TEXT NOT NULL,
    determining_policies TEXT NOT NULL,
    diagnostics TEXT NOT NULL,
    metadata TEXT NOT NULL,
    occurred_at_ms INTEGER NOT NULL,
    ingested_at_ms INTEGER NOT NULL,
    chain_seq INTEGER NOT NULL,
    content_sha256 BLOB NOT NULL,
    prev_content_sha256 BLOB NOT NULL,
    chain_mac BLOB NOT NULL,
    chain_key_id TEXT NOT NULL,
    UNIQUE (zone_id, chain_seq)
);
INSERT INTO audit_events_binary
    SELECT id, zone_id, event_type, request_id, decision, policy_set_id, policy_set_version_id,
           manifest_sha, evaluation_status, determining_policies, diagnostics, metadata,
           occurred_at_ms, ingested_at_ms, chain_seq,
           COALESCE(unhex(content_sha256), CAST(content_sha256 AS BLOB)),
           COALESCE(unhex(prev_content_sha256), CAST(prev_content_sha256 AS BLOB)),
           COALESCE(unhex(chain_mac), CAST(chain_mac AS BLOB)),
           chain_key_id
    FROM audit_events ORDER BY rowid;
DROP TABLE audit_events;
ALTER TABLE audit_events_binary RENAME TO audit_events;
CREATE INDEX audit_events_request ON audit_events (zone_id, request_id);
