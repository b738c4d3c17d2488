-- Webhooks: a job with a `webhook_url` (its own, or its tenant's at submission) gets a signed
-- POST when it ends. The delivery row is written by a trigger in the transaction that ends
-- the job, so no ending is missed; the scheduler delivers and retries.
ALTER TABLE jobs ADD COLUMN webhook_url text;
ALTER TABLE tenants ADD COLUMN webhook_url text;
-- the HMAC-SHA256 key of the tenant's deliveries (244 random bits; rotated by the admin CLI)
ALTER TABLE tenants ADD COLUMN webhook_secret text NOT NULL
    DEFAULT replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');

CREATE TABLE webhook_deliveries (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id       uuid NOT NULL,
    job_id          uuid NOT NULL,
    url             text NOT NULL,
    event           text NOT NULL,                 -- job.succeeded, job.failed, job.cancelled
    state           text NOT NULL DEFAULT 'pending', -- pending, delivered, failed
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    log             jsonb NOT NULL DEFAULT '[]',   -- one entry per attempt
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id);

CREATE FUNCTION jobs_webhook() RETURNS trigger AS $$
BEGIN
    INSERT INTO webhook_deliveries (tenant_id, job_id, url, event)
    VALUES (NEW.tenant_id, NEW.id, NEW.webhook_url, 'job.' || NEW.status);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

-- only jobs with a webhook pay for it
CREATE TRIGGER jobs_webhook AFTER UPDATE OF status ON jobs
    FOR EACH ROW
    WHEN (NEW.webhook_url IS NOT NULL
          AND NEW.status IN ('succeeded', 'failed', 'cancelled')
          AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION jobs_webhook();

GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_deliveries TO switchyard_app;
ALTER TABLE webhook_deliveries ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON webhook_deliveries TO switchyard_app
    USING (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant())
    WITH CHECK (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant());
