-- Objects the published admin client manages that no authorization path reads: federated
-- subject issuers, delegated grants and workloads (launcher identities). `body` is the object
-- as JSON; `unique_key`, when set, is unique among a zone's active objects of a kind (an
-- issuer URL, a workload name).
CREATE TABLE admin_objects (
    zone_id TEXT NOT NULL REFERENCES zones (id),
    kind TEXT NOT NULL CHECK (kind IN ('subject_issuer', 'grant', 'workload')),
    id TEXT NOT NULL,
    unique_key TEXT,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at_ms {BIGINT} NOT NULL,
    updated_at_ms {BIGINT} NOT NULL,
    PRIMARY KEY (zone_id, kind, id)
);
CREATE UNIQUE INDEX admin_objects_live_key ON admin_objects (zone_id, kind, unique_key)
    WHERE status = 'active' AND unique_key IS NOT NULL;
