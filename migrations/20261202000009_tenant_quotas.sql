-- A tenant's own quotas (requests_per_minute, concurrent_jobs, llm_tokens_per_day,
-- sandbox_cpu_seconds_per_day); NULL or a missing field: the configured default.
ALTER TABLE tenants ADD COLUMN quotas jsonb;
