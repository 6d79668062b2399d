-- Ids of the audit chain MAC keys (derived from the KEK by id); the newest is current.
CREATE TABLE audit_chain_keys (
    id TEXT PRIMARY KEY,
    created_at_ms {BIGINT} NOT NULL
);
