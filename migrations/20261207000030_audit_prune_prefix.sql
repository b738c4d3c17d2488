-- Audit pruning deletes only the oldest stretch of a tenant's chain whose rows are all older
-- than the cutoff, walking from the oldest row and stopping at the first younger one. It chose
-- the last row older than the cutoff and deleted everything before it: one row with an old
-- time chained after newer ones (job changes keep their trigger time and are chained later;
-- or a forged row from the services' role, which may insert) pulled every newer row along,
-- past the minimum retention. And it deletes at most 10,000 rows a call (the caller calls
-- again while a call deletes that many): the head stays locked briefly, the audit writers
-- wait for a batch, not for a whole first prune.
CREATE OR REPLACE FUNCTION switchyard_prune_audit(tenant uuid, before timestamptz)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    last_seq  bigint;
    last_hash bytea;
    r         record;
    n         bigint;
BEGIN
    PERFORM 1 FROM audit_heads WHERE tenant_id = tenant FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    SELECT LEAST(before, now() - min_retention) INTO before FROM audit_settings;
    FOR r IN SELECT seq, hash, at FROM audit_events WHERE tenant_id = tenant
             ORDER BY seq LIMIT 10000 LOOP
        EXIT WHEN r.at >= before;
        last_seq := r.seq;
        last_hash := r.hash;
    END LOOP;
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
