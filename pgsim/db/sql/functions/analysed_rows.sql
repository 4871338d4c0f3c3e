-- A table's row count as the planner knows it (pg_class.reltuples, which ANALYZE and autovacuum keep): a
-- partitioned table's is the sum of its leaves' (autovacuum analyses the leaves, never the parent). NULL
-- while unknown (never analysed). What pgsim.knn_calibration compares with the rows a curve was measured on.
-- Its names are bound when the installer creates it, with search_path pg_catalog, pg_temp (pgsim.db.sqlfiles).
CREATE OR REPLACE FUNCTION pgsim.analysed_rows(tbl regclass) RETURNS double precision
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT CASE WHEN c.relkind = 'p' THEN
                    (SELECT sum(l.reltuples) FILTER (WHERE l.reltuples >= 0)
                     FROM pg_partition_tree(c.oid) AS p JOIN pg_class l ON l.oid = p.relid WHERE p.isleaf)
                WHEN c.reltuples >= 0 THEN c.reltuples END
    FROM pg_class c WHERE c.oid = tbl;
END;
