-- A job's own retry backoff (NULL: the worker's default, 1 s doubling to 60 s with jitter).
ALTER TABLE jobs ADD COLUMN backoff jsonb;
