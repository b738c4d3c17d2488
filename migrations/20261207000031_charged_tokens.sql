-- What each llm.chat job's attempts used of the tenant's daily token quota, whatever they
-- ended as (a failed, cancelled or retried attempt's tokens were paid for): added by each
-- run end, reported by GET /v1/usage as charged_tokens. A constant default: no table rewrite,
-- but the ALTER takes an exclusive lock on jobs for a moment; waiting for it behind a long
-- transaction would stall every submission meanwhile, so it gives up after 10 s instead
-- (run `switchyard migrate` again).
SET LOCAL lock_timeout = '10s';
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS charged_tokens bigint NOT NULL DEFAULT 0;
