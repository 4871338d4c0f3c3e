-- Filtered k-nearest-neighbour search that returns k rows when k rows match.
--
-- pgvector's HNSW scan yields at most hnsw.ef_search candidates and the filter runs after it, so a selective
-- filter cuts the result short. pgsim.knn_plan estimates how many rows pass the filter (from the planner's
-- statistics) and picks a path:
--   exact  - the filter first (by whatever index serves it), then distances for the matching rows only;
--   hnsw   - the HNSW index with iterative scan (relaxed order: re-sort the k rows afterwards), ef_search
--            and max_scan_tuples sized so that the scan expects to meet k matching rows.
-- pgsim.prepare_knn applies the chosen settings with set_config(..., is_local => true): they last until the
-- end of the current transaction and touch no other session.

CREATE TYPE pgsim.knn_plan AS (
    path text,                  -- 'exact' or 'hnsw'
    index_name text,            -- the HNSW index that serves the hnsw path (NULL for exact)
    estimated_rows double precision,  -- rows estimated to pass the filter
    indexed_rows double precision,    -- rows the index holds (a partial index holds fewer than the table)
    selectivity double precision,     -- estimated_rows / indexed_rows
    ef_search integer,
    max_scan_tuples integer,
    reason text
);

CREATE FUNCTION pgsim.estimate_rows(tbl regclass, filter text DEFAULT NULL) RETURNS double precision
LANGUAGE plpgsql VOLATILE  -- PostgreSQL allows EXPLAIN only in volatile functions
AS $$
DECLARE
    plan json;
BEGIN
    EXECUTE format('EXPLAIN (FORMAT JSON) SELECT 1 FROM %s WHERE %s', tbl, coalesce(nullif(filter, ''), 'true'))
        INTO plan;
    RETURN (plan -> 0 -> 'Plan' ->> 'Plan Rows')::double precision;
END;
$$;
COMMENT ON FUNCTION pgsim.estimate_rows(regclass, text) IS
    'The planner''s estimate of the rows of tbl that pass filter (an SQL boolean expression over tbl).';

-- An index built for pgsim (pgsim index-advise) carries the ef_search it was measured to need in its
-- comment, 'pgsim: ef_search=N'; other indexes get the caller's default.
CREATE FUNCTION pgsim.index_ef_search(index regclass, default_ef integer) RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE
RETURN coalesce(substring(obj_description(index, 'pg_class') FROM 'pgsim: ef_search=([0-9]+)')::integer, default_ef);

