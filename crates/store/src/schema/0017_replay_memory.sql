-- How far ahead a replay register kept in memory has promised not to claim: a process records
-- it durably before claiming up to it, so the next process refuses every key issued before it
-- (the embedded Gateway's one-shot `jti`s; PostgreSQL deployments keep them in Redis).
CREATE TABLE replay_memory (
    namespace TEXT PRIMARY KEY,
    claimed_until_ms {BIGINT} NOT NULL
);
