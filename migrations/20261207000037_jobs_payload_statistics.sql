-- The store runs `ANALYZE jobs` itself as the table grows (migration 19: once 1,000 rows and a
-- tenth of the table changed, checked every 5 s). A fifth to a third of each went to the JSON
-- payload columns, read and compared for statistics that no query uses (they are never
-- filtered on; the one expression on `error` is behind a primary-key lookup, usage groups by
-- an expression, which has no column statistics). Without them an ANALYZE of 40,000 no-op jobs
-- took 129–142 ms instead of 151–194 ms (five each, alternated); larger payloads save more.
ALTER TABLE jobs
    ALTER COLUMN input SET STATISTICS 0,
    ALTER COLUMN output SET STATISTICS 0,
    ALTER COLUMN error SET STATISTICS 0,
    ALTER COLUMN metadata SET STATISTICS 0;
