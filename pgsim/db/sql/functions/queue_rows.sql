-- Queue the rows of `registration` that have text (only those without an embedding unless `only_missing`
-- is false) and wake the workers; returns how many entries were added.
CREATE OR REPLACE FUNCTION pgsim.queue_rows(registration integer, only_missing boolean DEFAULT true) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
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
        'INSERT INTO pgsim.queue (embedding_id, key, reason) SELECT %s, %s, %L FROM %s '
        'WHERE %s nullif(btrim(((%s)::text)), %L) IS NOT NULL ON CONFLICT (embedding_id, key) DO NOTHING',
        e.id, key_object, 'backfill', e.table_oid::regclass,
        CASE WHEN only_missing THEN format('%I IS NULL AND', e.column_name) ELSE '' END, e.source, ''
    );
    GET DIAGNOSTICS added = ROW_COUNT;
    PERFORM pg_notify('pgsim', e.id::text);
    RETURN added;
END;
$$;
