-- The curve pgsim.calibrate measured for this column's HNSW index, while it still describes the table; NULL
-- when there is none, or when it is stale: the index is not the one measured (rebuilt, replaced), or the
-- table's row count (pg_class.reltuples, which ANALYZE and autovacuum keep) is more than a fifth away from
-- the rows counted when it was measured. (The statistics collector's counters are no better guide: another
-- session's writes reach them late, and an ANALYZE resets the live count they are added to.) A stale curve
-- is not trusted: the planner's defaults stand until the table is calibrated again.
-- Its names are bound when the installer creates it, with search_path pg_catalog, pg_temp (pgsim.db.sqlfiles).
CREATE OR REPLACE FUNCTION pgsim.knn_calibration(tbl regclass, attnum smallint, index regclass) RETURNS jsonb
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT c.measured
    FROM pgsim.calibration c
    JOIN pg_catalog.pg_class t ON t.oid = c.table_oid
    WHERE c.table_oid = tbl AND c.column_attnum = attnum AND c.kind = 'knn' AND c.index_oid = index
      AND t.reltuples >= 0 AND abs(t.reltuples - c.rows_measured) <= 0.2 * greatest(c.rows_measured, 1);
END;
