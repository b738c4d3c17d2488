-- no-transaction
-- Retention: finished jobs of one tenant by finish time (the scheduler prunes the oldest in
-- small batches). Built concurrently so submissions are not blocked on a large table.
CREATE INDEX CONCURRENTLY jobs_tenant_finished ON jobs (tenant_id, finished_at)
    WHERE status IN ('succeeded', 'failed', 'cancelled');
