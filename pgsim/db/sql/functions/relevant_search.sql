-- The relevance threshold, for SQL users (pgsim.relevant_search in Python): the rows among the k nearest to
-- query that pass filter whose score, their cosine similarity minus the similarity of the query's
-- reference-th nearest row that passes filter (the last of them when fewer pass), is at least min_score;
-- nearest first, none when no row stands out. One pgsim.knn search of reference rows, so the reference keeps
-- the filtered-search contract (and its path, settings and fallback). min_score NULL (the default): the
-- threshold pgsim.quality.relevance_calibration stored for this table, column and reference in
-- pgsim.calibration (kind 'relevance') while it is fresh (the table changed by at most a fifth of its rows
-- since, as pgsim.knn_calibration judges), else Python's pgsim.quality.relevance.DEFAULT_MIN_SCORE,
-- measured by bench/quality.py. filter is read as pgsim.knn reads it.
--   SELECT p.package, r.score
--   FROM pgsim.relevant_search('packages', 'embedding', $1, 5, filter => $$section = 'libs'$$) AS r,
--        jsonb_populate_record(NULL::packages, r.row) AS p;
CREATE OR REPLACE FUNCTION pgsim.relevant_search(
    tbl regclass,
    col name,
    query @extschema:vector@.vector,
    k integer DEFAULT 10,
    min_score double precision DEFAULT NULL,
    reference integer DEFAULT 50,
    filter text DEFAULT NULL,
    exact_below_rows double precision DEFAULT 1000,
    hnsw_ef_search integer DEFAULT 200,
    min_hnsw_selectivity double precision DEFAULT 0.5
) RETURNS TABLE ("row" jsonb, distance double precision, score double precision)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cut double precision := min_score;
BEGIN
    IF min_score IS NOT NULL AND NOT (min_score >= 0 AND min_score <= 2) THEN  -- NaN sorts above 2
        RAISE EXCEPTION 'pgsim.relevant_search: min_score is a margin of cosine similarity from 0 to 2; got %',
            min_score USING ERRCODE = 'invalid_parameter_value', HINT = 'The default, 0.27, was measured on real data.';
    END IF;
    IF k IS NULL OR k < 1 OR k > 10000 THEN
        RAISE EXCEPTION 'pgsim.relevant_search: k must be from 1 to 10000; got %', k
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF reference IS NULL OR reference <= k OR reference > 10000 THEN
        RAISE EXCEPTION 'pgsim.relevant_search: reference must be above k (%) and at most 10000; got %', k, reference
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cut IS NULL THEN
        SELECT (c.measured -> 'min_score' ->> reference::text)::double precision INTO cut
        FROM pgsim.calibration c
        JOIN pg_catalog.pg_class t ON t.oid = c.table_oid
        JOIN pg_catalog.pg_attribute a ON a.attrelid = c.table_oid AND a.attnum = c.column_attnum
        LEFT JOIN pg_catalog.pg_stat_all_tables s ON s.relid = c.table_oid AND NOT pg_catalog.pg_is_in_recovery()
        WHERE c.table_oid = tbl AND a.attname = col AND c.kind = 'relevance'
          AND (t.reltuples < 0 OR abs(t.reltuples - c.rows_measured) <= 0.2 * greatest(c.rows_measured, 1))
          AND (s.relid IS NULL OR c.changes_measured IS NULL OR s.n_tup_ins + s.n_tup_del < c.changes_measured
               OR s.n_tup_ins + s.n_tup_del - c.changes_measured <= 0.2 * greatest(c.rows_measured, 1));
        cut := coalesce(cut, 0.27);
    END IF;
    RETURN QUERY
    SELECT h.hit, h.hit_distance, h.floor - h.hit_distance
    FROM (
        SELECT r.row AS hit, r.distance AS hit_distance, r.position, max(r.distance) OVER () AS floor
        FROM pgsim.knn(tbl, col, query, reference, filter, exact_below_rows, hnsw_ef_search, min_hnsw_selectivity)
             WITH ORDINALITY AS r ("row", distance, position)
    ) AS h
    WHERE h.position <= k AND h.floor - h.hit_distance >= cut
    ORDER BY h.position;
END
$$;
COMMENT ON FUNCTION pgsim.relevant_search(regclass, name, @extschema:vector@.vector, integer, double precision, integer, text, double precision, integer, double precision) IS
    'The rows among the k nearest (passing filter) whose similarity is at least min_score above the reference-th '
    'nearest row''s, as (row jsonb, distance, score), nearest first; none when no row stands out. min_score NULL: '
    'the table''s calibrated threshold when fresh, else 0.27.';
