-- Every job state change is audited. A trigger on `jobs` writes the change to an unchained
-- outbox in the same transaction (so no code path can forget it, and the hot path takes no
-- chain lock); the scheduler moves outbox rows into the hash-chained `audit_events` in batches.
CREATE TABLE audit_outbox (
    id         bigserial PRIMARY KEY,
    tenant_id  uuid NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor      text NOT NULL,
    action     text NOT NULL,
    target     text NOT NULL,
    details    jsonb NOT NULL DEFAULT '{}'
);

CREATE FUNCTION jobs_audit_state() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO audit_outbox (tenant_id, actor, action, target, details)
        VALUES (NEW.tenant_id, NEW.created_by, 'job.' || NEW.status, 'job:' || NEW.id,
                jsonb_build_object('kind', NEW.kind, 'attempt', NEW.attempt));
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO audit_outbox (tenant_id, actor, action, target, details)
        VALUES (NEW.tenant_id,
                CASE WHEN NEW.status = 'running' AND NEW.lease_owner IS NOT NULL
                     THEN 'worker:' || NEW.lease_owner ELSE 'system' END,
                'job.' || NEW.status, 'job:' || NEW.id,
                jsonb_strip_nulls(jsonb_build_object('from', OLD.status, 'attempt', NEW.attempt,
                                                     'error', NEW.error -> 'code')));
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_audit_state AFTER INSERT OR UPDATE OF status ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_audit_state();
