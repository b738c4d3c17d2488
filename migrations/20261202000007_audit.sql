-- The audit trail: append-only, hash-chained per tenant. Each row carries the hash of the
-- tenant's previous row; `audit_heads` holds each chain's last seq and hash (locked once per
-- appended batch, never per job) and the anchor that pruning leaves behind.
CREATE TABLE audit_events (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    seq         bigint NOT NULL,
    at          timestamptz NOT NULL,
    actor       text NOT NULL,        -- "key:<id>"
    action      text NOT NULL,        -- e.g. "POST /v1/jobs"
    target      text NOT NULL,        -- the object (path or created id)
    outcome     integer NOT NULL,     -- HTTP status
    request_id  text NOT NULL,
    source      text NOT NULL,        -- client address
    details     jsonb NOT NULL DEFAULT '{}',
    prev_hash   bytea NOT NULL,
    hash        bytea NOT NULL,
    PRIMARY KEY (tenant_id, seq)
);
CREATE INDEX audit_events_at ON audit_events (tenant_id, at);

CREATE TABLE audit_heads (
    tenant_id    uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    seq          bigint NOT NULL,
    hash         bytea NOT NULL,
    -- after pruning: the last pruned row's seq and hash, where verification starts
    anchor_seq   bigint NOT NULL DEFAULT 0,
    anchor_hash  bytea NOT NULL
);

-- Rows are never changed; they are deleted only by retention pruning, which sets
-- `switchyard.audit_prune` for its own transaction.
CREATE FUNCTION audit_events_append_only() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('switchyard.audit_prune', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_events is append-only';
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
