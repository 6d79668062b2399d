-- Tables shared by both backends, written once. `{BIGINT}` and `{SERIAL}` are replaced per
-- dialect; every time is milliseconds since the epoch; JSON documents are text.
CREATE TABLE deployment (
    singleton {BIGINT} PRIMARY KEY CHECK (singleton = 1),
    kek_id TEXT NOT NULL,
    kek_check TEXT NOT NULL,
    created_at_ms {BIGINT} NOT NULL
);
CREATE TABLE admin_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL CHECK (scope IN ('global', 'zone')),
    zone_id TEXT,
    capabilities TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at_ms {BIGINT} NOT NULL,
    last_used_at_ms {BIGINT},
    revoked_at_ms {BIGINT},
    CHECK ((scope = 'global') = (zone_id IS NULL))
);
CREATE TABLE zones (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    slug TEXT NOT NULL UNIQUE,
    created_at_ms {BIGINT} NOT NULL
);
CREATE TABLE outbox (
    id {SERIAL},
    stream TEXT NOT NULL,
    fields TEXT NOT NULL,
    dedupe_key TEXT,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'published', 'dead')),
    attempts {BIGINT} NOT NULL DEFAULT 0,
    available_at_ms {BIGINT} NOT NULL,
    locked_by TEXT,
    locked_until_ms {BIGINT},
    last_error TEXT,
    created_at_ms {BIGINT} NOT NULL,
    published_at_ms {BIGINT}
);
CREATE INDEX outbox_publishable ON outbox (status, available_at_ms);
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_ms {BIGINT} NOT NULL
);
CREATE TABLE applications (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL REFERENCES zones (id),
    name TEXT NOT NULL,
    client_secret_hash TEXT,
    traits TEXT NOT NULL,
    registration_method TEXT NOT NULL CHECK (registration_method IN ('managed', 'dcr')),
    expires_at_ms {BIGINT},
    created_at_ms {BIGINT} NOT NULL,
    archived_at_ms {BIGINT}
);
CREATE INDEX applications_zone ON applications (zone_id);
CREATE TABLE providers (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL REFERENCES zones (id),
    name TEXT NOT NULL,
    identifier TEXT NOT NULL,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,
    secret_refs TEXT NOT NULL,
    created_at_ms {BIGINT} NOT NULL,
    archived_at_ms {BIGINT},
    UNIQUE (zone_id, identifier)
);
CREATE TABLE resources (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL REFERENCES zones (id),
    name TEXT NOT NULL,
    identifier TEXT NOT NULL,
    upstream_url TEXT NOT NULL,
    provider_id TEXT NOT NULL REFERENCES providers (id),
    scopes TEXT NOT NULL,
    operations TEXT NOT NULL,
    operation_enforcement TEXT NOT NULL CHECK (operation_enforcement IN ('enforced', 'transport_uniform')),
    created_at_ms {BIGINT} NOT NULL,
    archived_at_ms {BIGINT},
    UNIQUE (zone_id, identifier)
);
CREATE TABLE provider_connections (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL REFERENCES zones (id),
    subject_id TEXT NOT NULL,
    provider_id TEXT NOT NULL REFERENCES providers (id),
    status TEXT NOT NULL,
    access_token_ref TEXT,
    refresh_token_ref TEXT,
    expires_at_ms {BIGINT},
    refreshed_at_ms {BIGINT},
    created_at_ms {BIGINT} NOT NULL,
    UNIQUE (zone_id, subject_id, provider_id)
);
CREATE TABLE sealed_secrets (
    zone_id TEXT NOT NULL,
    secret_ref TEXT NOT NULL,
    purpose TEXT NOT NULL,
    kek_id TEXT NOT NULL,
    envelope TEXT NOT NULL,
    version {BIGINT} NOT NULL,
    updated_at_ms {BIGINT} NOT NULL,
    PRIMARY KEY (zone_id, secret_ref)
);
CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL REFERENCES zones (id),
    algorithm TEXT NOT NULL,
    public_jwk TEXT NOT NULL,
    private_envelope TEXT NOT NULL,
    kek_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'active', 'retiring', 'retired')),
    created_at_ms {BIGINT} NOT NULL,
    activated_at_ms {BIGINT},
    retired_at_ms {BIGINT}
);
CREATE INDEX signing_keys_zone ON signing_keys (zone_id);
CREATE TABLE policies (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL REFERENCES zones (id),
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at_ms {BIGINT} NOT NULL,
    archived_at_ms {BIGINT},
    UNIQUE (zone_id, name)
);
CREATE TABLE policy_versions (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL,
    policy_id TEXT NOT NULL REFERENCES policies (id),
    version {BIGINT} NOT NULL,
    content TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    created_at_ms {BIGINT} NOT NULL,
    UNIQUE (policy_id, version)
);
CREATE TABLE policy_sets (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL REFERENCES zones (id),
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at_ms {BIGINT} NOT NULL,
    archived_at_ms {BIGINT},
    UNIQUE (zone_id, name)
);
CREATE TABLE policy_set_versions (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL,
    policy_set_id TEXT NOT NULL REFERENCES policy_sets (id),
    version {BIGINT} NOT NULL,
    manifest TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    created_at_ms {BIGINT} NOT NULL,
    UNIQUE (policy_set_id, version)
);
CREATE TABLE policy_bindings (
    zone_id TEXT PRIMARY KEY REFERENCES zones (id),
    policy_set_id TEXT NOT NULL REFERENCES policy_sets (id),
    active_version_id TEXT NOT NULL REFERENCES policy_set_versions (id),
    previous_version_id TEXT REFERENCES policy_set_versions (id),
    activated_at_ms {BIGINT} NOT NULL
);
CREATE TABLE authority_records (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL,
    session_type TEXT NOT NULL CHECK (session_type IN ('user', 'application')),
    subject_id TEXT NOT NULL,
    parent_id TEXT,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked', 'expired')),
    claims TEXT NOT NULL,
    expires_at_ms {BIGINT} NOT NULL,
    authenticated_at_ms {BIGINT} NOT NULL,
    created_at_ms {BIGINT} NOT NULL,
    revoked_at_ms {BIGINT},
    revoked_reason TEXT
);
CREATE INDEX authority_records_subject ON authority_records (zone_id, subject_id);
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL,
    application_id TEXT NOT NULL,
    parent_id TEXT,
    authority_record_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'terminated', 'expired')),
    lifecycle TEXT NOT NULL CHECK (lifecycle IN ('task', 'service')),
    depth {BIGINT} NOT NULL,
    labels TEXT NOT NULL,
    metadata TEXT NOT NULL,
    ttl_seconds {BIGINT},
    lease_generation {BIGINT} NOT NULL,
    heartbeat_deadline_ms {BIGINT},
    started_at_ms {BIGINT} NOT NULL,
    last_active_ms {BIGINT} NOT NULL,
    terminated_at_ms {BIGINT},
    termination_reason TEXT
);
CREATE INDEX sessions_zone_parent ON sessions (zone_id, parent_id);
CREATE TABLE delegation_edges (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL,
    source_session_id TEXT NOT NULL,
    target_session_id TEXT NOT NULL,
    issuer_application_id TEXT NOT NULL,
    receiver_application_id TEXT NOT NULL,
    parent_edge_id TEXT,
    resource_id TEXT,
    scopes TEXT NOT NULL,
    constraints TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked', 'expired')),
    expires_at_ms {BIGINT},
    created_at_ms {BIGINT} NOT NULL,
    revoked_at_ms {BIGINT},
    CHECK (source_session_id <> target_session_id)
);
CREATE INDEX delegation_edges_source ON delegation_edges (zone_id, source_session_id);
CREATE INDEX delegation_edges_target ON delegation_edges (zone_id, target_session_id);
CREATE TABLE zone_graph_epochs (
    zone_id TEXT PRIMARY KEY,
    epoch {BIGINT} NOT NULL
);
CREATE TABLE approval_holds (
    id TEXT PRIMARY KEY,
    zone_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    principal_id TEXT NOT NULL,
    application_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    approver_class TEXT NOT NULL,
    binding_hash TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at_ms {BIGINT} NOT NULL,
    expires_at_ms {BIGINT} NOT NULL,
    decision TEXT CHECK (decision IN ('approved', 'rejected')),
    decided_at_ms {BIGINT},
    decision_reason TEXT,
    approver_id TEXT,
    consumed_at_ms {BIGINT}
);
CREATE INDEX approval_holds_zone ON approval_holds (zone_id, decision);
CREATE TABLE idempotency_receipts (
    operation TEXT NOT NULL,
    zone_id TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    key_digest TEXT NOT NULL,
    request_digest TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    response_status {BIGINT} NOT NULL,
    response_json TEXT NOT NULL,
    expires_at_ms {BIGINT} NOT NULL,
    PRIMARY KEY (operation, zone_id, scope_id, key_digest)
);
CREATE TABLE audit_events (
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
    occurred_at_ms {BIGINT} NOT NULL,
    ingested_at_ms {BIGINT} NOT NULL,
    chain_seq {BIGINT} NOT NULL,
    content_sha256 TEXT NOT NULL,
    prev_content_sha256 TEXT NOT NULL,
    chain_mac TEXT NOT NULL,
    chain_key_id TEXT NOT NULL,
    UNIQUE (zone_id, chain_seq)
);
CREATE INDEX audit_events_request ON audit_events (zone_id, request_id);
