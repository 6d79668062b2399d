-- What each STS replica has loaded per zone: the acknowledgement activation status reads.
CREATE TABLE policy_loads (
    zone_id TEXT NOT NULL,
    replica TEXT NOT NULL,
    policy_set_version_id TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('loaded', 'failed')),
    detail TEXT NOT NULL,
    updated_at_ms {BIGINT} NOT NULL,
    PRIMARY KEY (zone_id, replica)
);
