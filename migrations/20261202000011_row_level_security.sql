-- Row-level security as defence in depth behind the store's tenant filters.
--
-- The services connect with `role=switchyard_app` (config `database_role`): a role that owns no
-- table, is not a superuser and cannot bypass RLS, so the policies below bind it. Migrations run
-- as the owner (the connecting user, without the role). Store functions serving a tenant open a
-- transaction with `SET LOCAL switchyard.tenant = '<id>'`: every statement in it then sees and
-- writes only that tenant's rows, even one whose own WHERE clause forgot the tenant. Internal
-- work (workers, the scheduler, authentication by key digest) runs without the setting and sees
-- every tenant, as it must.
DO $$
BEGIN
    CREATE ROLE switchyard_app NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;
EXCEPTION
    -- it exists (roles are per cluster; another database, or a concurrent migration, made it)
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;
-- a non-superuser owner (managed Postgres) must be a member to connect as the role
DO $$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE format('GRANT switchyard_app TO %I', current_user);
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO switchyard_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON tenants, api_keys, jobs, system_state, conversations,
    conversation_messages, audit_events, audit_heads, audit_outbox TO switchyard_app;
GRANT USAGE, SELECT ON SEQUENCE audit_outbox_id_seq TO switchyard_app;

-- The tenant a transaction is confined to (NULL: internal work, every tenant).
CREATE FUNCTION switchyard_tenant() RETURNS uuid LANGUAGE sql STABLE AS
$$ SELECT NULLIF(current_setting('switchyard.tenant', true), '')::uuid $$;

ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON tenants TO switchyard_app
    USING (switchyard_tenant() IS NULL OR id = switchyard_tenant())
    WITH CHECK (switchyard_tenant() IS NULL OR id = switchyard_tenant());

ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON api_keys TO switchyard_app
    USING (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant())
    WITH CHECK (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant());

ALTER TABLE jobs ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON jobs TO switchyard_app
    USING (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant())
    WITH CHECK (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant());

ALTER TABLE conversations ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON conversations TO switchyard_app
    USING (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant())
    WITH CHECK (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant());

-- messages belong to the tenant of their conversation (the subquery is itself under RLS)
ALTER TABLE conversation_messages ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON conversation_messages TO switchyard_app
    USING (switchyard_tenant() IS NULL
           OR EXISTS (SELECT 1 FROM conversations c WHERE c.id = conversation_id))
    WITH CHECK (switchyard_tenant() IS NULL
           OR EXISTS (SELECT 1 FROM conversations c WHERE c.id = conversation_id));

ALTER TABLE audit_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON audit_events TO switchyard_app
    USING (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant())
    WITH CHECK (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant());

ALTER TABLE audit_heads ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON audit_heads TO switchyard_app
    USING (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant())
    WITH CHECK (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant());

ALTER TABLE audit_outbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_rows ON audit_outbox TO switchyard_app
    USING (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant())
    WITH CHECK (switchyard_tenant() IS NULL OR tenant_id = switchyard_tenant());
