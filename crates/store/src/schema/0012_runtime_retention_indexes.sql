-- The Gateway's revocation snapshot reads revoked records, ended sessions and revoked edges
-- every 30 s; retention deletes ended rows by age; a record is kept while a live session
-- is bound to it.
CREATE INDEX authority_records_status_expiry ON authority_records (status, expires_at_ms);
CREATE INDEX authority_records_expiry ON authority_records (expires_at_ms);
CREATE INDEX sessions_status_ended ON sessions (status, terminated_at_ms);
CREATE INDEX sessions_authority_record ON sessions (authority_record_id);
CREATE INDEX delegation_edges_status_revoked ON delegation_edges (status, revoked_at_ms);
