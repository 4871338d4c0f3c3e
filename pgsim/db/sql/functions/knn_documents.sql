-- Document-level k-NN over a chunked embedding (pgsim.chunking), for SQL users and pgsim.knn:
--   SELECT d.*, r.distance, r.chunk_no, r.span_start, r.span_end
--   FROM pgsim.knn_documents('docs', 'embedding', $1, 10, $$section = '2'$$) AS r,
--        jsonb_populate_record(NULL::docs, r.row) AS d;
-- The k distinct documents of tbl that pass filter, nearest first, each with its nearest chunk's number and
-- character span in the document's source text (substr(text, span_start + 1, span_end - span_start)); k
-- whenever k documents pass the filter and have chunks. A document's distance is one minus the soft maximum of
-- its chunks' similarities, 0.05 * ln(avg(exp(similarity / 0.05))) over all its chunks: its nearest chunk
-- counts most, and a document about the query throughout ranks above one that touches it once among many. The paths are those of
-- pgsim.knn.documents (Python), which tests hold to the same answers:
--   hnsw  - the nearest `fetch` chunks by the chunk table's index (iterative scan, relaxed order), the nearest
--           chunk of each document, the 50 (or k) documents with the nearest chunks that pass the filter, the k
--           nearest of them by their distance. While fewer than k come back and the scan gave all it was asked,
--           fetch grows x4, up to 20,000; then the exact path.
--   exact - every document that passes the filter with its distance (the chunk table's primary key finds its
--           chunks), the k nearest; taken first when the filter is estimated to keep fewer than
--           exact_below_rows documents, or a share below min_hnsw_selectivity.
-- A document whose vector is NULL (stale = 'hide' after a change of its text, or not embedded yet) is left out,
-- as pgsim.knn leaves such a row out: its chunks are still the old text's. Its row holds the columns the caller
-- may read. Runs with the caller's rights (row-level security on the documents holds for their chunks); the filter is
-- read under this function's search_path, pg_catalog, pg_temp, and may name the table (schema-qualified) or
-- its columns. The settings it changes are restored before it returns.
CREATE OR REPLACE FUNCTION pgsim.knn_documents(
    tbl regclass,
    col name,
    query @extschema:vector@.vector,
    k integer,
    filter text DEFAULT NULL,
    ef_search integer DEFAULT 100,
    exact_below_rows double precision DEFAULT 1000,
    min_hnsw_selectivity double precision DEFAULT 0.05
) RETURNS TABLE ("row" jsonb, distance double precision, chunk_no integer, span_start integer, span_end integer)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    settings text[] := ARRAY['enable_indexscan', 'hnsw.iterative_scan', 'hnsw.ef_search', 'hnsw.max_scan_tuples'];
    saved text[] := ARRAY(SELECT current_setting(name, true) FROM unnest(settings) AS name);
    max_fetch constant integer := 20000;  -- pgsim.knn.documents.MAX_FETCH
    pool integer := greatest(k, 50);  -- pgsim.knn.documents.POOL
    registration pgsim.embedding;
    chunks oid;
    vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                           JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
    condition text := coalesce(nullif(filter, ''), 'true');
    distance_sql text;
    document_sql text;
    pool_match text;
    chunk_keys text;
    best_keys text;
    best_qualified text;
    doc_keys text;
    doc_match text;
    chunk_match text;
    row_sql text;
    total double precision;
    matching double precision;
    selectivity double precision;
    fetch_chunks integer;
    hnsw_sql text;
    exact_sql text;
    candidates bigint;
    hits jsonb;
