-- The two triggers of registration `registration` (see pgsim.enqueue): AFTER INSERT of a row without an
-- embedding; AFTER UPDATE that changes a source column, unless the same statement writes the embedding
-- too (then the writer supplied it), or that leaves a row without an embedding (a writer set it to NULL,
-- or moved a queued row to another key). The worker's own NULL for a blank text fires it too and adds
-- nothing: the row's entry is still there. A registration whose stale rows are hidden (stale = 'hide') gets
-- a third, BEFORE UPDATE on the same change, that sets the embedding to NULL (pgsim.hide_stale).
CREATE OR REPLACE FUNCTION pgsim.create_triggers(registration integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    e pgsim.embedding;
    target text;
    arguments text;
    watched text;
BEGIN
    SELECT * INTO STRICT e FROM pgsim.embedding WHERE id = registration;
    -- The WHEN conditions compare embeddings with pgvector's = operator, bound when the trigger is made: look
    -- it up in the extension's schema (set until this function returns, by its SET clause).
    PERFORM set_config('search_path', format('pg_catalog, %I, pg_temp', (SELECT n.nspname FROM pg_extension x
        JOIN pg_namespace n ON n.oid = x.extnamespace WHERE x.extname = 'vector')), true);
    target := e.table_oid::regclass::text;  -- schema-qualified under this function's search_path
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
    IF e.stale = 'hide' THEN
        EXECUTE format(
            'CREATE TRIGGER %I BEFORE UPDATE OF %s ON %s FOR EACH ROW WHEN ('
            'ROW(%s) IS DISTINCT FROM ROW(%s) AND NEW.%I IS NOT DISTINCT FROM OLD.%I'
            ') EXECUTE FUNCTION pgsim.hide_stale(%L)',
            format('pgsim_%s_hide', e.id), watched, target,
            pgsim.qualified_columns('OLD', e.source_columns), pgsim.qualified_columns('NEW', e.source_columns),
            e.column_name, e.column_name, e.column_name
        );
    END IF;
END;
$$;
