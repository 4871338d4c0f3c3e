-- Registering an embedding column in SQL: what pgsim.add_embedding / remove_embedding do to the database,
-- as functions, so one definition serves the Python API and migrations rendered offline
-- (alembic upgrade --sql), which have no connection to ask the table's keys and columns. The model's
-- dimension and revision come from the caller: only Python can read the model's files.

-- 'OLD.a, OLD.b' for columns {a, b}.
CREATE FUNCTION pgsim.qualified_columns(prefix text, columns name[]) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT string_agg(prefix || '.' || quote_ident(name), ', ' ORDER BY position)
    FROM unnest(columns) WITH ORDINALITY AS c(name, position)
$$;

-- The two triggers of registration `registration` (see pgsim.enqueue): AFTER INSERT of a row without an
-- embedding; AFTER UPDATE that changes a source column, unless the same statement writes the embedding
-- too (then the writer supplied it), or that leaves a row without an embedding (a writer set it to NULL,
-- or moved a queued row to another key). The worker's own NULL for a blank text fires it too and adds
-- nothing: the row's entry is still there.
CREATE FUNCTION pgsim.create_triggers(registration integer) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    e pgsim.embedding;
    target text;
    arguments text;
    watched text;
BEGIN
    SELECT * INTO STRICT e FROM pgsim.embedding WHERE id = registration;
    target := format('%I.%I', e.table_schema, e.table_name);
    SELECT string_agg(quote_literal(value), ', ' ORDER BY position) INTO arguments
    FROM unnest(array_prepend(e.id::text, e.key_columns::text[])) WITH ORDINALITY AS a(value, position);
    SELECT string_agg(format('%I', name), ', ' ORDER BY first) INTO watched
    FROM (
        SELECT name, min(position) AS first
        FROM unnest(e.source_columns || e.key_columns || e.column_name) WITH ORDINALITY AS w(name, position)
        GROUP BY name
    ) AS distinct_names;
    EXECUTE format(
        'CREATE TRIGGER %I AFTER INSERT ON %s FOR EACH ROW WHEN (NEW.%I IS NULL) EXECUTE FUNCTION pgsim.enqueue(%s)',
        format('pgsim_%s_insert', e.id), target, e.column_name, arguments
    );
    EXECUTE format(
        'CREATE TRIGGER %I AFTER UPDATE OF %s ON %s FOR EACH ROW WHEN ('
        '(ROW(%s) IS DISTINCT FROM ROW(%s) AND NEW.%I IS NOT DISTINCT FROM OLD.%I)'
        ' OR (NEW.%I IS NULL AND (OLD.%I IS NOT NULL OR ROW(%s) IS DISTINCT FROM ROW(%s)))'
        ') EXECUTE FUNCTION pgsim.enqueue(%s)',
        format('pgsim_%s_update', e.id), watched, target,
        pgsim.qualified_columns('OLD', e.source_columns), pgsim.qualified_columns('NEW', e.source_columns),
        e.column_name, e.column_name, e.column_name, e.column_name,
        pgsim.qualified_columns('OLD', e.key_columns), pgsim.qualified_columns('NEW', e.key_columns),
        arguments
    );
END;
$$;

-- Queue the rows of `registration` that have text (only those without an embedding unless `only_missing`
-- is false) and wake the workers; returns how many entries were added.
CREATE FUNCTION pgsim.queue_rows(registration integer, only_missing boolean DEFAULT true) RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
    e pgsim.embedding;
    key_object text;
    added bigint;
BEGIN
    SELECT * INTO STRICT e FROM pgsim.embedding WHERE id = registration;
    SELECT 'jsonb_build_object(' || string_agg(format('%L, %I', name, name), ', ' ORDER BY position) || ')'
    INTO key_object FROM unnest(e.key_columns) WITH ORDINALITY AS k(name, position);
    EXECUTE format(
        'INSERT INTO pgsim.queue (embedding_id, key, reason) SELECT %s, %s, %L FROM %I.%I '
        'WHERE %s nullif(btrim(((%s)::text)), %L) IS NOT NULL ON CONFLICT (embedding_id, key) DO NOTHING',
        e.id, key_object, 'backfill', e.table_schema, e.table_name,
        CASE WHEN only_missing THEN format('%I IS NULL AND', e.column_name) ELSE '' END, e.source, ''
    );
    GET DIAGNOSTICS added = ROW_COUNT;
    PERFORM pg_notify('pgsim', e.id::text);
    RETURN added;
END;
$$;

