-- pgsim.knn_plan, applied: the chosen settings are set with set_config(..., is_local => true), so they last
-- until the end of the current transaction and touch no other session.
CREATE OR REPLACE FUNCTION pgsim.prepare_knn(
    tbl regclass,
    col name,
    k integer,
    filter text DEFAULT NULL,
    exact_below_rows double precision DEFAULT 1000,
    hnsw_ef_search integer DEFAULT 200,
    min_hnsw_selectivity double precision DEFAULT 0.5,
    recall double precision DEFAULT 0.99
) RETURNS pgsim.knn_plan
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    plan pgsim.knn_plan := pgsim.knn_plan(tbl, col, k, filter, exact_below_rows, hnsw_ef_search, min_hnsw_selectivity, recall);
BEGIN
    IF plan.path = 'exact' THEN
        PERFORM set_config('enable_indexscan', 'off', true);
    ELSE
        PERFORM set_config('enable_indexscan', 'on', true),
                set_config('hnsw.iterative_scan', 'relaxed_order', true),
                set_config('hnsw.ef_search', plan.ef_search::text, true),
                set_config('hnsw.max_scan_tuples', plan.max_scan_tuples::text, true);
    END IF;
    RETURN plan;
END;
$$;
COMMENT ON FUNCTION pgsim.prepare_knn(regclass, name, integer, text, double precision, integer, double precision, double precision) IS
    'pgsim.knn_plan, applied to the current transaction with SET LOCAL semantics. Run the search in the same '
    'transaction; on the hnsw path re-sort its rows (relaxed order): '
    'WITH r AS MATERIALIZED (SELECT ..., col <=> q AS distance ... ORDER BY col <=> q LIMIT k) '
    'SELECT * FROM r ORDER BY distance.';