BEGIN
    IF query IS NULL OR @extschema:vector@.vector_norm(query) = 0 THEN
        RAISE EXCEPTION 'pgsim.knn_documents: the query vector is %', CASE WHEN query IS NULL THEN 'NULL' ELSE 'all zeros' END
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the embedding of the query text; a zero vector has no cosine distance to anything.';
    END IF;
    IF k IS NULL OR k < 1 OR k > 10000 THEN  -- pgsim.knn.target.MAX_K
        RAISE EXCEPTION 'pgsim.knn_documents: k must be from 1 to 10000, got %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT * INTO registration FROM pgsim.embedding e
    WHERE e.table_oid = tbl::oid AND e.column_name = col ORDER BY e.id LIMIT 1;
    IF registration.id IS NULL THEN
        RAISE EXCEPTION 'pgsim.knn_documents: %.% is not a registered embedding', tbl, quote_ident(col)
            USING ERRCODE = 'undefined_object';
    END IF;
    SELECT c.chunk_table INTO chunks FROM pgsim.chunking c WHERE c.embedding_id = registration.id;
    IF chunks IS NULL THEN
        RAISE EXCEPTION 'pgsim.knn_documents: %.% is not chunked', tbl, quote_ident(col)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Search its rows with pgsim.knn.';
    END IF;
    -- the chunk table's owner is the documents' (pgsim.columns.chunking.tables.require_same_owner)
    IF (SELECT c.relowner FROM pg_class c WHERE c.oid = chunks)
       IS DISTINCT FROM (SELECT c.relowner FROM pg_class c WHERE c.oid = tbl::oid) THEN
        RAISE EXCEPTION 'pgsim.knn_documents: the chunk table % of %.% is not owned by the owner of %',
            chunks::regclass, tbl, quote_ident(col), tbl
            USING ERRCODE = 'insufficient_privilege', HINT = 'ALTER TABLE ... OWNER TO the documents'' owner.';
    END IF;
    distance_sql := format('_pgsim_x.embedding OPERATOR(%s.<=>) $1::%s.%I', vector_schema, vector_schema,
                           registration.dtype);
    -- a document's distance: one minus the soft maximum of its chunks' similarities, temperature 0.05
    -- (pgsim.knn.documents.document_distance, TEMPERATURE)
    document_sql := format('1 - 0.05 * ln(avg(exp((1 - (%s)) / 0.05)))', distance_sql);
    SELECT string_agg(format('_pgsim_x.%I AS %I', name, '_pgsim_k' || position), ', ' ORDER BY position),
           string_agg(format('%I', '_pgsim_k' || position), ', ' ORDER BY position),
           string_agg(format('_pgsim_best.%I', '_pgsim_k' || position), ', ' ORDER BY position),
           string_agg(format('%s.%I', tbl, name), ', ' ORDER BY position),
           string_agg(format('%s.%I = _pgsim_best.%I', tbl, name, '_pgsim_k' || position), ' AND ' ORDER BY position),
           string_agg(format('_pgsim_x.%I = %s.%I', name, tbl, name), ' AND ' ORDER BY position),
           string_agg(format('_pgsim_x.%I = _pgsim_hits.%I', name, '_pgsim_k' || position), ' AND ' ORDER BY position)
    INTO chunk_keys, best_keys, best_qualified, doc_keys, doc_match, chunk_match, pool_match
    FROM unnest(registration.key_columns) WITH ORDINALITY AS key(name, position);

    -- a document's row: the columns the caller may read but col (column privileges hold, as pgsim.search's do)
    SELECT coalesce(string_agg(format('jsonb_build_object(%L, %s.%I)', a.attname, tbl, a.attname), ' || '
                               ORDER BY a.attnum), '''{}''::jsonb')
    INTO row_sql FROM pg_attribute a
    WHERE a.attrelid = tbl::oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attname <> col
      AND has_column_privilege(tbl::oid, a.attnum, 'SELECT');

    total := pgsim.estimate_rows(tbl, NULL);
    matching := CASE WHEN filter IS NULL OR filter = '' THEN total ELSE pgsim.estimate_rows(tbl, filter) END;
    selectivity := CASE WHEN total > 0 THEN matching / total ELSE 1 END;
    IF filter IS NULL OR filter = '' THEN
        fetch_chunks := greatest(64, 8 * pool);
    ELSIF matching < exact_below_rows OR selectivity < min_hnsw_selectivity THEN
        fetch_chunks := NULL;
    ELSE  -- a few chunks per document, and a filter that keeps a share of them: enough to find k
        fetch_chunks := least(max_fetch, greatest(64, ceil(8 * pool / greatest(selectivity, min_hnsw_selectivity, 1e-4))::integer));
    END IF;

    IF fetch_chunks IS NOT NULL THEN
        PERFORM set_config('enable_indexscan', 'on', true),
                set_config('hnsw.iterative_scan', 'relaxed_order', true),
                set_config('hnsw.ef_search', least(greatest(coalesce(ef_search, 100), 1), 1000)::text, true),
                set_config('hnsw.max_scan_tuples', (max_fetch * 2)::text, true);
        hnsw_sql := format(
            'WITH _pgsim_candidates AS MATERIALIZED ('
            'SELECT %1$s, _pgsim_x.chunk_no AS _pgsim_chunk_no, _pgsim_x.span_start AS _pgsim_span_start, '
            '_pgsim_x.span_end AS _pgsim_span_end, %2$s AS _pgsim_distance FROM %3$s AS _pgsim_x '
            'ORDER BY %2$s LIMIT $2), '
            '_pgsim_best AS (SELECT DISTINCT ON (%4$s) * FROM _pgsim_candidates '
            'ORDER BY %4$s, _pgsim_distance, _pgsim_chunk_no), '
            '_pgsim_hits AS (SELECT _pgsim_doc._pgsim_row, _pgsim_best.* FROM _pgsim_best CROSS JOIN LATERAL '
            '(SELECT %6$s AS _pgsim_row FROM %5$s WHERE %7$s AND %5$s.%10$I IS NOT NULL AND (%8$s)) AS _pgsim_doc '
            'ORDER BY _pgsim_best._pgsim_distance, %9$s LIMIT $4), '
            '_pgsim_ranked AS (SELECT _pgsim_hits.*, _pgsim_all.distance AS _pgsim_document_distance '
            'FROM _pgsim_hits CROSS JOIN LATERAL (SELECT %11$s AS distance FROM %3$s AS _pgsim_x WHERE %12$s) '
            'AS _pgsim_all ORDER BY _pgsim_all.distance, %4$s LIMIT $3) '
            'SELECT (SELECT count(*) FROM _pgsim_candidates), (SELECT jsonb_agg(jsonb_build_array(_pgsim_row, '
            '_pgsim_document_distance, _pgsim_chunk_no, _pgsim_span_start, _pgsim_span_end) '
            'ORDER BY _pgsim_document_distance, %4$s) FROM _pgsim_ranked)',
            chunk_keys, distance_sql, chunks::regclass, best_keys, tbl, row_sql, doc_match, condition, best_qualified,
            col, document_sql, pool_match);
        LOOP
            -- FOR ... IN EXECUTE: one statement only, whatever the filter holds
            FOR candidates, hits IN EXECUTE hnsw_sql USING query, fetch_chunks, k, pool LOOP
            END LOOP;
            EXIT WHEN coalesce(jsonb_array_length(hits), 0) >= k;
            IF candidates < fetch_chunks OR fetch_chunks >= max_fetch THEN
                hits := NULL;  -- the scan gave all it would, or asked all it may: only an exact scan finds more
                EXIT;
            END IF;
            fetch_chunks := least(max_fetch, fetch_chunks * 4);
        END LOOP;
    END IF;
    IF hits IS NULL OR jsonb_array_length(hits) < k THEN
        PERFORM set_config('enable_indexscan', 'off', true);
        -- the k nearest by (tableoid, ctid) first, their rows after: not a row built for every document
        exact_sql := format(
            'SELECT jsonb_agg(jsonb_build_array(%2$s, _pgsim_h._pgsim_distance, _pgsim_h._pgsim_chunk_no, '
            '_pgsim_h._pgsim_span_start, _pgsim_h._pgsim_span_end) ORDER BY _pgsim_h._pgsim_n) '
            'FROM (SELECT %1$s.tableoid AS _pgsim_rel, %1$s.ctid AS _pgsim_tid, _pgsim_best.*, '
            'row_number() OVER (ORDER BY _pgsim_best._pgsim_distance, %3$s) AS _pgsim_n '
            'FROM %1$s CROSS JOIN LATERAL (SELECT _pgsim_x.chunk_no AS _pgsim_chunk_no, '
            '_pgsim_x.span_start AS _pgsim_span_start, _pgsim_x.span_end AS _pgsim_span_end, '
            '%9$s AS _pgsim_distance '
            'FROM %5$s AS _pgsim_x WHERE %6$s ORDER BY (%4$s) + 0, _pgsim_x.chunk_no LIMIT 1) AS _pgsim_best '
            'WHERE %1$s.%8$I IS NOT NULL AND (%7$s) ORDER BY _pgsim_best._pgsim_distance, %3$s LIMIT $2) AS _pgsim_h '
            'JOIN %1$s ON %1$s.tableoid = _pgsim_h._pgsim_rel AND %1$s.ctid = _pgsim_h._pgsim_tid',
            tbl, row_sql, doc_keys, distance_sql, chunks::regclass, chunk_match, condition, col,
            format('1 - 0.05 * ln(avg(exp((1 - (%s)) / 0.05)) OVER ())', distance_sql));
        FOR hits IN EXECUTE exact_sql USING query, k LOOP
        END LOOP;
    END IF;
    PERFORM pgsim.restore_settings(settings, saved);
    RETURN QUERY
        SELECT h.value -> 0, (h.value ->> 1)::double precision, (h.value ->> 2)::integer, (h.value ->> 3)::integer,
               (h.value ->> 4)::integer
        FROM jsonb_array_elements(coalesce(hits, '[]'::jsonb)) WITH ORDINALITY AS h(value, position)
        ORDER BY h.position;
END;
$$;
COMMENT ON FUNCTION pgsim.knn_documents(regclass, name, @extschema:vector@.vector, integer, text, integer, double precision, double precision) IS
    'The k documents of tbl nearest to query by their chunks of the chunked embedding col that pass '
    'filter, as (row jsonb, distance, chunk_no, span_start, span_end), nearest first; k whenever k documents match.';
