-- Design experiment (not the schema): what a claim and a run end would cost if the run state
-- lived in a narrow table of its own instead of in `jobs` (10 indexes, every update non-HOT
-- because `status` is indexed). 51,200 jobs, statements of 256 as the worker batches them,
-- user triggers off on `jobs` so only the row and index writes are compared:
--   jobs         the real table
--   runs_idx     id, tenant, status, attempt, lease, times; pkey + the reconciler's two
--                partial indexes (expired leases, unfinished by dispatch epoch)
--   runs_hot     the same columns, pkey only, fillfactor 50: claims and ends are HOT updates
-- usage: on a database migrated by `switchyard migrate` (it truncates jobs and tenants):
--   psql -f loadtest/sql/narrow-runs.sql <database>
\set QUIET on
TRUNCATE jobs CASCADE; DELETE FROM tenants;
INSERT INTO tenants (id, name) VALUES ('00000000-0000-0000-0000-000000000001', 'ab');
SET client_min_messages = warning;
DROP TABLE IF EXISTS runs_idx, runs_hot;
RESET client_min_messages;
CREATE TABLE runs_idx (id uuid PRIMARY KEY, tenant_id uuid NOT NULL, status text NOT NULL,
  attempt int NOT NULL DEFAULT 0, lease_owner text, lease_expires_at timestamptz,
  started_at timestamptz, finished_at timestamptz, dispatch_epoch bigint NOT NULL DEFAULT 0,
  updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON runs_idx (lease_expires_at) WHERE status = 'running';
CREATE INDEX ON runs_idx (dispatch_epoch, id) WHERE status IN ('queued', 'running');
CREATE TABLE runs_hot (LIKE runs_idx INCLUDING DEFAULTS, PRIMARY KEY (id)) WITH (fillfactor = 50);
CREATE TEMP TABLE ids AS SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) placing substring(int8send((extract(epoch from clock_timestamp()) * 1000)::bigint) from 3) from 1 for 6), 52, 1), 53, 1), 'hex')::uuid AS id, (g - 1) / 256 AS b FROM generate_series(1, 51200) g;
CREATE INDEX ON ids (b);
ALTER TABLE jobs DISABLE TRIGGER USER;
DO $$ BEGIN FOR i IN 0..199 LOOP
  INSERT INTO jobs (id, tenant_id, created_by, kind, queue, status, max_attempts, input, created_at, event_seq)
  SELECT id, '00000000-0000-0000-0000-000000000001', 'bench', 'system.noop', 'system', 'queued', 3, '{}', now(), 1 FROM ids WHERE b = i;
  INSERT INTO runs_idx (id, tenant_id, status) SELECT id, '00000000-0000-0000-0000-000000000001', 'queued' FROM ids WHERE b = i;
  INSERT INTO runs_hot (id, tenant_id, status) SELECT id, '00000000-0000-0000-0000-000000000001', 'queued' FROM ids WHERE b = i;
END LOOP; END $$;
CHECKPOINT;
DO $$ DECLARE t text; t0 timestamptz; ms float8; BEGIN
  FOREACH t IN ARRAY ARRAY['jobs', 'runs_idx', 'runs_hot'] LOOP
    t0 := clock_timestamp();
    FOR i IN 0..199 LOOP
      EXECUTE format('UPDATE %I SET attempt = attempt + 1, status = ''running'', started_at = now(), lease_owner = ''w1'', lease_expires_at = now() + interval ''30 s'', updated_at = now() WHERE id = ANY(ARRAY(SELECT id FROM ids WHERE b = $1))', t) USING i;
    END LOOP;
    FOR i IN 0..199 LOOP
      EXECUTE format('UPDATE %I SET status = ''succeeded'', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL, updated_at = now() WHERE id = ANY(ARRAY(SELECT id FROM ids WHERE b = $1))', t) USING i;
    END LOOP;
    ms := extract(epoch from clock_timestamp() - t0) * 1000;
    RAISE NOTICE '%: claim + end of 51,200 jobs in % ms, % us per job', rpad(t, 8), round(ms::numeric), round((ms * 1000 / 51200)::numeric, 1);
  END LOOP;
END $$;
ALTER TABLE jobs ENABLE TRIGGER USER;
DROP TABLE runs_idx, runs_hot;
