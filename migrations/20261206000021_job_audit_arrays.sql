-- The job audit triggers write a statement's changes as typed arrays (one element per change)
-- instead of a JSON array of objects. Building two JSON objects per change, and the JSON
-- array, was most of what the triggers cost: `loadtest/statements.sh` (insert, claim and end
-- of 51,200 jobs in statements of 256) took 3.6-4.0 s with the JSON triggers and 3.0-3.2 s
-- with these. The scheduler builds each change's actor, action, target and details when it
-- chains it, so the rows of `audit_events` are what they were.
--
-- The arrays get a table of their own, as the batches did (`..._20_job_audit_batches.sql`):
-- a scheduler of the previous release, running during a rolling update or after a rollback,
-- never reads it (it would fail on rows without `entries` and stop its other duties for the
-- pass); it keeps chaining what is left in the older tables, and the changes written here wait
-- for a scheduler of this release. The new scheduler chains `audit_outbox`, then
-- `job_audit_batches`, then this table, so changes stay in commit order.
CREATE TABLE job_audit_changes (
    id            bigserial PRIMARY KEY,
    tenant_id     uuid NOT NULL,
    at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    n             integer NOT NULL,  -- changes (the length of every array)
    job_ids       uuid[] NOT NULL,
    statuses      text[] NOT NULL,
    actors        text[] NOT NULL,
    attempts      integer[] NOT NULL,
    kinds         text[],            -- inserted jobs (details: kind, attempt)
    from_statuses text[],            -- updated jobs (details: from, attempt, error code)
    error_codes   jsonb[]
);
GRANT SELECT, INSERT, UPDATE, DELETE ON job_audit_changes TO switchyard_app;
GRANT USAGE, SELECT ON SEQUENCE job_audit_changes_id_seq TO switchyard_app;
ALTER TABLE job_audit_changes ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON job_audit_changes TO switchyard_app
    USING (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant())
    WITH CHECK (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant());

CREATE OR REPLACE FUNCTION jobs_audit_inserted() RETURNS trigger AS $$
BEGIN
    INSERT INTO job_audit_changes (tenant_id, n, job_ids, statuses, actors, attempts, kinds)
    SELECT tenant_id, count(*), array_agg(id), array_agg(status), array_agg(created_by),
           array_agg(attempt), array_agg(kind)
    FROM (SELECT *, (row_number() OVER () - 1) / 1000 AS chunk FROM new_rows) r
    GROUP BY tenant_id, chunk;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION jobs_audit_updated() RETURNS trigger AS $$
BEGIN
    INSERT INTO job_audit_changes (tenant_id, n, job_ids, statuses, actors, attempts,
                                   from_statuses, error_codes)
    SELECT n.tenant_id, count(*), array_agg(n.id), array_agg(n.status),
           array_agg(CASE WHEN n.status = 'running' AND n.lease_owner IS NOT NULL
                          THEN 'worker:' || n.lease_owner ELSE 'system' END),
           array_agg(n.attempt), array_agg(n.old_status), array_agg(n.error -> 'code')
    FROM (SELECT n.*, o.status AS old_status,
                 (row_number() OVER () - 1) / 1000 AS chunk
          FROM new_rows n JOIN old_rows o ON o.id = n.id
          WHERE n.status IS DISTINCT FROM o.status) n
    GROUP BY n.tenant_id, n.chunk;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
