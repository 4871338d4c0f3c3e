-- Filtered k-nearest-neighbour search that returns k rows when k rows match.
--
-- pgvector's HNSW scan yields at most hnsw.ef_search candidates and the filter runs after it, so a selective
-- filter cuts the result short. pgsim.knn_plan estimates how many rows pass the filter (from the planner's
-- statistics) and picks a path:
--   exact  - the filter first (by whatever index serves it), then distances for the matching rows only;
--   hnsw   - the HNSW index with iterative scan (relaxed order: re-sort the k rows afterwards), ef_search
--            and max_scan_tuples sized so that the scan expects to meet k matching rows.
-- Where pgsim.calibrate measured the column's index (pgsim.knn_calibration: fresh, same index), the measured
-- curve decides instead of the fixed thresholds: the hnsw path with the smallest ef_search whose recall@k
-- reached `recall` at the measured selectivity next below this filter's, when it was faster than the exact
-- scan there; else the exact path.
-- It runs on the caller's search_path (the filter is the caller's SQL), so every operator it applies has
-- operands of exactly the types of pg_catalog's (tbl::pg_catalog.oid, never oid = regclass): an operator
-- another role made for the looser types in a schema on that path would be an exact match, and win.
CREATE OR REPLACE FUNCTION pgsim.knn_plan(
    tbl regclass,
    col name,
    k integer,
    filter text DEFAULT NULL,
    exact_below_rows double precision DEFAULT 1000,
    hnsw_ef_search integer DEFAULT 200,
    min_hnsw_selectivity double precision DEFAULT 0.5,
    recall double precision DEFAULT 0.99
) RETURNS pgsim.knn_plan
LANGUAGE plpgsql VOLATILE  -- it toggles planner settings around an EXPLAIN, and restores them
AS $$
DECLARE
    result pgsim.knn_plan;
    attnum smallint;
    dimension integer;
    column_type text;
    partial_names text[];
    full_name text;
    candidate text;
    predicate text;
    saved text[];
    plan json;
    visits double precision;
    total_rows double precision;
    calibrated record;
    reranked boolean := false;
    vector_schema text := (SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e
                           JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF k IS NULL OR k < 1 OR k > 10000 THEN  -- pgsim.knn.target.MAX_K
        RAISE EXCEPTION 'pgsim.knn_plan: k must be from 1 to 10000, got %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF recall IS NULL OR NOT recall > 0::double precision OR recall > 1::double precision THEN
        RAISE EXCEPTION 'pgsim.knn_plan: recall is a target from 0 (exclusive) to 1, got %', recall
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT a.attnum, a.atttypmod, a.atttypid::regtype::text INTO attnum, dimension, column_type FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = tbl::pg_catalog.oid AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
    IF attnum IS NULL THEN
        RAISE EXCEPTION 'pgsim.knn_plan: table % has no column %', tbl, pg_catalog.quote_ident(col)
            USING ERRCODE = 'undefined_column';
    END IF;
    result.estimated_rows := pgsim.estimate_rows(tbl, filter);

    -- HNSW indexes for cosine distance on this column. A partial one serves the query only when the filter
    -- implies its predicate, which the planner decides: when there is one, ask the planner which index it
    -- would scan, with every other way to produce the order switched off (and restored after).
    SELECT pg_catalog.array_agg(i.indexrelid::regclass::text ORDER BY i.indpred IS NULL, c.relpages) FILTER (WHERE i.indpred IS NOT NULL),
           (pg_catalog.array_agg(i.indexrelid::regclass::text ORDER BY c.relname COLLATE "C") FILTER (WHERE i.indpred IS NULL))[1]
      INTO partial_names, full_name
    FROM pg_catalog.pg_index i
    JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
    JOIN pg_catalog.pg_am am ON am.oid = c.relam
    JOIN pg_catalog.pg_opclass oc ON oc.oid = i.indclass[0]
    WHERE i.indrelid = tbl::pg_catalog.oid AND am.amname = 'hnsw'::pg_catalog.name AND i.indkey[0] = attnum
      AND i.indisvalid AND oc.opcname LIKE '%cosine%'::pg_catalog.text;
    IF full_name IS NULL THEN
        -- bit or prefix storage: candidates re-ranked exactly (a partial cosine index, if the planner takes it
        -- for this filter below, is walked instead)
        full_name := pgsim.reranked_index(tbl, col);
        reranked := full_name IS NOT NULL;
    END IF;
    result.index_name := full_name;
    IF partial_names IS NOT NULL THEN
        -- Plan with the ef_search the search will run with: pgvector's cost grows with it, and at a higher
        -- ef_search the planner can prefer the full index to a partial one (seen in bench/filtered.py).
        saved := ARRAY[pg_catalog.current_setting('enable_seqscan'), pg_catalog.current_setting('enable_bitmapscan'),
                       pg_catalog.current_setting('enable_sort'), pg_catalog.current_setting('enable_incremental_sort'),
                       pg_catalog.current_setting('hnsw.ef_search', true)];
        PERFORM pg_catalog.set_config('enable_seqscan', 'off', true), pg_catalog.set_config('enable_bitmapscan', 'off', true),
                pg_catalog.set_config('enable_sort', 'off', true), pg_catalog.set_config('enable_incremental_sort', 'off', true),
                pg_catalog.set_config('hnsw.ef_search', least(greatest(
                    (SELECT pg_catalog.min(pgsim.index_ef_search(name::regclass, hnsw_ef_search)) FROM pg_catalog.unnest(partial_names) AS name),
                    2 * k), 1000)::text, true);
        -- any vector will do for planning; NULL would not (the planner folds ORDER BY NULL away)
        -- one statement only (see pgsim.estimate_rows)
        FOR plan IN EXECUTE pg_catalog.format('EXPLAIN (FORMAT JSON) SELECT 1 FROM %s WHERE %s ORDER BY %I OPERATOR(%s.<=>) '
                                   'pg_catalog.array_fill(1::real, ARRAY[%s])::%s LIMIT %s',
                                   tbl, coalesce(nullif(filter, ''), 'true'), col, vector_schema, dimension,
                                   column_type, k)
        LOOP
        END LOOP;
        PERFORM pg_catalog.set_config('enable_seqscan', saved[1], true), pg_catalog.set_config('enable_bitmapscan', saved[2], true),
                pg_catalog.set_config('enable_sort', saved[3], true), pg_catalog.set_config('enable_incremental_sort', saved[4], true),
                pg_catalog.set_config('hnsw.ef_search', coalesce(saved[5], '40'), true);
        FOREACH candidate IN ARRAY partial_names LOOP
            IF position(('"Index Name": ' || pg_catalog.to_json(pg_catalog.split_part(candidate, '.', -1))::text) IN plan::text) > 0 THEN
                result.index_name := candidate;
                reranked := false;
                SELECT pg_catalog.pg_get_expr(i.indpred, i.indrelid) INTO predicate FROM pg_catalog.pg_index i
                WHERE i.indexrelid = candidate::pg_catalog.regclass::pg_catalog.oid;
                EXIT;
            END IF;
        END LOOP;
    END IF;

    IF result.index_name IS NULL THEN
        result.path := 'exact';
        result.reason := pg_catalog.format('no valid HNSW index with cosine ops on %s.%I serves this filter', tbl, col);
        RETURN result;
    END IF;
    IF predicate IS NULL THEN
        SELECT CASE WHEN c.reltuples >= 0::real THEN c.reltuples END INTO total_rows FROM pg_catalog.pg_class c WHERE c.oid = tbl::pg_catalog.oid;
        -- a partitioned table: the rows of the partitions the filter leaves (partition pruning), which the
        -- search's scan walks, are what the filter's share is of: a filter on the partition key keeps 100 %
        IF (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = tbl::pg_catalog.oid) = 'p'::"char" THEN
            FOR plan IN EXECUTE pg_catalog.format('EXPLAIN (FORMAT JSON, VERBOSE) SELECT 1 FROM %s WHERE %s', tbl,
                                                  coalesce(nullif(filter, ''), 'true'))
            LOOP
            END LOOP;
            SELECT pg_catalog.sum(GREATEST(c.reltuples, 0::real)) INTO total_rows
            FROM pg_catalog.jsonb_path_query(plan::pg_catalog.jsonb, 'strict $.**'::pg_catalog.jsonpath) AS node(value)
            JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(pg_catalog.format('%I.%I',
                pg_catalog.jsonb_extract_path_text(node.value, 'Schema'::pg_catalog.text),
                pg_catalog.jsonb_extract_path_text(node.value, 'Relation Name'::pg_catalog.text)))::pg_catalog.oid
            WHERE pg_catalog.jsonb_typeof(node.value) = 'object'::pg_catalog.text
              AND pg_catalog.jsonb_extract_path_text(node.value, 'Relation Name'::pg_catalog.text) IS NOT NULL;
        END IF;
    END IF;
    result.indexed_rows := greatest(coalesce(total_rows, pgsim.estimate_rows(tbl, predicate)), 1);
    result.selectivity := least(result.estimated_rows / result.indexed_rows, 1);
    visits := k::double precision / greatest(result.selectivity, 1e-9::double precision);

    -- a partial index's selectivity is relative to its own rows: no curve of the full index speaks for it
    SELECT * INTO calibrated FROM pgsim.calibrated_plan(tbl, attnum, CASE WHEN predicate IS NULL THEN result.index_name::regclass END,
                                                        result.selectivity, k, recall);
    result.expected_recall := 1;  -- until the hnsw path is taken

    IF result.estimated_rows <= exact_below_rows THEN
        result.path := 'exact';
        result.reason := pg_catalog.format('about %s rows pass the filter: computing their distances is cheap and exact',
                                pg_catalog.round(result.estimated_rows));
    ELSIF calibrated.path IS NOT NULL THEN
        result.path := calibrated.path;
        result.ef_search := calibrated.ef_search;
        result.max_scan_tuples := calibrated.max_scan_tuples;
        result.expected_recall := calibrated.expected_recall;
        result.reason := calibrated.reason;
    ELSIF result.selectivity < min_hnsw_selectivity THEN
        -- Measured by bench/filtered.py: an iterative HNSW scan that must skip most of the graph misses
        -- neighbours even at a high ef_search, so below this share the exact path keeps the contract; a
        -- partial index for the value (pgsim index-advise) brings such filters back to the fast path.
        result.path := 'exact';
        result.reason := pg_catalog.format('the filter keeps %s%% of the rows %s indexes: too few for an approximate walk to '
                                'stay accurate; a partial HNSW index for this filter would serve it (pgsim index-advise)',
                                pg_catalog.round((result.selectivity * 100::double precision)::numeric, 2), result.index_name);
    ELSE
        visits := k::double precision / result.selectivity;
        result.path := 'hnsw';
        result.expected_recall := NULL;  -- not measured
        -- on a bit or prefix index the walk's ef_search candidates are re-ranked: at the same ef_search they
        -- recall less than a full cosine index's walk, and twice as many about as much (bench/scale.py); for a
        -- large k, four candidates per row kept (two recalled about three in four, tests/knn)
        result.ef_search := least(greatest(pgsim.index_ef_search(result.index_name::regclass, hnsw_ef_search)
                                           * CASE WHEN reranked THEN 2 ELSE 1 END,
                                           CASE WHEN reranked THEN 4 ELSE 2 END * k), 1000);
        result.max_scan_tuples := least(greatest(20000, pg_catalog.ceil(visits * 20::double precision)), 2000000000)::integer;
        result.reason := pg_catalog.format('the filter keeps %s%% of the rows %s indexes: iterative HNSW scan',
                                pg_catalog.round((result.selectivity * 100::double precision)::numeric, 2), result.index_name);
    END IF;
    RETURN result;
END;
$$;
COMMENT ON FUNCTION pgsim.knn_plan(regclass, name, integer, text, double precision, integer, double precision, double precision) IS
    'How to answer "the k rows of tbl nearest by col <=> q that pass filter": exact scan or HNSW with which settings.';
