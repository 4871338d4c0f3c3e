-- Search quality beyond nearest neighbours: rank fusion, diversity, zero-shot labels, near-duplicate groups.
-- Functions that read user tables run with the caller's rights (row-level security holds); every identifier
-- goes through format('%I') or regclass.

-- Reciprocal rank fusion: one list's contribution for a row at 1-based `rank` (NULL: not in that list).
CREATE FUNCTION pgsim.rrf(rank bigint, k integer DEFAULT 60) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN rank IS NULL THEN 0.0 ELSE 1.0::double precision / (k + rank) END;
COMMENT ON FUNCTION pgsim.rrf(bigint, integer) IS
    'Reciprocal rank fusion term 1 / (k + rank); 0 for a row missing from the list. Sum it over the lists.';

-- The label whose vector is nearest (cosine) to `embedding`: zero-shot classification against label
-- descriptions encoded with the column's model.
CREATE FUNCTION pgsim.nearest_label(embedding vector, labels text[], label_vectors vector[]) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (
    SELECT u.label FROM unnest(labels, label_vectors) AS u(label, v)
    WHERE u.label IS NOT NULL AND u.v IS NOT NULL
    ORDER BY embedding <=> u.v, u.label
    LIMIT 1
);
COMMENT ON FUNCTION pgsim.nearest_label(vector, text[], vector[]) IS
    'Zero-shot label: the label whose vector is nearest (cosine) to the embedding.';

-- Maximal marginal relevance: positions (1-based) into `candidates`, in the order picked. Each pick
-- maximises lambda * sim(query, c) - (1 - lambda) * max sim(c, already picked); lambda 1 is plain
-- relevance order, lower values trade relevance for diversity.
CREATE FUNCTION pgsim.mmr(query vector, candidates vector[], k integer, lambda double precision)
RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    n integer := coalesce(cardinality(candidates), 0);
    relevance double precision[];
    redundancy double precision[] := array_fill(0.0::double precision, ARRAY[n]);
    picked boolean[] := array_fill(false, ARRAY[n]);
    chosen integer[] := '{}';
    best integer;
    best_score double precision;
    score double precision;
BEGIN
    IF lambda IS NULL OR lambda < 0 OR lambda > 1 THEN  -- NaN sorts above 1 in PostgreSQL
        RAISE EXCEPTION 'lambda must be between 0 and 1; got %', lambda
            USING ERRCODE = 'invalid_parameter_value', HINT = '1 ranks by relevance only, 0 by novelty only.';
    END IF;
    IF k IS NULL OR k < 0 THEN
        RAISE EXCEPTION 'k must be 0 or more; got %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT array_agg(1 - (query <=> c) ORDER BY o) INTO relevance
    FROM unnest(candidates) WITH ORDINALITY AS u(c, o);
    FOR step IN 1 .. least(k, n) LOOP
        best := NULL;
        FOR i IN 1 .. n LOOP
            CONTINUE WHEN picked[i];
            score := lambda * relevance[i] - (1 - lambda) * redundancy[i];
            IF best IS NULL OR score > best_score THEN
                best := i;
                best_score := score;
            END IF;
        END LOOP;
        picked[best] := true;
        chosen := chosen || best;
        FOR i IN 1 .. n LOOP
            CONTINUE WHEN picked[i];
            redundancy[i] := greatest(
                CASE WHEN step = 1 THEN '-Infinity'::double precision ELSE redundancy[i] END,
                1 - (candidates[i] <=> candidates[best])
            );
        END LOOP;
    END LOOP;
    RETURN chosen;
END
$$;
COMMENT ON FUNCTION pgsim.mmr(vector, vector[], integer, double precision) IS
    'Maximal marginal relevance: 1-based positions into candidates, in the order picked.';

-- Groups of near-duplicate rows: each row's `neighbours` nearest rows, found through the column's HNSW
-- index (a k-NN self-join, not all pairs), are linked when their cosine similarity is at least `threshold`;
-- the connected components of those links are the groups. Rows in no group are not returned. `key` is the
-- row's primary key as jsonb ({"column": value}), `group_id` the smallest ordinal of the group's rows.
CREATE FUNCTION pgsim.near_duplicates(
    target regclass,
    column_name name,
    threshold double precision,
    neighbours integer DEFAULT 10
) RETURNS TABLE (key jsonb, group_id bigint, group_size bigint)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    column_type text;
    key_expression text;
    changed bigint;
    ef_search text := current_setting('hnsw.ef_search', true);
