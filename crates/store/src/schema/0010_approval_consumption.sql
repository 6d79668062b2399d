-- A consumed approval names the authority record its mint created, so the same request
-- retried within two minutes is answered for that record rather than decided again.
ALTER TABLE approval_holds ADD COLUMN consumed_record_id TEXT;
