-- A tenant's own retention of finished jobs in days (NULL: the configured default,
-- `job_retention_days`; 0: kept forever).
ALTER TABLE tenants ADD COLUMN job_retention_days integer CHECK (job_retention_days >= 0);
