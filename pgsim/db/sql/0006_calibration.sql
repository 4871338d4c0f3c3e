-- What pgsim measured on a table's own data (pgsim.calibrate): for 'knn', recall and time of the HNSW
-- path against an exact scan over a grid of filter selectivities and ef_search values, which
-- pgsim.knn_plan reads to pick the path and the smallest ef_search that reaches a recall target; for
-- 'relevance' and 'hybrid', the table's own score statistics for relevant_search and hybrid_search.
-- One row per (table, column, kind), replaced whole by each calibration, so an interrupted one leaves the
-- previous row (or none) and never half of a new one.
CREATE TABLE pgsim.calibration (
    table_oid oid NOT NULL,
    column_attnum smallint NOT NULL,
    kind text NOT NULL CHECK (kind IN ('knn', 'relevance', 'hybrid')),
    index_oid oid,  -- 'knn': the HNSW index measured; a rebuilt index (another OID) is not calibrated
    measured jsonb NOT NULL,
    rows_measured double precision NOT NULL,  -- the table's rows when measured (knn_calibration compares)
    changes_measured bigint,  -- rows inserted and deleted by then, as pg_stat_all_tables had heard (for people)
    seconds double precision NOT NULL,
    measured_by oid NOT NULL DEFAULT pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER))::oid,
    measured_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (table_oid, column_attnum, kind)
);
COMMENT ON TABLE pgsim.calibration IS
    'Measured on the table''s own rows by pgsim.calibrate; read by the planner and the relevance functions.';

-- Anyone who may read the table (or a column of it) may read what was measured on it; only its owner (or a member of the
-- owning role) writes, since the planner trusts these curves for every role's searches.
ALTER TABLE pgsim.calibration ENABLE ROW LEVEL SECURITY;
CREATE POLICY calibration_read ON pgsim.calibration FOR SELECT
    USING (pg_catalog.has_any_column_privilege(table_oid, 'SELECT'));
CREATE POLICY calibration_owners ON pgsim.calibration FOR ALL
    USING (pg_catalog.pg_has_role(CURRENT_USER,
        (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = table_oid), 'USAGE'))
    WITH CHECK (pg_catalog.pg_has_role(CURRENT_USER,
        (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = table_oid), 'USAGE')
        AND measured_by = pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER))::oid);

ALTER TYPE pgsim.knn_plan ADD ATTRIBUTE expected_recall double precision;  -- from the calibration; 1 when exact
