-- The curve pgsim.calibrate measured for this column's HNSW index, while it still describes the table; NULL
-- when there is none, or when it is stale: the index is not the one measured (rebuilt, replaced), or the
-- table's row count (pgsim.analysed_rows: what ANALYZE and autovacuum count) is unknown or more than a fifth
-- away from the count when it was measured. (The statistics collector's counters are no better guide:
-- another session's writes reach them late, and an ANALYZE resets the live count they are added to.) A
-- stale curve is not trusted: the planner's defaults stand until the table is calibrated again.
-- Its names are bound when the installer creates it, with search_path pg_catalog, pg_temp (pgsim.db.sqlfiles).
CREATE OR REPLACE FUNCTION pgsim.knn_calibration(tbl regclass, attnum smallint, index regclass) RETURNS jsonb
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT c.measured
    FROM pgsim.calibration c
    WHERE c.table_oid = tbl AND c.column_attnum = attnum AND c.kind = 'knn' AND c.index_oid = index
      AND abs(pgsim.analysed_rows(tbl) - c.rows_measured) <= 0.2 * greatest(c.rows_measured, 1);
END;
