-- no-transaction
-- Usage reports now count failed and cancelled llm.chat jobs too (their charged tokens):
-- the partial index covers every finished one. Built concurrently (outside a transaction)
-- so submissions are not blocked on a large table.
CREATE INDEX CONCURRENTLY IF NOT EXISTS jobs_chat_finished ON jobs (tenant_id, finished_at)
    WHERE kind = 'llm.chat' AND status IN ('succeeded', 'failed', 'cancelled');
