-- The curve pgsim.calibrate measured for this column's HNSW index, while it still describes the table; NULL
-- when there is none, or when it is stale: the index is not the one measured (rebuilt, replaced), or the
-- table has changed by more than a fifth of its rows since, by the planner's row count (ANALYZE,
-- autovacuum) or by rows inserted and deleted (the statistics collector; not on a standby, where those
-- counters are the standby's own). A stale curve is not trusted: the planner's defaults stand until the
-- table is calibrated again.
-- Its names are bound when the installer creates it, with search_path pg_catalog, pg_temp (pgsim.db.sqlfiles).
CREATE OR REPLACE FUNCTION pgsim.knn_calibration(tbl regclass, attnum smallint, index regclass) RETURNS jsonb
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT c.measured
    FROM pgsim.calibration c
    JOIN pg_catalog.pg_class t ON t.oid = c.table_oid
    LEFT JOIN pg_catalog.pg_stat_all_tables s ON s.relid = c.table_oid AND NOT pg_catalog.pg_is_in_recovery()
    WHERE c.table_oid = tbl AND c.column_attnum = attnum AND c.kind = 'knn' AND c.index_oid = index
      AND (t.reltuples < 0 OR abs(t.reltuples - c.rows_measured) <= 0.2 * greatest(c.rows_measured, 1))
      AND (s.relid IS NULL OR c.changes_measured IS NULL OR s.n_tup_ins + s.n_tup_del < c.changes_measured
           OR s.n_tup_ins + s.n_tup_del - c.changes_measured <= 0.2 * greatest(c.rows_measured, 1));
END;
