-- The spine: tenants, API keys, jobs and system state.
-- Postgres is the source of truth; Redis only dispatches work and carries live events.

CREATE TABLE tenants (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name        text NOT NULL DEFAULT '',
    -- visible, non-secret part of the key (e.g. "sy_1a2b3c4d"), for humans and logs
    prefix      text NOT NULL,
    -- SHA-256 of the whole key; the key itself is never stored
    digest      bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE jobs (
    id                  uuid PRIMARY KEY,            -- UUIDv7: time ordered
    tenant_id           uuid NOT NULL REFERENCES tenants (id),
    created_by          text NOT NULL,               -- "key:<uuid>" now, a token subject later
    kind                text NOT NULL,
    queue               text NOT NULL,
    priority            smallint NOT NULL DEFAULT 0, -- seam for the priorities issue
    status              text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempt             integer NOT NULL DEFAULT 0,  -- incremented by every claim (fencing token)
    max_attempts        integer NOT NULL CHECK (max_attempts >= 1),
    timeout_s           integer CHECK (timeout_s IS NULL OR timeout_s >= 1),
    input               jsonb NOT NULL,
    output              jsonb,
    error               jsonb,
    metadata            jsonb NOT NULL DEFAULT '{}'::jsonb,
    trace_parent        text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    run_at              timestamptz,                 -- not before (retry backoff, later: scheduled runs)
    lease_owner         text,
    lease_expires_at    timestamptz,
    cancel_requested_at timestamptz,
    -- Redis epoch this job was last handed to; 0 = committed but never dispatched
    dispatch_epoch      bigint NOT NULL DEFAULT 0,
    -- last event sequence number known durable (status transitions)
    event_seq           bigint NOT NULL DEFAULT 0,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- listing: newest first per tenant (UUIDv7 ids sort by creation time)
CREATE INDEX jobs_tenant_id ON jobs (tenant_id, id DESC);
CREATE INDEX jobs_tenant_status_id ON jobs (tenant_id, status, id DESC);
CREATE INDEX jobs_tenant_kind_id ON jobs (tenant_id, kind, id DESC);
-- reconciler: unfinished jobs not dispatched in the current Redis epoch
CREATE INDEX jobs_unfinished_epoch ON jobs (dispatch_epoch, id) WHERE status IN ('queued', 'running');
-- reconciler: running jobs whose lease ran out
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at) WHERE status = 'running';
-- metrics: oldest queued job
CREATE INDEX jobs_queued_created ON jobs (queue, created_at) WHERE status = 'queued';

-- small key/value table for cluster-wide counters (the Redis epoch)
CREATE TABLE system_state (
    key    text PRIMARY KEY,
    value  bigint NOT NULL
);
INSERT INTO system_state (key, value) VALUES ('redis_epoch', 0);
