-- Register target.column_name as the embedding of `source` (an SQL expression over the table's columns)
-- made by `model`: add the column as dtype(dimension) (vector(dimension) for dtype 'bit', whose index alone is
-- binary), or adopt it when it has that type; record the registration (with `prefix`, for prefix storage,
-- the length of the vectors' prefix its index holds) with the table's primary key and the columns the
-- source reads (given, or found from a
-- throwaway view's dependencies); create its triggers; queue the existing rows if asked. The HNSW index
-- named index_name is recorded, not built (the caller sizes the build). Returns the registration id.
-- It forgets the registrations of dropped tables first (pgsim.forget_dropped), so that a migration rendered
-- offline, or one that dropped a table with plain DROP TABLE, registers a column of a re-created table of
-- the same name without tripping over the old row (UNIQUE (table_schema, table_name, column_name)).
-- Only a role with the privileges of the table's owner may register (row-level security on pgsim.embedding
-- says so too). The source is checked, and later evaluated by the workers, under search_path pg_catalog,
-- pg_temp: a function of the user's own in it must be schema-qualified.
CREATE OR REPLACE FUNCTION pgsim.register_embedding(
    target regclass, column_name name, source text, model text, model_revision text, dimension integer,
    dtype text DEFAULT 'vector', index_name name DEFAULT NULL, index_m integer DEFAULT NULL,
    index_ef_construction integer DEFAULT NULL, source_columns name[] DEFAULT NULL,
    queue_existing boolean DEFAULT false, replaces integer DEFAULT NULL, stale text DEFAULT 'keep',
    prefix integer DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    table_schema name;
    table_name name;
    key_columns name[];
    existing_type oid;
    existing_modifier integer;
    -- pgvector's type, qualified: this function's search_path does not hold the extension's schema
    wanted_type regtype := format('%I.%I', (SELECT n.nspname FROM pg_extension x JOIN pg_namespace n
                                            ON n.oid = x.extnamespace WHERE x.extname = 'vector'),
                                            CASE dtype WHEN 'bit' THEN 'vector' ELSE dtype END)::regtype;
    wanted text := format_type(wanted_type, dimension);
    created boolean := false;
    registration integer;
    owner oid;
BEGIN
    SELECT n.nspname, c.relname, c.relowner INTO STRICT table_schema, table_name, owner
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = target;
    IF NOT pg_has_role(current_user, owner, 'USAGE') THEN
        RAISE EXCEPTION 'Only the owner of %.% (%) may register an embedding column on it; % may not.',
            table_schema, table_name, owner::regrole, current_user USING ERRCODE = 'insufficient_privilege',
            HINT = 'Run it as the table''s owner (or a member of that role).';
    END IF;
    PERFORM pgsim.forget_dropped();
    SELECT array_agg(a.attname ORDER BY k.position) INTO key_columns
    FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = target AND i.indisprimary;
    IF key_columns IS NULL THEN
        RAISE EXCEPTION 'Table %.% has no primary key, which pgsim needs to find a row again after encoding it.',
            table_schema, table_name USING HINT = 'Add one: ALTER TABLE ... ADD PRIMARY KEY (<column>);';
    END IF;
    IF source_columns IS NULL THEN
        EXECUTE format('CREATE TEMP VIEW pgsim_source_probe AS SELECT ((%s)::text) AS source FROM %s', source, target);
        SELECT array_agg(attname ORDER BY attnum) INTO source_columns FROM (
            SELECT DISTINCT a.attname, a.attnum FROM pg_depend d
            JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
            JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
            WHERE r.ev_class = 'pg_temp.pgsim_source_probe'::regclass AND d.refobjid = target
        ) AS dependencies;
        DROP VIEW pg_temp.pgsim_source_probe;
        IF source_columns IS NULL THEN
            RAISE EXCEPTION 'source % reads no column of %.%, so every row would embed alike.',
                source, table_schema, table_name;
        END IF;
    END IF;
    SELECT atttypid, atttypmod INTO existing_type, existing_modifier FROM pg_attribute
    WHERE attrelid = target AND attname = column_name AND attnum > 0 AND NOT attisdropped;
    IF existing_type IS NULL THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', target, column_name, wanted);
        created := true;
    ELSIF existing_type <> wanted_type OR existing_modifier <> dimension THEN
        RAISE EXCEPTION 'Column %.%.% exists as %, but model % gives %.', table_schema, table_name, column_name,
            format_type(existing_type, existing_modifier), model, wanted
            USING HINT = 'Use another column name, or a model of that dimension.';
    END IF;
    INSERT INTO pgsim.embedding (table_oid, table_schema, table_name, column_name, source, source_columns,
        key_columns, model, model_revision, dimension, dtype, index_name, index_m, index_ef_construction,
        created_column, replaces, stale, prefix)
    VALUES (target, table_schema, table_name, column_name, source, source_columns, key_columns, model,
        model_revision, dimension, dtype, index_name, index_m, index_ef_construction, created, replaces, stale,
        prefix)
    RETURNING id INTO registration;
    PERFORM pgsim.create_triggers(registration);
    IF queue_existing THEN
        PERFORM pgsim.queue_rows(registration);
    END IF;
    RETURN registration;
END;
$$;
