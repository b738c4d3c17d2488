-- The Postgres cost of a job's life, statement by statement, batched as the API and the
-- worker batch them (256 jobs per statement): insert, claim, end, and draining the audit
-- outbox the triggers fill. The tables, triggers and indexes are the real ones; the SET lists
-- are simplified. Run by loadtest/statements.sh on a fresh, migrated database.
\set QUIET on
DO $$ BEGIN
  EXECUTE 'TRUNCATE jobs, audit_outbox' || CASE WHEN to_regclass('job_audit_batches') IS NULL
    THEN '' ELSE ', job_audit_batches' END || CASE WHEN to_regclass('job_audit_changes') IS NULL
    THEN '' ELSE ', job_audit_changes' END || ' CASCADE';
  DELETE FROM tenants;
END $$;
INSERT INTO tenants (id, name) VALUES ('00000000-0000-0000-0000-000000000001', 'ab');
CREATE TEMP TABLE ids AS SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) placing substring(int8send((extract(epoch from clock_timestamp()) * 1000)::bigint) from 3) from 1 for 6), 52, 1), 53, 1), 'hex')::uuid AS id, (g - 1) / 256 AS b FROM generate_series(1, 51200) g;
CREATE INDEX ON ids (b);
\timing on
\echo insert (200 statements of 256)
DO $$ BEGIN FOR i IN 0..199 LOOP
  INSERT INTO jobs (id, tenant_id, created_by, kind, queue, status, max_attempts, input, created_at, event_seq)
  SELECT id, '00000000-0000-0000-0000-000000000001', 'bench', 'system.noop', 'system', 'queued', 3, '{}', now(), 1 FROM ids WHERE b = i;
END LOOP; END $$;
\echo claim
DO $$ BEGIN FOR i IN 0..199 LOOP
  UPDATE jobs SET attempt = attempt + 1, status = 'running', started_at = now(), lease_owner = 'w1', lease_expires_at = now() + interval '30 s', updated_at = now()
  WHERE id = ANY(ARRAY(SELECT id FROM ids WHERE b = i));
END LOOP; END $$;
\echo end
DO $$ BEGIN FOR i IN 0..199 LOOP
  UPDATE jobs SET status = 'succeeded', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
  WHERE id = ANY(ARRAY(SELECT id FROM ids WHERE b = i));
END LOOP; END $$;
\echo outbox drain (DELETE ... RETURNING, 1,000 rows per statement)
DO $$ DECLARE n int; t text; BEGIN
  -- audit_outbox: one row per change (before batches); job_audit_batches (JSON) and
  -- job_audit_changes (arrays): one per statement
  FOREACH t IN ARRAY ARRAY['audit_outbox', 'job_audit_batches', 'job_audit_changes'] LOOP
    CONTINUE WHEN to_regclass(t) IS NULL;
    LOOP
      EXECUTE format('WITH d AS (DELETE FROM %I WHERE id IN (SELECT id FROM %I ORDER BY id LIMIT 1000) RETURNING *) SELECT count(*) FROM d', t, t) INTO n;
      EXIT WHEN n = 0;
    END LOOP;
  END LOOP; END $$;
