-- A schedule an end user created with a JWT stops firing once that token has expired: an end
-- user cannot leave work running past their authority (an API key created with a token
-- expires with it, and a schedule of a revoked or expired key is skipped). Runs after it are
-- recorded as skipped. NULL: no end of its own (created with an API key, checked live).
ALTER TABLE schedules ADD COLUMN creator_expires_at timestamptz;
