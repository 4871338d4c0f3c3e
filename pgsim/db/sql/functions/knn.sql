-- The whole filtered search in one statement, for SQL users:
--   SELECT p.*, r.distance
--   FROM pgsim.knn('packages', 'embedding', $1, 10, $$section = 'libs'$$) AS r,
--        jsonb_populate_record(NULL::packages, r.row) AS p;
-- It plans, applies the settings, runs the query with EXECUTE (planned afresh every call, so no cached plan
-- from other settings is reused), re-sorts relaxed-order rows, falls back to an exact scan if the HNSW path
-- comes up short, and restores the settings it changed. Runs with the caller's rights (row-level security
-- holds). query is compared with col's type (vector or halfvec). Rows whose embedding is still NULL
-- (waiting for the worker) are left out: the index never returns them, and the exact scan must not either.
-- On a chunked embedding it returns documents, each once, by its nearest chunk (pgsim.knn_documents).
-- The filter is read with this function's search_path, pg_catalog, pg_temp: a function, type or table of
-- your own in it must be schema-qualified (public.f(x)), as public is not on that path.
CREATE OR REPLACE FUNCTION pgsim.knn(
    tbl regclass,
    col name,
    query @extschema:vector@.vector,
    k integer,
    filter text DEFAULT NULL,
    exact_below_rows double precision DEFAULT 1000,
    hnsw_ef_search integer DEFAULT 200,
    min_hnsw_selectivity double precision DEFAULT 0.5,
    recall double precision DEFAULT 0.99
) RETURNS SETOF pgsim.knn_hit
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    settings text[] := ARRAY['enable_indexscan', 'hnsw.iterative_scan', 'hnsw.ef_search', 'hnsw.max_scan_tuples',
                             'enable_sort'];
    saved text[] := ARRAY(SELECT current_setting(name, true) FROM unnest(settings) AS name);
    plan pgsim.knn_plan;
    column_type text := (SELECT a.atttypid::regtype::text FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = col);
    vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                           JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
    search text;
    exact_search text;
    candidates text;
    prefix integer;
    explained json;
    hits pgsim.knn_hit[];
