-- End users of a tenant's app authenticate with JWTs. HS256 tokens are signed with a secret
-- per tenant; the tenant is found by the token's `iss` (unique per tenant), so a token can never
-- name another tenant. Conversations record their creator (as jobs already do) so an end user
-- sees only what it created unless its role allows more.
ALTER TABLE tenants
    ADD COLUMN jwt_issuer text UNIQUE,
    ADD COLUMN jwt_secret text,
    ADD CONSTRAINT tenants_jwt_pair CHECK ((jwt_issuer IS NULL) = (jwt_secret IS NULL));

ALTER TABLE conversations ADD COLUMN created_by text NOT NULL DEFAULT '';

CREATE INDEX jobs_tenant_creator ON jobs (tenant_id, created_by, id DESC);
CREATE INDEX conversations_tenant_creator ON conversations (tenant_id, created_by, id DESC);
