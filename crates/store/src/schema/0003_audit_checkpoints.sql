-- Signed checkpoints of each zone's audit chain, and the public keys that verify them.
CREATE TABLE audit_checkpoints (
    zone_id TEXT NOT NULL,
    tree_size {BIGINT} NOT NULL,
    root_hash TEXT NOT NULL,
    issued_at_ms {BIGINT} NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (zone_id, tree_size)
);
CREATE TABLE audit_checkpoint_keys (
    key_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    created_at_ms {BIGINT} NOT NULL
);
