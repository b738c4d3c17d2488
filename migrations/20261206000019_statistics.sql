-- The services keep the planner's statistics of `jobs` fresh themselves, whatever autovacuum
-- does (it may be off, or slow to notice a table that grew from nothing): a generic plan cached
-- while `jobs` was empty would keep scanning it as it grows. ANALYZE also invalidates every
-- cached plan that reads the table, so prepared statements are re-planned for its new size.
-- ANALYZE needs the owner: the services' role calls this SECURITY DEFINER function instead.
CREATE FUNCTION switchyard_refresh_statistics(min_changes bigint, fraction float8)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    changed bigint;
    tuples float8;
BEGIN
    SELECT s.n_mod_since_analyze, c.reltuples INTO changed, tuples
      FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
     WHERE s.relid = 'public.jobs'::regclass;
    IF changed IS NULL OR changed < min_changes + fraction * GREATEST(tuples, 0) THEN
        RETURN false;
    END IF;
    ANALYZE public.jobs;
    RETURN true;
END
$$;
REVOKE ALL ON FUNCTION switchyard_refresh_statistics(bigint, float8) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION switchyard_refresh_statistics(bigint, float8) TO switchyard_app;
