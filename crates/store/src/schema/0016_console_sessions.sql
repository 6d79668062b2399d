-- Signed-in console sessions, shared by every console replica on this store. The cookie is kept
-- only as its SHA-256, and the admin token the session acts with only sealed under the KEK.
CREATE TABLE console_sessions (
    id_sha256 TEXT PRIMARY KEY,
    token_envelope TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at_ms {BIGINT} NOT NULL,
    seen_at_ms {BIGINT} NOT NULL
);
