-- Job state changes reach the outbox as one row per statement and tenant, holding the changes
-- as a JSON array (`job_audit_batches`), instead of one `audit_outbox` row per job. A worker
-- claims or ends a few hundred jobs per statement, so this turns three outbox inserts and
-- three deletes per job into a few per batch. The chained trail (`audit_events`) still gets
-- one row per job state change: the scheduler expands each batch when it chains it.
--
-- Statement-level triggers with transition tables replace the row trigger. PostgreSQL does not
-- allow transition tables on a trigger with a column list, so the update trigger fires on every
-- UPDATE of `jobs` and keeps the rows whose status changed.

-- A batch holds at most 1,000 changes, so a statement that inserts a million jobs writes a
-- thousand rows, and the scheduler chains them a few at a time.
--
-- Batches get a table of their own rather than new columns on `audit_outbox`: a scheduler of
-- the previous release, still running during a rolling update, chains `audit_outbox` rows as
-- single changes and would turn a batch into one empty entry. It never reads this table; the
-- new scheduler first chains what is left in `audit_outbox`, then the batches.
CREATE TABLE job_audit_batches (
    id         bigserial PRIMARY KEY,
    tenant_id  uuid NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    n          integer NOT NULL,      -- changes in `entries`
    entries    jsonb NOT NULL         -- [{actor, action, target, details}, ...]
);
GRANT SELECT, INSERT, UPDATE, DELETE ON job_audit_batches TO switchyard_app;
GRANT USAGE, SELECT ON SEQUENCE job_audit_batches_id_seq TO switchyard_app;
ALTER TABLE job_audit_batches ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON job_audit_batches TO switchyard_app
    USING (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant())
    WITH CHECK (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant());

DROP TRIGGER jobs_audit_state ON jobs;
DROP FUNCTION jobs_audit_state();

CREATE FUNCTION jobs_audit_inserted() RETURNS trigger AS $$
BEGIN
    INSERT INTO job_audit_batches (tenant_id, n, entries)
    SELECT tenant_id, count(*), jsonb_agg(jsonb_build_object(
               'actor', created_by, 'action', 'job.' || status, 'target', 'job:' || id,
               'details', jsonb_build_object('kind', kind, 'attempt', attempt)))
    FROM (SELECT *, (row_number() OVER () - 1) / 1000 AS chunk FROM new_rows) r
    GROUP BY tenant_id, chunk;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE FUNCTION jobs_audit_updated() RETURNS trigger AS $$
BEGIN
    INSERT INTO job_audit_batches (tenant_id, n, entries)
    SELECT n.tenant_id, count(*), jsonb_agg(jsonb_build_object(
               'actor', CASE WHEN n.status = 'running' AND n.lease_owner IS NOT NULL
                             THEN 'worker:' || n.lease_owner ELSE 'system' END,
               'action', 'job.' || n.status, 'target', 'job:' || n.id,
               'details', jsonb_strip_nulls(jsonb_build_object(
                   'from', n.old_status, 'attempt', n.attempt, 'error', n.error -> 'code'))))
    FROM (SELECT n.*, o.status AS old_status,
                 (row_number() OVER () - 1) / 1000 AS chunk
          FROM new_rows n JOIN old_rows o ON o.id = n.id
          WHERE n.status IS DISTINCT FROM o.status) n
    GROUP BY n.tenant_id, n.chunk;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_audit_inserted AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_audit_inserted();
CREATE TRIGGER jobs_audit_updated AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_audit_updated();