BEGIN
    IF query IS NULL OR @extschema:vector@.vector_norm(query) = 0 THEN
        RAISE EXCEPTION 'pgsim.knn: the query vector is %', CASE WHEN query IS NULL THEN 'NULL' ELSE 'all zeros' END
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the embedding of the query text; a zero vector has no cosine distance to anything.';
    END IF;
    -- a chunked embedding: k documents by their chunks (pgsim.knn_documents says how), with its own thresholds
    -- (documents, not rows: call pgsim.knn_documents to set them)
    IF EXISTS (SELECT FROM pgsim.chunking c JOIN pgsim.embedding e ON e.id = c.embedding_id
               WHERE e.table_oid = tbl::oid AND e.column_name = col) THEN
        RETURN QUERY SELECT d.row, d.distance FROM pgsim.knn_documents(tbl, col, query, k, filter) AS d;
        RETURN;
    END IF;
    plan := pgsim.prepare_knn(tbl, col, k, filter, exact_below_rows, hnsw_ef_search, min_hnsw_selectivity, recall);
    -- The k nearest by (tableoid, ctid) first (a partitioned table's partitions each number their rows from the
    -- start), then their rows as jsonb: to_jsonb on every candidate of a top-N sort
    -- cost more than the search itself (bench/filtered.py).
    exact_search := format(
        'SELECT array_agg((to_jsonb(t) - %L, found.distance)::pgsim.knn_hit ORDER BY found.distance) FROM ('
        'SELECT s.tableoid AS rel, s.ctid AS id, s.%I OPERATOR(%s.<=>) $1::%s AS distance FROM %s AS s '
        'WHERE (%s) AND s.%I IS NOT NULL ORDER BY s.%I OPERATOR(%s.<=>) $1::%s LIMIT $2) AS found '
        'JOIN %s AS t ON t.tableoid = found.rel AND t.ctid = found.id',
        col, col, vector_schema, column_type, tbl, coalesce(nullif(filter, ''), 'true'), col,
        col, vector_schema, column_type, tbl);
    search := exact_search;
    IF plan.path = 'hnsw' AND plan.index_name::regclass = pgsim.reranked_index(tbl, col)::regclass THEN
        -- binary-quantised or prefix storage: the walk yields $3 (ef_search) candidates by Hamming distance
        -- over the bit index, or by cosine distance over the prefix index; they are re-ranked by cosine
        -- distance on the full vectors, and the k nearest kept
        prefix := pgsim.index_prefix(tbl, col);
        candidates := format(
            'SELECT s.tableoid AS rel, s.ctid AS id, s.%1$I OPERATOR(%2$s.<=>) $1::%3$s AS distance FROM %4$s AS s '
            'WHERE (%5$s) AND s.%1$I IS NOT NULL %7$s ORDER BY %6$s LIMIT $3',
            col, vector_schema, column_type, tbl, coalesce(nullif(filter, ''), 'true'),
            CASE WHEN prefix IS NULL THEN format(
                     '(%1$s.binary_quantize(s.%2$I))::bit(%3$s) OPERATOR(%1$s.<~>) (%1$s.binary_quantize($1))::bit(%3$s)',
                     vector_schema, col, (SELECT a.atttypmod FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = col))
                 ELSE format(
                     '(%1$s.subvector(s.%2$I, 1, %3$s))::%1$s.vector(%3$s) OPERATOR(%1$s.<=>) '
                     '(%1$s.subvector($1, 1, %3$s))::%1$s.vector(%3$s)', vector_schema, col, prefix) END,
            -- a query whose prefix is all zero has no prefix distance: the walk yields nothing, the exact scan follows
            CASE WHEN prefix IS NOT NULL THEN format('AND %1$s.vector_norm(%1$s.subvector($1, 1, %2$s)) > 0',
                                                     vector_schema, prefix) ELSE '' END);
        search := format(
            'SELECT array_agg((to_jsonb(t) - %L, found.distance)::pgsim.knn_hit ORDER BY found.distance) FROM ('
            'SELECT c.rel, c.id, c.distance FROM (%s) AS c ORDER BY c.distance LIMIT $2) AS found '
            'JOIN %s AS t ON t.tableoid = found.rel AND t.ctid = found.id',
            col, candidates, tbl);
        -- a sort by Hamming or prefix distance in place of the walk would re-rank approximate candidates
        PERFORM set_config('enable_sort', 'off', true);
    END IF;
    IF plan.path = 'hnsw' THEN
        -- The planner picks the index when the search runs; if it would order the rows by another HNSW
        -- index than the one planned for (pgvector's costs move with ef_search), the filter may be narrow
        -- there and the walk lose recall: scan exactly instead.
        -- FOR ... IN EXECUTE: one statement only, whatever the filter holds (EXECUTE ... INTO would run a list)
        FOR explained IN EXECUTE 'EXPLAIN (FORMAT JSON) ' || search USING query, k, greatest(k, plan.ef_search) LOOP
        END LOOP;
        -- EXPLAIN names the index by its bare name, unquoted: compare with pg_class's (on a partitioned table,
        -- the planned index's partitions, one per partition, scan)
        -- (a bit or prefix walk's candidates ordered without the index, by a sort, are not exact either)
        IF (position('"Order By"' IN explained::text) > 0 OR search <> exact_search)
           AND NOT EXISTS (SELECT FROM pg_class c
                           WHERE (c.oid = plan.index_name::regclass
                                  OR c.oid IN (SELECT t.relid FROM pg_partition_tree(plan.index_name::regclass) AS t))
                             AND position(('"Index Name": ' || to_json(c.relname))::text IN explained::text) > 0)
        THEN
            plan.path := 'exact';
            search := exact_search;
            PERFORM set_config('enable_indexscan', 'off', true), set_config('enable_sort', saved[5], true);
        END IF;
    END IF;
    FOR hits IN EXECUTE search USING query, k, greatest(k, plan.ef_search) LOOP
    END LOOP;
    IF coalesce(array_length(hits, 1), 0) < k AND plan.path = 'hnsw' THEN
        PERFORM set_config('enable_indexscan', 'off', true), set_config('enable_sort', saved[5], true);
        FOR hits IN EXECUTE exact_search USING query, k LOOP
        END LOOP;
    END IF;
    PERFORM pgsim.restore_settings(settings, saved);
    RETURN QUERY SELECT * FROM unnest(hits);
END;
$$;
COMMENT ON FUNCTION pgsim.knn(regclass, name, @extschema:vector@.vector, integer, text, double precision, integer, double precision, double precision) IS
    'The k rows of tbl nearest to query by col <=> query that pass filter, as (row jsonb, distance), nearest '
    'first; k rows whenever k rows match. The settings it changes are restored before it returns.';
