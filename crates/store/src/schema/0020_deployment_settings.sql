-- Run-time settings an operator changes through the API (the audit retention), each with who
-- changed it last and when.
CREATE TABLE deployment_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_by TEXT NOT NULL,
    updated_at_ms {BIGINT} NOT NULL
);