CREATE FUNCTION pgsim.knn_plan(
    tbl regclass,
    col name,
    k integer,
    filter text DEFAULT NULL,
    exact_below_rows double precision DEFAULT 1000,
    hnsw_ef_search integer DEFAULT 200,
    min_hnsw_selectivity double precision DEFAULT 0.5
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
    vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                           JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF k IS NULL OR k < 1 THEN
        RAISE EXCEPTION 'pgsim.knn_plan: k must be at least 1, got %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT a.attnum, a.atttypmod, a.atttypid::regtype::text INTO attnum, dimension, column_type FROM pg_attribute a
    WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
    IF attnum IS NULL THEN
        RAISE EXCEPTION 'pgsim.knn_plan: table % has no column %', tbl, quote_ident(col)
            USING ERRCODE = 'undefined_column';
    END IF;
    result.estimated_rows := pgsim.estimate_rows(tbl, filter);

    -- HNSW indexes for cosine distance on this column. A partial one serves the query only when the filter
    -- implies its predicate, which the planner decides: when there is one, ask the planner which index it
    -- would scan, with every other way to produce the order switched off (and restored after).
    SELECT array_agg(i.indexrelid::regclass::text ORDER BY i.indpred IS NULL, c.relpages) FILTER (WHERE i.indpred IS NOT NULL),
           min(i.indexrelid::regclass::text) FILTER (WHERE i.indpred IS NULL)
      INTO partial_names, full_name
    FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_am am ON am.oid = c.relam
    JOIN pg_opclass oc ON oc.oid = i.indclass[0]
    WHERE i.indrelid = tbl AND am.amname = 'hnsw' AND i.indkey[0] = attnum AND i.indisvalid
      AND oc.opcname LIKE '%cosine%';
    result.index_name := full_name;
    IF partial_names IS NOT NULL THEN
        -- Plan with the ef_search the search will run with: pgvector's cost grows with it, and at a higher
        -- ef_search the planner can prefer the full index to a partial one (seen: m=24 partial, ef 200).
        saved := ARRAY[current_setting('enable_seqscan'), current_setting('enable_bitmapscan'),
                       current_setting('enable_sort'), current_setting('enable_incremental_sort'),
                       current_setting('hnsw.ef_search', true)];
        PERFORM set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true),
                set_config('enable_sort', 'off', true), set_config('enable_incremental_sort', 'off', true),
                set_config('hnsw.ef_search', least(greatest(
                    (SELECT min(pgsim.index_ef_search(name::regclass, hnsw_ef_search)) FROM unnest(partial_names) AS name),
                    2 * k), 1000)::text, true);
        -- any vector will do for planning; NULL would not (the planner folds ORDER BY NULL away)
        EXECUTE format('EXPLAIN (FORMAT JSON) SELECT 1 FROM %s WHERE %s ORDER BY %I OPERATOR(%s.<=>) '
                       'array_fill(1::real, ARRAY[%s])::%s LIMIT %s',
                       tbl, coalesce(nullif(filter, ''), 'true'), col, vector_schema, dimension, column_type, k)
            INTO plan;
        PERFORM set_config('enable_seqscan', saved[1], true), set_config('enable_bitmapscan', saved[2], true),
                set_config('enable_sort', saved[3], true), set_config('enable_incremental_sort', saved[4], true),
                set_config('hnsw.ef_search', coalesce(saved[5], '40'), true);
        FOREACH candidate IN ARRAY partial_names LOOP
            IF position(('"Index Name": ' || to_json(split_part(candidate, '.', -1))::text) IN plan::text) > 0 THEN
                result.index_name := candidate;
                SELECT pg_get_expr(i.indpred, i.indrelid) INTO predicate FROM pg_index i
                WHERE i.indexrelid = candidate::regclass;
                EXIT;
            END IF;
        END LOOP;
    END IF;

    IF result.index_name IS NULL THEN
        result.path := 'exact';
        result.reason := format('no valid HNSW index with cosine ops on %s.%I serves this filter', tbl, col);
        RETURN result;
    END IF;
    IF predicate IS NULL THEN
        SELECT CASE WHEN c.reltuples >= 0 THEN c.reltuples END INTO total_rows FROM pg_class c WHERE c.oid = tbl;
    END IF;
    result.indexed_rows := greatest(coalesce(total_rows, pgsim.estimate_rows(tbl, predicate)), 1);
    result.selectivity := least(result.estimated_rows / result.indexed_rows, 1);
    visits := k / greatest(result.selectivity, 1e-9);

    IF result.estimated_rows <= exact_below_rows THEN
        result.path := 'exact';
        result.reason := format('about %s rows pass the filter: computing their distances is cheap and exact',
                                round(result.estimated_rows));
    ELSIF result.selectivity < min_hnsw_selectivity THEN
        -- Measured on 63k Debian descriptions: an iterative HNSW scan that must skip most of the graph misses
        -- neighbours (recall@10 0.95-0.97 at 10-15% selectivity even at ef_search 200), so below this
        -- share the exact path keeps the contract; a partial index for the value (pgsim index-advise)
        -- brings such filters back to the fast path.
        result.path := 'exact';
        result.reason := format('the filter keeps %s%% of the rows %s indexes: too few for an approximate walk to '
                                'stay accurate; a partial HNSW index for this filter would serve it (pgsim index-advise)',
                                round((result.selectivity * 100)::numeric, 2), result.index_name);
    ELSE
        visits := k / result.selectivity;
        result.path := 'hnsw';
        result.ef_search := least(greatest(pgsim.index_ef_search(result.index_name::regclass, hnsw_ef_search), 2 * k), 1000);
        result.max_scan_tuples := least(greatest(20000, ceil(visits * 20)), 2000000000)::integer;
        result.reason := format('the filter keeps %s%% of the rows %s indexes: iterative HNSW scan',
                                round((result.selectivity * 100)::numeric, 2), result.index_name);
    END IF;
    RETURN result;
END;
$$;
COMMENT ON FUNCTION pgsim.knn_plan(regclass, name, integer, text, double precision, integer, double precision) IS
    'How to answer "the k rows of tbl nearest by col <=> q that pass filter": exact scan or HNSW with which settings.';

