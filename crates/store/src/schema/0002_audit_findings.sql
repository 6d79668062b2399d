-- Tamper findings of the audit sweep, kept until an operator acknowledges them.
CREATE TABLE audit_tamper_findings (
    zone_id TEXT NOT NULL,
    seq {BIGINT} NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    found_at_ms {BIGINT} NOT NULL,
    acknowledged_at_ms {BIGINT},
    acknowledged_by TEXT,
    ack_reason TEXT,
    PRIMARY KEY (zone_id, seq, kind)
);
