-- API keys gain a role (existing keys keep full rights: owner), optional scopes that narrow
-- the role's permissions, an expiry, and the time of last use (written at most once a minute
-- per key and API process, never per request).
ALTER TABLE api_keys
    ADD COLUMN role text NOT NULL DEFAULT 'owner'
        CHECK (role IN ('owner', 'admin', 'developer', 'viewer')),
    ADD COLUMN scopes text[],
    ADD COLUMN expires_at timestamptz,
    ADD COLUMN last_used_at timestamptz;
