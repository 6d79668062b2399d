-- SQLite only: the embedded bus and replay registry, and immutability of versions.
CREATE TABLE streams (
    name TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
);
CREATE TABLE stream_entries (
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    appended_ms INTEGER NOT NULL,
    fields TEXT NOT NULL,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;
CREATE TABLE stream_groups (
    stream TEXT NOT NULL,
    name TEXT NOT NULL,
    last_delivered INTEGER NOT NULL,
    PRIMARY KEY (stream, name)
);
CREATE TABLE stream_pending (
    stream TEXT NOT NULL,
    grp TEXT NOT NULL,
    seq INTEGER NOT NULL,
    consumer TEXT NOT NULL,
    delivered_ms INTEGER NOT NULL,
    deliveries INTEGER NOT NULL,
    PRIMARY KEY (stream, grp, seq)
) WITHOUT ROWID;
CREATE TABLE replay_keys (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE INDEX replay_keys_expiry ON replay_keys (expires_ms);
CREATE TRIGGER policy_versions_immutable_update BEFORE UPDATE ON policy_versions
BEGIN SELECT RAISE(ABORT, 'policy versions are immutable'); END;
CREATE TRIGGER policy_versions_immutable_delete BEFORE DELETE ON policy_versions
BEGIN SELECT RAISE(ABORT, 'policy versions are immutable'); END;
CREATE TRIGGER policy_set_versions_immutable_update BEFORE UPDATE ON policy_set_versions
BEGIN SELECT RAISE(ABORT, 'policy set versions are immutable'); END;
CREATE TRIGGER policy_set_versions_immutable_delete BEFORE DELETE ON policy_set_versions
BEGIN SELECT RAISE(ABORT, 'policy set versions are immutable'); END;
