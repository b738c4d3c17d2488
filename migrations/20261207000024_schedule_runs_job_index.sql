-- no-transaction
-- Retention deletes a pruned job's schedule-run rows by job: without this index every pruning
-- batch read the whole table (one row per fire time of every schedule, kept as long as jobs).
CREATE INDEX CONCURRENTLY IF NOT EXISTS schedule_runs_job ON schedule_runs (job_id);
