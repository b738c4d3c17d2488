-- A webhook delivery carries the job as it was when it ended: the trigger keeps a snapshot of
-- the row in the delivery, so a delivery that waits (backoff) while the job is retried, or
-- pruned, still describes the ending it announces. Rows written before this have none; the
-- scheduler reads the job itself for them.
ALTER TABLE webhook_deliveries ADD COLUMN job jsonb;

CREATE OR REPLACE FUNCTION jobs_webhook() RETURNS trigger AS $$
BEGIN
    INSERT INTO webhook_deliveries (tenant_id, job_id, url, event, job)
    VALUES (NEW.tenant_id, NEW.id, NEW.webhook_url, 'job.' || NEW.status, to_jsonb(NEW));
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
