-- Incident containment switches: `freeze` (deployment-wide: risky changes refused) and
-- `fail_closed` (zone_id '' for the deployment, or one zone: protected traffic refused).
CREATE TABLE containment (
    kind TEXT NOT NULL CHECK (kind IN ('freeze', 'fail_closed')),
    zone_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    since_ms {BIGINT} NOT NULL,
    PRIMARY KEY (kind, zone_id)
);
