-- A cron run the scheduler refused (the tenant's daily quota used up, its backlog at
-- `max_queued_jobs`, the model no longer enabled for the tenant, the creating API key revoked
-- or expired, the template no longer valid) is recorded with its reason and no job, so
-- `GET /v1/schedules/{id}` shows why a fire time enqueued nothing. A schedule keeps its most
-- recent skipped runs only (the scheduler trims older ones when it records one).
ALTER TABLE schedule_runs ALTER COLUMN job_id DROP NOT NULL,
    ADD COLUMN skipped_code text,
    ADD COLUMN skipped_message text,
    -- NOT VALID: rows from before hold a job and no reason by construction; a validating
    -- scan would hold the table's exclusive lock over every run ever recorded
    ADD CONSTRAINT schedule_runs_job_or_skip CHECK ((job_id IS NULL) <> (skipped_code IS NULL))
        NOT VALID;
