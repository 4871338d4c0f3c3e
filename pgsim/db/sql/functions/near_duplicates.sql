-- Groups of near-duplicate rows: each row's `neighbours` nearest rows, found through the column's HNSW
-- index (a k-NN self-join, not all pairs), are linked when their cosine similarity is at least `threshold`;
-- the connected components of those links are the groups. Rows in no group are not returned. `key` is the
-- row's primary key as jsonb ({"column": value}), `group_id` the smallest ordinal of the group's rows.
CREATE OR REPLACE FUNCTION pgsim.near_duplicates(
    target regclass,
    column_name name,
    threshold double precision,
    neighbours integer DEFAULT 10
) RETURNS TABLE (key jsonb, group_id bigint, group_size bigint)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    vector_namespace oid := (SELECT e.extnamespace FROM pg_extension e WHERE e.extname = 'vector');
    vector_schema text := (SELECT quote_ident(n.nspname) FROM pg_namespace n WHERE n.oid = vector_namespace);
    column_type oid;
    type_name name;
    key_expression text;
    nodes tid[];
    node_tables oid[];  -- with nodes: a row is its table's OID and its ctid (partitions number rows alike)
    lefts integer[];
    rights integer[];
    parent integer[];
    j integer;
    x integer;
    y integer;
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
    SELECT a.atttypid INTO column_type
    FROM pg_attribute a WHERE a.attrelid = target AND a.attname = column_name AND a.attnum > 0 AND NOT a.attisdropped;
    SELECT t.typname INTO type_name FROM pg_type t
    WHERE t.oid = column_type AND t.typnamespace = vector_namespace AND t.typname IN ('vector', 'halfvec');
    IF column_type IS NULL THEN
        RAISE EXCEPTION 'Table % has no column %.', target, column_name USING ERRCODE = 'undefined_column';
    ELSIF type_name IS NULL THEN
        RAISE EXCEPTION 'Column %.% is %, not a pgvector vector column.', target, column_name, column_type::regtype
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
        JOIN pg_opclass oc ON oc.oid = i.indclass[0]
        WHERE i.indrelid = target AND am.amname = 'hnsw' AND i.indnatts = 1 AND i.indpred IS NULL
          AND i.indkey[0] = (SELECT attnum FROM pg_attribute WHERE attrelid = target AND attname = column_name)
          AND oc.opcname = type_name || '_cosine_ops' AND oc.opcnamespace = vector_namespace
    ) THEN
        RAISE EXCEPTION 'Column %.% has no HNSW index for cosine distance: the self-join would compare all pairs.',
            target, column_name USING ERRCODE = 'undefined_object',
            HINT = format('CREATE INDEX ON %s USING hnsw (%I %s_cosine_ops)', target, column_name, type_name);
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

    -- ef_search must cover the neighbours asked for, plus the row itself
    PERFORM set_config('hnsw.ef_search', greatest(neighbours + 1, 40)::text, true);
    -- the links, with their rows numbered in (table, ctid) order: no temporary table, so it runs on a hot
    -- standby too
    EXECUTE format(
        'WITH link AS MATERIALIZED ('
        '  SELECT a.tableoid AS ar, a.ctid AS a, n.tableoid AS br, n.ctid AS b FROM %1$s a CROSS JOIN LATERAL ('
        '    SELECT b.tableoid, b.ctid, b.%2$I OPERATOR(%5$s.<=>) a.%2$I AS distance FROM %1$s b'
        '    ORDER BY b.%2$I OPERATOR(%5$s.<=>) a.%2$I LIMIT %3$s'
        '  ) n WHERE a.%2$I IS NOT NULL AND (n.tableoid, n.ctid) <> (a.tableoid, a.ctid) AND n.distance <= %4$s'
        '), node AS MATERIALIZED ('
        '  SELECT s.r, s.t, (row_number() OVER (ORDER BY s.r, s.t))::integer AS i'
        '  FROM (SELECT l.ar, l.a FROM link l UNION SELECT l.br, l.b FROM link l) AS s (r, t)'
        ') SELECT (SELECT array_agg(node.r ORDER BY node.i) FROM node), '
        '(SELECT array_agg(node.t ORDER BY node.i) FROM node), array_agg(na.i), array_agg(nb.i) '
        'FROM link l JOIN node na ON na.r = l.ar AND na.t = l.a JOIN node nb ON nb.r = l.br AND nb.t = l.b',
        target, column_name, neighbours + 1, 1 - threshold, vector_schema
    ) INTO node_tables, nodes, lefts, rights;
    IF nodes IS NULL THEN
        PERFORM set_config('hnsw.ef_search', coalesce(ef_search, '40'), true);
        RETURN;
    END IF;
    -- the groups are the links' connected components (union-find); a component's root is its first row in
    -- (table, ctid) order
    parent := array_fill(0, ARRAY[cardinality(nodes)]);
    FOR j IN 1 .. cardinality(nodes) LOOP
        parent[j] := j;
    END LOOP;
    FOR j IN 1 .. cardinality(lefts) LOOP
        x := lefts[j];
        WHILE parent[x] <> x LOOP
            parent[x] := parent[parent[x]];
            x := parent[x];
        END LOOP;
        y := rights[j];
        WHILE parent[y] <> y LOOP
            parent[y] := parent[parent[y]];
            y := parent[y];
        END LOOP;
        IF x < y THEN
            parent[y] := x;
        ELSIF y < x THEN
            parent[x] := y;
        END IF;
    END LOOP;
    FOR j IN 1 .. cardinality(nodes) LOOP
        parent[j] := parent[parent[j]];  -- a row's parent comes before it, so already names its root
    END LOOP;
    RETURN QUERY EXECUTE format(
        'SELECT %1$s, dense_rank() OVER (ORDER BY g.label), count(*) OVER (PARTITION BY g.label) '
        'FROM unnest($1, $2, $3) AS g (rel, node, label) JOIN %2$s t ON t.tableoid = g.rel AND t.ctid = g.node '
        'ORDER BY g.label, g.rel, g.node',
        key_expression, target
    ) USING node_tables, nodes, parent;
    PERFORM set_config('hnsw.ef_search', coalesce(ef_search, '40'), true);
END
$$;
COMMENT ON FUNCTION pgsim.near_duplicates(regclass, name, double precision, integer) IS
    'Groups of near-duplicate rows: HNSW k-NN self-join at a cosine threshold, then connected components.';