-- Register target.column_name as the embedding of `source` (an SQL expression over the table's columns)
-- made by `model`: add the column as dtype(dimension), or adopt it when it has that type; record the
-- registration with the table's primary key and the columns the source reads (given, or found from a
-- throwaway view's dependencies); create its triggers; queue the existing rows if asked. The HNSW index
-- named index_name is recorded, not built (the caller sizes the build). Returns the registration id.
CREATE FUNCTION pgsim.register_embedding(
    target regclass, column_name name, source text, model text, model_revision text, dimension integer,
    dtype text DEFAULT 'vector', index_name name DEFAULT NULL, index_m integer DEFAULT NULL,
    index_ef_construction integer DEFAULT NULL, source_columns name[] DEFAULT NULL,
    queue_existing boolean DEFAULT false, replaces integer DEFAULT NULL
) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    table_schema name;
    table_name name;
    key_columns name[];
    existing text;
    wanted text := format('%s(%s)', dtype, dimension);
    created boolean := false;
    registration integer;
BEGIN
    SELECT n.nspname, c.relname INTO STRICT table_schema, table_name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = target;
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
    SELECT format_type(atttypid, atttypmod) INTO existing FROM pg_attribute
    WHERE attrelid = target AND attname = column_name AND attnum > 0 AND NOT attisdropped;
    IF existing IS NULL THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN %I %s', target, column_name, wanted);
        created := true;
    ELSIF existing <> wanted THEN
        RAISE EXCEPTION 'Column %.%.% exists as %, but model % gives %.', table_schema, table_name, column_name,
            existing, model, wanted USING HINT = 'Use another column name, or a model of that dimension.';
    END IF;
    INSERT INTO pgsim.embedding (table_schema, table_name, column_name, source, source_columns, key_columns,
        model, model_revision, dimension, dtype, index_name, index_m, index_ef_construction, created_column,
        replaces)
    VALUES (table_schema, table_name, column_name, source, source_columns, key_columns, model, model_revision,
        dimension, dtype, index_name, index_m, index_ef_construction, created, replaces)
    RETURNING id INTO registration;
    PERFORM pgsim.create_triggers(registration);
    IF queue_existing THEN
        PERFORM pgsim.queue_rows(registration);
    END IF;
    RETURN registration;
END;
$$;

-- Undo register_embedding for one registration: triggers, HNSW index, the column if pgsim added it
-- (unless drop_column is false), queue entries, dead letters, registry row. A view or other object that
-- depends on the column stops it with PostgreSQL's error, and nothing is removed.
CREATE FUNCTION pgsim.unregister_embedding(registration integer, drop_column boolean DEFAULT true) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    e pgsim.embedding;
    target text;
BEGIN
    SELECT * INTO STRICT e FROM pgsim.embedding WHERE id = registration;
    target := format('%I.%I', e.table_schema, e.table_name);
    IF to_regclass(target) IS NOT NULL THEN
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', format('pgsim_%s_insert', e.id), target);
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', format('pgsim_%s_update', e.id), target);
        IF e.index_name IS NOT NULL THEN
            EXECUTE format('DROP INDEX IF EXISTS %I.%I', e.table_schema, e.index_name);
        END IF;
        IF e.created_column AND drop_column THEN
            EXECUTE format('ALTER TABLE %s DROP COLUMN IF EXISTS %I', target, e.column_name);
        END IF;
    END IF;
    DELETE FROM pgsim.queue WHERE embedding_id = e.id;
    DELETE FROM pgsim.dead_letter WHERE embedding_id = e.id;
    DELETE FROM pgsim.embedding WHERE id = e.id;
END;
$$;

-- The registration of target.column_name, and a model change still filling for it, removed (see above).
CREATE FUNCTION pgsim.remove_embedding(target regclass, column_name name, drop_column boolean DEFAULT true)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    registration integer;
BEGIN
    SELECT e.id INTO registration FROM pgsim.embedding e JOIN pg_class c ON c.relname = e.table_name
    JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = e.table_schema
    WHERE c.oid = target AND e.column_name = remove_embedding.column_name AND e.replaces IS NULL;
    IF registration IS NULL THEN
        RAISE EXCEPTION '%.% is not a registered embedding column.', target, column_name
            USING HINT = 'pgsim status lists the registered columns.';
    END IF;
    PERFORM pgsim.unregister_embedding(id) FROM pgsim.embedding WHERE replaces = registration;
    PERFORM pgsim.unregister_embedding(registration, drop_column);
END;
$$;
