-- A tenant's maximum limits for `code.exec` (JSON `{wall_ms, cpu_ms, memory_mb, output_bytes}`,
-- each optional); NULL: the worker's `code.max_limits`.
ALTER TABLE tenants ADD COLUMN code_limits jsonb;
