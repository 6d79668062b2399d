-- Approval notification sinks and their deliveries. A sink follows its zone's ledger from
-- `cursor_seq` (the chain sequence it has read up to); each approval event it reads becomes
-- one delivery row, unique per (sink, event), sent until it is delivered or abandoned.
CREATE TABLE notification_sinks (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL REFERENCES zones (id),
    name TEXT NOT NULL,
    url TEXT NOT NULL,
    sealed_secret TEXT NOT NULL,
    event_types TEXT NOT NULL,
    active {BIGINT} NOT NULL,
    cursor_seq {BIGINT} NOT NULL,
    consecutive_failures {BIGINT} NOT NULL DEFAULT 0,
    last_success_at_ms {BIGINT},
    last_failure_at_ms {BIGINT},
    last_error TEXT,
    created_at_ms {BIGINT} NOT NULL,
    updated_at_ms {BIGINT} NOT NULL
);
CREATE INDEX notification_sinks_zone ON notification_sinks (zone_id);
CREATE TABLE notification_deliveries (
    id TEXT PRIMARY KEY,
    sink_id TEXT NOT NULL,
    zone_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    attempts {BIGINT} NOT NULL DEFAULT 0,
    available_at_ms {BIGINT} NOT NULL,
    delivered_at_ms {BIGINT},
    abandoned_at_ms {BIGINT},
    response_status {BIGINT},
    last_error TEXT,
    created_at_ms {BIGINT} NOT NULL,
    UNIQUE (sink_id, event_id)
);
CREATE INDEX notification_deliveries_due ON notification_deliveries (available_at_ms)
    WHERE delivered_at_ms IS NULL AND abandoned_at_ms IS NULL;
CREATE INDEX notification_deliveries_sink ON notification_deliveries (sink_id, created_at_ms);
