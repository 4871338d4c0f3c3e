-- Hybrid search, for SQL users (pgsim.hybrid_search in Python): the k rows that pass filter with the best
-- reciprocal rank fusion, pgsim.rrf(vector rank, rrf_k) + pgsim.rrf(text rank, rrf_k), of two lists:
--   - the candidates nearest rows to query by col, from pgsim.knn (its path, settings, fallback: the list keeps
--     the filtered-search contract);
--   - the candidates best full-text matches of query_text (its words ORed, parsed with text_config, else the
--     configuration text_column's generated expression names, else english), ranked by ts_rank normalised by
--     document length over text_column (a tsvector column, by default the table's only one; a GIN index serves
--     it), that pass the same filter.
-- On a table calibrated by pgsim.quality.relevance_calibration (a fresh 'hybrid' row in pgsim.calibration with
-- a gate for this candidates count; fresh: the table changed by at most a fifth of its rows since), the fusion
-- is the calibrated one: the text list puts the rows that match every word (AND, ranked by the AND query's
-- ts_rank) before those that match some; when 1 to and_rows rows match every word (long_rows for a query of
-- long_words distinct words or more) they weigh and_weight; when some row matches every word and the vector
-- list's best row's relevance is below the gate, the vector list weighs weak_vector; rrf_k NULL (the default)
-- is the calibrated one, else 60. Without one, plain RRF as above.
-- Each row comes with its relevance: its similarity minus the similarity of the vector list's last row (the
-- score of pgsim.relevant_search with reference = candidates); with min_score, only rows that reach it, before
-- the k best are taken. Rows are (row jsonb without col, score, distance, vector_rank, text_rank, relevance);
-- a rank is NULL for a row not in that list, the distance for a text match not embedded yet. The query comes
-- twice: its embedding and its text (SQL cannot encode). filter is read as pgsim.knn reads it: one boolean
-- expression over the table's columns, under search_path pg_catalog, pg_temp.
--   SELECT p.package, r.score
--   FROM pgsim.hybrid_search('packages', 'embedding', $1, 'xml parser', 5, $$section = 'libs'$$) AS r,
--        jsonb_populate_record(NULL::packages, r.row) AS p;
CREATE OR REPLACE FUNCTION pgsim.hybrid_search(
    tbl regclass,
    col name,
    query @extschema:vector@.vector,
    query_text text,
    k integer DEFAULT 10,
    filter text DEFAULT NULL,
    min_score double precision DEFAULT NULL,
    candidates integer DEFAULT 50,
    rrf_k integer DEFAULT NULL,
    text_column name DEFAULT NULL,
    text_config regconfig DEFAULT NULL,
    exact_below_rows double precision DEFAULT 1000,
    hnsw_ef_search integer DEFAULT 200,
    min_hnsw_selectivity double precision DEFAULT 0.5
) RETURNS TABLE (
    "row" jsonb, score double precision, distance double precision, vector_rank bigint, text_rank bigint,
    relevance double precision
)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tsv name := text_column;
    tsvectors name[];
    config regconfig := text_config;
    words tsquery;
    every_word tsquery;
    fusion jsonb;
    fused_k integer := rrf_k;
    boost_rows integer;
    chunks oid;
    text_distance text;
    tie_break text := 't.ctid';
    column_type text := (SELECT a.atttypid::regtype::text FROM pg_attribute a
                         WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped);
    vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_extension e
                           JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
    add_one text := format('ALTER TABLE %s ADD COLUMN fts tsvector GENERATED ALWAYS AS (to_tsvector(%L, '
                           'coalesce(<text column>, %L))) STORED; CREATE INDEX ON %s USING gin (fts);',
                           tbl, 'english', '', tbl);
