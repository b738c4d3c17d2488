-- A tenant-scoped read of one job in one statement. The store's tenant-scoped queries run in
-- a transaction opened with `BEGIN; SET LOCAL switchyard.tenant = ...` (row-level security,
-- migration 11): three round trips and four statements for what is one primary-key lookup.
-- Every WebSocket or SSE follow and every `GET /v1/jobs/{id}` reads its job that way, so the
-- setting is made here instead, local to the statement's own transaction, and the same
-- row-level security policy still admits only that tenant's rows (the function runs as its
-- caller). Filters: the tenant (also checked by the policy) and, for end users, the creator.
CREATE FUNCTION switchyard_job_scoped(p_tenant uuid, p_id uuid, p_creator text)
RETURNS SETOF public.jobs LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.set_config('switchyard.tenant', p_tenant::text, true);
    RETURN QUERY
        SELECT * FROM public.jobs j
         WHERE j.id = p_id AND j.tenant_id = p_tenant
           AND (p_creator IS NULL OR j.created_by = p_creator);
END
$$;
