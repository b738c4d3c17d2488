-- The services' role can no longer rewrite the audit trail. Before, it held UPDATE and DELETE
-- on `audit_events` and `audit_heads`, and the append-only trigger let a DELETE through to
-- any session that set `switchyard.audit_prune` itself: a compromised service could delete a
-- tenant's newest rows, move the head back and append a different history that verified.
-- Now it may only append rows and move a head forward; retention pruning runs as the owner,
-- through `switchyard_prune_audit` (SECURITY DEFINER), which deletes only rows older than its
-- cutoff and never younger than `audit_settings.min_retention` (30 days unless the owner
-- changes it: the services cannot), then re-anchors the chain at the last one.
REVOKE UPDATE, DELETE ON audit_events FROM switchyard_app;
REVOKE UPDATE, DELETE ON audit_heads FROM switchyard_app;
GRANT UPDATE (seq, hash) ON audit_heads TO switchyard_app;

-- A head moves forward only: a new hash comes with a higher seq, and the anchor never goes back.
CREATE FUNCTION audit_heads_forward() RETURNS trigger AS $$
BEGIN
    IF NEW.seq < OLD.seq OR (NEW.seq = OLD.seq AND NEW.hash <> OLD.hash)
       OR NEW.anchor_seq < OLD.anchor_seq THEN
        RAISE EXCEPTION 'audit heads only move forward';
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER audit_heads_forward BEFORE UPDATE ON audit_heads
    FOR EACH ROW EXECUTE FUNCTION audit_heads_forward();

-- The youngest audit rows pruning may delete, whatever the caller asks (owner-only: a
-- compromised service could otherwise prune a tenant's whole trail "by retention").
CREATE TABLE audit_settings (
    only_row      boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    min_retention interval NOT NULL DEFAULT '30 days'
);
INSERT INTO audit_settings DEFAULT VALUES;
GRANT SELECT ON audit_settings TO switchyard_app;

-- Deletes a tenant's rows older than `before` (and than the minimum retention) and re-anchors its chain at the last one
-- deleted (verification starts there); returns the rows deleted.
CREATE FUNCTION switchyard_prune_audit(tenant uuid, before timestamptz)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    last_seq  bigint;
    last_hash bytea;
    n         bigint;
BEGIN
    PERFORM 1 FROM audit_heads WHERE tenant_id = tenant FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    SELECT LEAST(before, now() - min_retention) INTO before FROM audit_settings;
    SELECT seq, hash INTO last_seq, last_hash FROM audit_events
        WHERE tenant_id = tenant AND at < before ORDER BY seq DESC LIMIT 1;
    IF last_seq IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM set_config('switchyard.audit_prune', 'on', true);
    DELETE FROM audit_events WHERE tenant_id = tenant AND seq <= last_seq;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM set_config('switchyard.audit_prune', '', true);
    UPDATE audit_heads SET anchor_seq = last_seq, anchor_hash = last_hash
        WHERE tenant_id = tenant;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION switchyard_prune_audit(uuid, timestamptz) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION switchyard_prune_audit(uuid, timestamptz) TO switchyard_app;
