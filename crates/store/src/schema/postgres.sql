-- PostgreSQL only: immutability of versions.
CREATE FUNCTION caracal_reject_mutation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are immutable', TG_TABLE_NAME USING ERRCODE = 'check_violation';
END;
$$;
CREATE TRIGGER policy_versions_immutable BEFORE UPDATE OR DELETE ON policy_versions
    FOR EACH ROW EXECUTE FUNCTION caracal_reject_mutation();
CREATE TRIGGER policy_set_versions_immutable BEFORE UPDATE OR DELETE ON policy_set_versions
    FOR EACH ROW EXECUTE FUNCTION caracal_reject_mutation();
