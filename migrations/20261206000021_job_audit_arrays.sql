-- The job audit triggers write a statement's changes as typed arrays (one element per change)
-- instead of a JSON array of objects. Building two JSON objects per change, and the JSON
-- array, was most of what the triggers cost: `loadtest/statements.sh` (insert, claim and end
-- of 51,200 jobs in statements of 256) took 3.6-4.0 s with the JSON triggers and 3.0-3.2 s
-- with these. The scheduler builds each change's actor, action, target and details when it
-- chains it, so the rows of `audit_events` are what they were.
--
-- Rows in the JSON shape (`entries`, written before this migration) are still chained. A
-- scheduler of the previous release cannot read the new rows: it fails its chaining pass
-- (and retries it) without deleting anything until it is replaced; nothing is lost.
ALTER TABLE job_audit_batches
    ALTER COLUMN entries DROP NOT NULL,
    ADD COLUMN job_ids       uuid[],
    ADD COLUMN statuses      text[],
    ADD COLUMN actors        text[],
    ADD COLUMN attempts      integer[],
    ADD COLUMN kinds         text[],   -- inserted jobs (details: kind, attempt)
    ADD COLUMN from_statuses text[],   -- updated jobs (details: from, attempt, error code)
    ADD COLUMN error_codes   jsonb[];

CREATE OR REPLACE FUNCTION jobs_audit_inserted() RETURNS trigger AS $$
BEGIN
    INSERT INTO job_audit_batches (tenant_id, n, job_ids, statuses, actors, attempts, kinds)
    SELECT tenant_id, count(*), array_agg(id), array_agg(status), array_agg(created_by),
           array_agg(attempt), array_agg(kind)
    FROM (SELECT *, (row_number() OVER () - 1) / 1000 AS chunk FROM new_rows) r
    GROUP BY tenant_id, chunk;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION jobs_audit_updated() RETURNS trigger AS $$
BEGIN
    INSERT INTO job_audit_batches (tenant_id, n, job_ids, statuses, actors, attempts,
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
