-- Local operator accounts of the console: an Argon2id password hash, and the admin token the
-- account acts with, sealed under the KEK (the console opens it at sign-in; revoking that token
-- disables the account).
CREATE TABLE console_users (
    email TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    token_envelope TEXT NOT NULL,
    token_id TEXT NOT NULL,
    kek_id TEXT NOT NULL,
    created_at_ms {BIGINT} NOT NULL
);
