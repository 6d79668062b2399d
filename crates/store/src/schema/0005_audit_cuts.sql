-- Retention cuts: per zone, the rows 1..=cut_seq were dropped. The next row links to
-- last_content_sha256; frontier (comma-separated hex) stands in for the dropped Merkle leaves;
-- cut_mac (under chain_key_id) makes a forged cut detectable.
CREATE TABLE audit_cuts (
    zone_id TEXT PRIMARY KEY,
    cut_seq {BIGINT} NOT NULL,
    last_content_sha256 TEXT NOT NULL,
    frontier TEXT NOT NULL,
    cut_at_ms {BIGINT} NOT NULL,
    chain_key_id TEXT NOT NULL,
    cut_mac TEXT NOT NULL
);