BEGIN
    IF threshold IS NULL OR threshold <= 0 OR threshold > 1 THEN
        RAISE EXCEPTION 'threshold must be a cosine similarity in (0, 1]; got %', threshold
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Near-duplicates are typically 0.9 or more.';
    END IF;
    IF neighbours IS NULL OR neighbours < 1 OR neighbours > 1000 THEN
        RAISE EXCEPTION 'neighbours must be between 1 and 1000; got %', neighbours
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT format_type(a.atttypid, NULL) INTO column_type
    FROM pg_attribute a WHERE a.attrelid = target AND a.attname = column_name AND a.attnum > 0 AND NOT a.attisdropped;
    IF column_type IS NULL THEN
        RAISE EXCEPTION 'Table % has no column %.', target, column_name USING ERRCODE = 'undefined_column';
    ELSIF column_type NOT IN ('vector', 'halfvec') THEN
        RAISE EXCEPTION 'Column %.% is %, not a pgvector vector column.', target, column_name, column_type
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
        JOIN pg_opclass oc ON oc.oid = i.indclass[0]
        WHERE i.indrelid = target AND am.amname = 'hnsw' AND i.indnatts = 1 AND i.indpred IS NULL
          AND i.indkey[0] = (SELECT attnum FROM pg_attribute WHERE attrelid = target AND attname = column_name)
          AND oc.opcname = column_type || '_cosine_ops'
    ) THEN
        RAISE EXCEPTION 'Column %.% has no HNSW index for cosine distance: the self-join would compare all pairs.',
            target, column_name USING ERRCODE = 'undefined_object',
            HINT = format('CREATE INDEX ON %s USING hnsw (%I %s_cosine_ops)', target, column_name, column_type);
    END IF;
    SELECT 'jsonb_build_object(' || string_agg(format('%L, t.%I', a.attname, a.attname), ', ' ORDER BY k.ord) || ')'
    INTO key_expression
    FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = target AND i.indisprimary;
    IF key_expression IS NULL THEN
        RAISE EXCEPTION 'Table % has no primary key to name its rows by.', target USING ERRCODE = 'undefined_object',
            HINT = 'Add one: ALTER TABLE ... ADD PRIMARY KEY (<column>);';
    END IF;

    DROP TABLE IF EXISTS pg_temp.pgsim_near_link, pg_temp.pgsim_near_group;
    -- ef_search must cover the neighbours asked for, plus the row itself
    PERFORM set_config('hnsw.ef_search', greatest(neighbours + 1, 40)::text, true);
    EXECUTE format(
        'CREATE TEMP TABLE pg_temp.pgsim_near_link ON COMMIT DROP AS '
        'SELECT a.ctid AS a, n.ctid AS b FROM %1$s a CROSS JOIN LATERAL ('
        '  SELECT b.ctid, b.%2$I <=> a.%2$I AS distance FROM %1$s b ORDER BY b.%2$I <=> a.%2$I LIMIT %3$s'
        ') n WHERE a.%2$I IS NOT NULL AND n.ctid <> a.ctid AND n.distance <= %4$s',
        target, column_name, neighbours + 1, 1 - threshold
    );
    -- links both ways, then each row takes the smallest label among its neighbours until nothing changes
    EXECUTE 'INSERT INTO pg_temp.pgsim_near_link SELECT b, a FROM pg_temp.pgsim_near_link';
    EXECUTE 'CREATE TEMP TABLE pg_temp.pgsim_near_group ON COMMIT DROP AS '
            'SELECT DISTINCT a AS node, a AS label FROM pg_temp.pgsim_near_link';
    EXECUTE 'CREATE INDEX ON pg_temp.pgsim_near_group (node)';
    EXECUTE 'ANALYZE pg_temp.pgsim_near_link, pg_temp.pgsim_near_group';
    LOOP
        EXECUTE 'UPDATE pg_temp.pgsim_near_group g SET label = m.label FROM ('
                '  SELECT l.a AS node, min(h.label) AS label FROM pg_temp.pgsim_near_link l'
                '  JOIN pg_temp.pgsim_near_group h ON h.node = l.b GROUP BY l.a'
                ') m WHERE g.node = m.node AND m.label < g.label';
        GET DIAGNOSTICS changed = ROW_COUNT;
        EXIT WHEN changed = 0;
    END LOOP;
    RETURN QUERY EXECUTE format(
        'SELECT %1$s, dense_rank() OVER (ORDER BY g.label), count(*) OVER (PARTITION BY g.label) '
        'FROM pg_temp.pgsim_near_group g JOIN %2$s t ON t.ctid = g.node ORDER BY g.label, g.node',
        key_expression, target
    );
    DROP TABLE pg_temp.pgsim_near_link, pg_temp.pgsim_near_group;
    PERFORM set_config('hnsw.ef_search', coalesce(ef_search, '40'), true);
