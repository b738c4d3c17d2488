-- Idempotency-Key on POST /v1/jobs/batch: a batch's key holds all its jobs, in request order
-- (`job_id` is the first). NULL for a single job's key.
ALTER TABLE idempotency_keys ADD COLUMN job_ids uuid[];
