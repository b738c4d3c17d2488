-- Per-tenant default for the exact-match LLM response cache (a request's own `cache` wins).
ALTER TABLE tenants ADD COLUMN llm_cache boolean NOT NULL DEFAULT false;
