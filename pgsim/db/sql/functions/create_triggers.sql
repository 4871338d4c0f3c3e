-- The two triggers of registration `registration` (see pgsim.enqueue): AFTER INSERT of a row without an
-- embedding; AFTER UPDATE that changes a source column, unless the same statement writes the embedding
-- too (then the writer supplied it), or that leaves a row without an embedding (a writer set it to NULL,
-- or moved a queued row to another key). The worker's own NULL for a blank text fires it too and adds
-- nothing: the row's entry is still there. A registration whose stale rows are hidden (stale = 'hide') gets
-- a third, BEFORE UPDATE on the same change, that sets the embedding to NULL (pgsim.hide_stale).
-- A chunked registration (a row in pgsim.chunking) queues every INSERT and every change of a source column,
-- with an embedding or without: a writer that supplies the document's vector (an ingest, an ORM flush, a
-- hand-written INSERT) does not supply its chunks, which only the workers make. pgsim.columns.chunking makes
-- the triggers again when it chunks a registration or stops chunking it.
CREATE OR REPLACE FUNCTION pgsim.create_triggers(registration integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    e pgsim.embedding;
    target text;
    arguments text;
    watched text;
    chunked boolean;
BEGIN
    SELECT * INTO STRICT e FROM pgsim.embedding WHERE id = registration;
    chunked := EXISTS (SELECT FROM pgsim.chunking k WHERE k.embedding_id = registration);
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
        'CREATE TRIGGER %I AFTER INSERT ON %s FOR EACH ROW WHEN (%s) EXECUTE FUNCTION pgsim.enqueue(%s)',
        format('pgsim_%s_insert', e.id), target,
        CASE WHEN chunked THEN 'true' ELSE format('NEW.%I IS NULL', e.column_name) END, arguments
    );
    EXECUTE format(
        'CREATE TRIGGER %I AFTER UPDATE OF %s ON %s FOR EACH ROW WHEN ('
        '(ROW(%s) IS DISTINCT FROM ROW(%s)%s)'
        ' OR (NEW.%I IS NULL AND (OLD.%I IS NOT NULL OR ROW(%s) IS DISTINCT FROM ROW(%s)))'
        ') EXECUTE FUNCTION pgsim.enqueue(%s)',
        format('pgsim_%s_update', e.id), watched, target,
        pgsim.qualified_columns('OLD', e.source_columns), pgsim.qualified_columns('NEW', e.source_columns),
        CASE WHEN chunked THEN '' ELSE format(' AND NEW.%I IS NOT DISTINCT FROM OLD.%I', e.column_name, e.column_name) END,
        e.column_name, e.column_name,
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
