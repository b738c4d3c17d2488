-- Cron schedules: each due fire time enqueues one job. `schedule_runs` holds one row per
-- (schedule, fire time), inserted in the transaction that inserts the job, so several
-- scheduler replicas enqueue each run exactly once.
CREATE TABLE schedules (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    created_by  text NOT NULL,
    name        text,
    cron        text NOT NULL,
    timezone    text NOT NULL,
    job         jsonb NOT NULL,           -- the job template (a POST /v1/jobs body)
    paused      boolean NOT NULL DEFAULT false,
    next_run_at timestamptz NOT NULL,
    last_run_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX schedules_tenant ON schedules (tenant_id, id DESC);
CREATE INDEX schedules_due ON schedules (next_run_at) WHERE NOT paused;

CREATE TABLE schedule_runs (
    schedule_id uuid NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    fire_at     timestamptz NOT NULL,
    tenant_id   uuid NOT NULL,
    job_id      uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule_id, fire_at)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON schedules, schedule_runs TO switchyard_app;
ALTER TABLE schedules ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON schedules TO switchyard_app
    USING (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant())
    WITH CHECK (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant());
ALTER TABLE schedule_runs ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON schedule_runs TO switchyard_app
    USING (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant())
    WITH CHECK (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant());
