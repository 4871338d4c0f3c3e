-- Follow renamed tables (their triggers carry the registration id) and forget the registrations whose
-- table is gone, with their queue entries and dead letters (what pgsim.columns.registry.forget_dropped
-- does).
-- Returns the forgotten ids.
CREATE OR REPLACE FUNCTION pgsim.forget_dropped() RETURNS integer[]
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
