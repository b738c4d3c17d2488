-- no-transaction
-- Usage reports (GET /v1/usage): succeeded llm.chat jobs of one tenant by finish time.
-- Built concurrently (outside a transaction) so submissions are not blocked on a large table.
CREATE INDEX CONCURRENTLY jobs_chat_succeeded_finished ON jobs (tenant_id, finished_at)
    WHERE kind = 'llm.chat' AND status = 'succeeded';
