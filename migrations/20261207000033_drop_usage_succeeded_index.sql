-- no-transaction
-- Replaced by jobs_chat_finished (migration 32); one index fewer for every job state change.
DROP INDEX CONCURRENTLY IF EXISTS jobs_chat_succeeded_finished;
