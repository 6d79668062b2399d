-- The chain hashes are stored as 32 raw bytes instead of 64 hex characters (a third less per
-- row); the API, exports and the sweep still speak lower-case hex. A value that is not hex
-- (tampering) is kept as its bytes, so the sweep still reports it.
CREATE FUNCTION caracal_hex_or_bytes(text TEXT) RETURNS BYTEA LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN decode(text, 'hex');
EXCEPTION WHEN others THEN
    RETURN convert_to(text, 'UTF8');
END $$;
ALTER TABLE audit_events
    ALTER COLUMN content_sha256 TYPE BYTEA USING caracal_hex_or_bytes(content_sha256),
    ALTER COLUMN prev_content_sha256 TYPE BYTEA USING caracal_hex_or_bytes(prev_content_sha256),
    ALTER COLUMN chain_mac TYPE BYTEA USING caracal_hex_or_bytes(chain_mac);
DROP FUNCTION caracal_hex_or_bytes(TEXT);