BEGIN
    IF query_text IS NULL OR btrim(query_text) = '' THEN
        RAISE EXCEPTION 'pgsim.hybrid_search: the query text is empty' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Pass the words to search for, with their embedding as query.';
    END IF;
    IF k IS NULL OR k < 1 OR k > 10000 THEN
        RAISE EXCEPTION 'pgsim.hybrid_search: k must be from 1 to 10000; got %', k
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF candidates IS NULL OR candidates < k OR candidates > 10000 THEN
        RAISE EXCEPTION 'pgsim.hybrid_search: candidates must be from k (%) to 10000; got %', k, candidates
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF rrf_k IS NOT NULL AND (rrf_k < 1 OR rrf_k > 10000) THEN
        RAISE EXCEPTION 'pgsim.hybrid_search: rrf_k must be from 1 to 10000; got %', rrf_k
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF min_score IS NOT NULL AND NOT (min_score >= 0 AND min_score <= 2) THEN  -- NaN sorts above 2
        RAISE EXCEPTION 'pgsim.hybrid_search: min_score is a margin of cosine similarity from 0 to 2; got %',
            min_score USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF column_type IS NULL THEN
        RAISE EXCEPTION 'pgsim.hybrid_search: table % has no column %', tbl, quote_ident(col)
            USING ERRCODE = 'undefined_column';
    END IF;
    SELECT array_agg(a.attname ORDER BY a.attnum) INTO tsvectors FROM pg_attribute a
    WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped AND a.atttypid = 'tsvector'::regtype;
    IF tsv IS NULL AND cardinality(tsvectors) = 1 THEN
        tsv := tsvectors[1];
    ELSIF tsv IS NULL THEN
        RAISE EXCEPTION 'pgsim.hybrid_search needs a full-text column; % has %', tbl,
            CASE WHEN tsvectors IS NULL THEN 'no tsvector column'
                 ELSE format('several (%s): name one as text_column', array_to_string(tsvectors, ', ')) END
            USING ERRCODE = 'undefined_column', HINT = 'To add one: ' || add_one;
    ELSIF tsvectors IS NULL OR NOT tsv = ANY (tsvectors) THEN
        RAISE EXCEPTION 'pgsim.hybrid_search: % has no tsvector column %', tbl, quote_ident(tsv)
            USING ERRCODE = 'undefined_column', HINT = 'To add one: ' || add_one;
    END IF;
    IF config IS NULL THEN
        SELECT substring(pg_get_expr(d.adbin, d.adrelid) FROM 'to_tsvector\(''([^'']+)''::regconfig')::regconfig
        INTO config
        FROM pg_attribute a JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = tbl AND a.attname = tsv;
        config := coalesce(config, 'english'::regconfig);
    END IF;
    -- a text match's distance, as the vector list measures it: on a chunked column, the document's over its
    -- chunks (pgsim.knn_documents), NULL while its vector is (its chunks are an older text's)
    SELECT c.chunk_table, format('CASE WHEN t.%I IS NULL THEN NULL ELSE (SELECT 1 - 0.05 * ln(avg(exp((1 - '
               '(_pgsim_x.embedding OPERATOR(%s.<=>) $3::%s.%I)) / 0.05))) FROM %s AS _pgsim_x WHERE %s) END',
               col, vector_schema, vector_schema, e.dtype, c.chunk_table::regclass,
               (SELECT string_agg(format('_pgsim_x.%I = t.%I', key, key), ' AND ') FROM unnest(e.key_columns) AS key)),
           -- equal text scores ranked by key, as Python's document fusion ranks them (it may not read ctid)
           (SELECT string_agg(format('t.%I', key), ', ') FROM unnest(e.key_columns) AS key)
    INTO chunks, text_distance, tie_break
    FROM pgsim.embedding e JOIN pgsim.chunking c ON c.embedding_id = e.id
    WHERE e.table_oid = tbl::oid AND e.column_name = col ORDER BY e.id LIMIT 1;
    IF chunks IS NULL THEN
        text_distance := format('t.%I OPERATOR(%s.<=>) $3::%s', col, vector_schema, column_type);
        tie_break := 't.ctid';
    END IF;
    words := (SELECT string_agg(quote_literal(w.lexeme), ' | ')::tsquery FROM unnest(to_tsvector(config, query_text)) AS w);
    every_word := (SELECT string_agg(quote_literal(w.lexeme), ' & ')::tsquery
                   FROM unnest(to_tsvector(config, query_text)) AS w);
    SELECT c.measured INTO fusion
    FROM pgsim.calibration c
    JOIN pg_catalog.pg_class t ON t.oid = c.table_oid
    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.table_oid AND a.attnum = c.column_attnum
    LEFT JOIN pg_catalog.pg_stat_all_tables s ON s.relid = c.table_oid AND NOT pg_catalog.pg_is_in_recovery()
    WHERE c.table_oid = tbl AND a.attname = col AND c.kind = 'hybrid' AND c.measured -> 'gate' ? candidates::text
      AND (t.reltuples < 0 OR abs(t.reltuples - c.rows_measured) <= 0.2 * greatest(c.rows_measured, 1))
      AND (s.relid IS NULL OR c.changes_measured IS NULL OR s.n_tup_ins + s.n_tup_del < c.changes_measured
           OR s.n_tup_ins + s.n_tup_del - c.changes_measured <= 0.2 * greatest(c.rows_measured, 1));
    fused_k := coalesce(rrf_k, (fusion ->> 'rrf_k')::integer, 60);
    boost_rows := coalesce(CASE WHEN length(to_tsvector(config, query_text)) >= (fusion ->> 'long_words')::integer
                                THEN greatest((fusion ->> 'and_rows')::integer, (fusion ->> 'long_rows')::integer)
                                ELSE (fusion ->> 'and_rows')::integer END, 0);
    -- Rows are matched across the lists by their jsonb (pgsim.knn returns no other identity), numbered among
    -- equal ones so that identical rows stay as many rows.
    RETURN QUERY EXECUTE format(
        'WITH v AS (SELECT r.row, r.distance, r.position, '
        '    row_number() OVER (PARTITION BY r.row ORDER BY r.position) AS twin '
        '  FROM pgsim.knn($1, $2, $3, $4, $5, $6, $7, $8) WITH ORDINALITY AS r ("row", distance, position)), '
        'x AS (SELECT m.row, m.distance, m.position, m.every, '
        '    row_number() OVER (PARTITION BY m.row ORDER BY m.position) AS twin, '
        '    count(*) FILTER (WHERE m.every) OVER () AS all_words FROM ('
        '  SELECT to_jsonb(t) - $2::text AS "row", %7$s AS distance, '
        '    $13 AND t.%4$I OPERATOR(pg_catalog.@@) $14 AS every, '
        '    row_number() OVER (ORDER BY $13 AND t.%4$I OPERATOR(pg_catalog.@@) $14 DESC, '
        '      CASE WHEN $13 AND t.%4$I OPERATOR(pg_catalog.@@) $14 THEN ts_rank(t.%4$I, $14, 1) '
        '      ELSE ts_rank(t.%4$I, $9, 1) END DESC, %8$s) AS position '
        '  FROM %5$s AS t WHERE t.%4$I OPERATOR(pg_catalog.@@) $9 AND (%6$s) '
        '  ORDER BY position LIMIT $4) AS m), '
        'reference AS (SELECT max(v.distance) AS distance, CASE WHEN $15::double precision IS NULL '
        '    OR max(v.distance) - min(v.distance) >= $15 OR NOT EXISTS (SELECT FROM x WHERE x.every) THEN 1.0 '
        '    ELSE $16::double precision END AS weight FROM v), '
        'f AS (SELECT coalesce(v.row, x.row) AS "row", coalesce(v.distance, x.distance) AS distance, '
        '    v.position AS vector_rank, x.position AS text_rank, '
        '    reference.weight * pgsim.rrf(v.position, $10) + CASE WHEN x.every AND x.all_words <= $17 '
        '      THEN $18::double precision ELSE 1.0 END * pgsim.rrf(x.position, $10) AS score '
        '  FROM v FULL JOIN x ON x.row = v.row AND x.twin = v.twin CROSS JOIN reference) '
        'SELECT f.row, f.score, f.distance, f.vector_rank, f.text_rank, reference.distance - f.distance '
        'FROM f CROSS JOIN reference '
        'WHERE $11::double precision IS NULL OR reference.distance - f.distance >= $11 '
        'ORDER BY f.score DESC, f.vector_rank NULLS LAST, f.text_rank NULLS LAST LIMIT $12',
        col, vector_schema, column_type, tsv, tbl, coalesce(nullif(filter, ''), 'true'), text_distance, tie_break)
    USING tbl, col, query, candidates, filter, exact_below_rows, hnsw_ef_search, min_hnsw_selectivity, words,
          fused_k, min_score, k, fusion IS NOT NULL, every_word, (fusion -> 'gate' ->> candidates::text)::double precision,
          coalesce((fusion ->> 'weak_vector')::double precision, 1.0), boost_rows,
          coalesce((fusion ->> 'and_weight')::double precision, 1.0);
END
$$;
COMMENT ON FUNCTION pgsim.hybrid_search(regclass, name, @extschema:vector@.vector, text, integer, text, double precision, integer, integer, name, regconfig, double precision, integer, double precision) IS
    'The k rows passing filter with the best reciprocal rank fusion of the nearest rows (pgsim.knn) and the '
    'full-text matches, as (row jsonb, score, distance, vector_rank, text_rank, relevance); min_score cuts by relevance.';