CREATE FUNCTION pgsim.prepare_knn(
    tbl regclass,
    col name,
    k integer,
    filter text DEFAULT NULL,
    exact_below_rows double precision DEFAULT 1000,
    hnsw_ef_search integer DEFAULT 200,
    min_hnsw_selectivity double precision DEFAULT 0.5
) RETURNS pgsim.knn_plan
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    plan pgsim.knn_plan := pgsim.knn_plan(tbl, col, k, filter, exact_below_rows, hnsw_ef_search, min_hnsw_selectivity);
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
COMMENT ON FUNCTION pgsim.prepare_knn(regclass, name, integer, text, double precision, integer, double precision) IS
    'pgsim.knn_plan, applied to the current transaction with SET LOCAL semantics. Run the search in the same '
    'transaction; on the hnsw path re-sort its rows (relaxed order): '
    'WITH r AS MATERIALIZED (SELECT ..., col <=> q AS distance ... ORDER BY col <=> q LIMIT k) '
    'SELECT * FROM r ORDER BY distance.';

-- The whole filtered search in one statement, for SQL users:
--   SELECT p.*, r.distance
--   FROM pgsim.knn('packages', 'embedding', $1, 10, $$section = 'libs'$$) AS r,
--        jsonb_populate_record(NULL::packages, r.row) AS p;
-- It plans, applies the settings, runs the query with EXECUTE (planned afresh every call, so no cached plan
-- from other settings is reused), re-sorts relaxed-order rows, falls back to an exact scan if the HNSW path
-- comes up short, and restores the settings it changed. Runs with the caller's rights (row-level security
-- holds). query is compared with col's type (vector or halfvec).
CREATE TYPE pgsim.knn_hit AS (row jsonb, distance double precision);

CREATE FUNCTION pgsim.knn(
    tbl regclass,
    col name,
    query vector,
    k integer,
    filter text DEFAULT NULL,
    exact_below_rows double precision DEFAULT 1000,
    hnsw_ef_search integer DEFAULT 200,
    min_hnsw_selectivity double precision DEFAULT 0.5
) RETURNS SETOF pgsim.knn_hit
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    settings text[] := ARRAY['enable_indexscan', 'hnsw.iterative_scan', 'hnsw.ef_search', 'hnsw.max_scan_tuples'];
    saved text[] := ARRAY(SELECT current_setting(name, true) FROM unnest(settings) AS name);
    plan pgsim.knn_plan := pgsim.prepare_knn(tbl, col, k, filter, exact_below_rows, hnsw_ef_search,
                                             min_hnsw_selectivity);
    column_type text := (SELECT a.atttypid::regtype::text FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = col);
    vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                           JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
    search text;
    explained json;
    hits pgsim.knn_hit[];
BEGIN
    -- The k nearest by ctid first, then their rows as jsonb: to_jsonb on every candidate of a top-N sort
    -- cost 10x the search itself.
    search := format(
        'SELECT array_agg((to_jsonb(t) - %L, found.distance)::pgsim.knn_hit ORDER BY found.distance) FROM ('
        'SELECT s.ctid AS id, s.%I OPERATOR(%s.<=>) $1::%s AS distance FROM %s AS s WHERE %s '
        'ORDER BY s.%I OPERATOR(%s.<=>) $1::%s LIMIT $2) AS found JOIN %s AS t ON t.ctid = found.id',
        col, col, vector_schema, column_type, tbl, coalesce(nullif(filter, ''), 'true'),
        col, vector_schema, column_type, tbl);
    IF plan.path = 'hnsw' THEN
        -- The planner picks the index when the search runs; if it would order the rows by another HNSW
        -- index than the one planned for (pgvector's costs move with ef_search), the filter may be narrow
        -- there and the walk lose recall: scan exactly instead.
        EXECUTE 'EXPLAIN (FORMAT JSON) ' || search INTO explained USING query, k;
        IF position('"Order By"' IN explained::text) > 0
           AND position(('"Index Name": ' || to_json(split_part(plan.index_name, '.', -1))::text) IN explained::text) = 0
        THEN
            plan.path := 'exact';
            PERFORM set_config('enable_indexscan', 'off', true);
        END IF;
    END IF;
    EXECUTE search INTO hits USING query, k;
    IF coalesce(array_length(hits, 1), 0) < k AND plan.path = 'hnsw' THEN
        PERFORM set_config('enable_indexscan', 'off', true);
        EXECUTE search INTO hits USING query, k;
    END IF;
    FOR i IN 1 .. array_length(settings, 1) LOOP
        IF saved[i] IS NOT NULL THEN
            PERFORM set_config(settings[i], saved[i], true);
        END IF;
    END LOOP;
    RETURN QUERY SELECT * FROM unnest(hits);
END;
$$;
COMMENT ON FUNCTION pgsim.knn(regclass, name, vector, integer, text, double precision, integer, double precision) IS
    'The k rows of tbl nearest to query by col <=> query that pass filter, as (row jsonb, distance), nearest '
    'first; k rows whenever k rows match. The settings it changes are restored before it returns.';
