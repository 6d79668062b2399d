-- Activation status looks an outbox message up by its dedupe key.
CREATE INDEX outbox_dedupe ON outbox (dedupe_key);