END
$$;
COMMENT ON FUNCTION pgsim.near_duplicates(regclass, name, double precision, integer) IS
    'Groups of near-duplicate rows: HNSW k-NN self-join at a cosine threshold, then connected components.';

-- Calibrated relevance: a sample of each searched column's vectors, against which a query's similarities are
-- put in proportion. A raw cosine means different things for different queries (a generic query is close
-- to everything); the number of standard deviations above the query's mean similarity to the corpus means
-- the same for all of them, so one threshold serves every query.
CREATE TABLE pgsim.score_sample (
    table_schema name NOT NULL,
    table_name name NOT NULL,
    column_name name NOT NULL,
    embedding vector NOT NULL
);
CREATE INDEX score_sample_column ON pgsim.score_sample (table_schema, table_name, column_name);
COMMENT ON TABLE pgsim.score_sample IS
    'Random vectors of a searched column (pgsim.sample_scores), the background of calibrated relevance.';

-- Replace the stored sample of target.column_name with up to sample_size random non-NULL vectors.
CREATE FUNCTION pgsim.sample_scores(target regclass, column_name name, sample_size integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    schema_name name;
    relation_name name;
    stored integer;
BEGIN
    IF sample_size IS NULL OR sample_size < 30 OR sample_size > 100000 THEN
        RAISE EXCEPTION 'sample_size must be between 30 and 100000; got %', sample_size
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT n.nspname, c.relname INTO STRICT schema_name, relation_name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = target;
    DELETE FROM pgsim.score_sample s
    WHERE (s.table_schema, s.table_name, s.column_name) = (schema_name, relation_name, sample_scores.column_name);
    EXECUTE format(
        'INSERT INTO pgsim.score_sample SELECT %L, %L, %L, %I::vector FROM %s WHERE %I IS NOT NULL '
        'ORDER BY random() LIMIT %s',
        schema_name, relation_name, column_name, column_name, target, column_name, sample_size
    );
    GET DIAGNOSTICS stored = ROW_COUNT;
    RETURN stored;
END
$$;
COMMENT ON FUNCTION pgsim.sample_scores(regclass, name, integer) IS
    'Store a random sample of a vector column for calibrated relevance; returns how many vectors it kept.';

-- The mean and standard deviation of `query`'s cosine similarity to the stored sample of target.column_name
-- (NULLs when there is no sample).
CREATE FUNCTION pgsim.score_background(target regclass, column_name name, query vector,
                                       OUT mean double precision, OUT stddev double precision, OUT sampled bigint)
LANGUAGE sql STABLE PARALLEL SAFE
RETURN (
    SELECT ROW(avg(1 - (s.embedding <=> query)), stddev_pop(1 - (s.embedding <=> query)), count(*))
    FROM pgsim.score_sample s JOIN pg_class c ON c.oid = target JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE (s.table_schema, s.table_name, s.column_name) = (n.nspname, c.relname, score_background.column_name)
);
COMMENT ON FUNCTION pgsim.score_background(regclass, name, vector) IS
    'A query''s mean and standard deviation of similarity to the stored sample: the calibration of its scores.';

-- Hubness correction: a bank of typical queries per searched column (pgsim.hubness.set_query_bank). A "hub"
-- row is near many queries whatever they ask; its similarity to a query is discounted by its mean
-- similarity to its nearest bank queries (cross-domain similarity local scaling, with the bank as the
-- query side's neighbourhood).
CREATE TABLE pgsim.query_bank (
    table_schema name NOT NULL,
    table_name name NOT NULL,
    column_name name NOT NULL,
    embedding vector NOT NULL
);
CREATE INDEX query_bank_column ON pgsim.query_bank (table_schema, table_name, column_name);
COMMENT ON TABLE pgsim.query_bank IS 'Typical queries of a searched column, encoded: the reference of hubness correction.';
