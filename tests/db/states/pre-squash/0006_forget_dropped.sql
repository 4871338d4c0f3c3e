-- Registrations of dropped tables are forgotten in SQL too, not only by Python's pgsim.add_embedding: a
-- migration rendered offline, or one that dropped a table with plain DROP TABLE, registers a column of a
-- re-created table of the same name without tripping over the old row (UNIQUE (table_schema, table_name,
-- column_name)).

-- Follow renamed tables (their triggers carry the registration id) and forget the registrations whose
-- table is gone, with their queue entries and dead letters (what pgsim.registry.forget_dropped does).
-- Returns the forgotten ids.
CREATE FUNCTION pgsim.forget_dropped() RETURNS integer[]
LANGUAGE plpgsql
AS $$
DECLARE
    gone integer[];
BEGIN
    UPDATE pgsim.embedding e SET table_schema = n.nspname, table_name = c.relname
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE t.tgname = format('pgsim_%s_insert', e.id) AND (n.nspname, c.relname) <> (e.table_schema, e.table_name);
    WITH deleted AS (
        DELETE FROM pgsim.embedding e
        WHERE NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgname = format('pgsim_%s_insert', e.id))
        RETURNING id
    )
    SELECT coalesce(array_agg(id), '{}') INTO gone FROM deleted;
    IF cardinality(gone) > 0 THEN
        DELETE FROM pgsim.queue WHERE embedding_id = ANY(gone);
        DELETE FROM pgsim.dead_letter WHERE embedding_id = ANY(gone);
    END IF;
    RETURN gone;
END;
$$;

-- register_embedding as in 0004_registration.sql, forgetting the registrations of dropped tables first.
CREATE OR REPLACE FUNCTION pgsim.register_embedding(
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
