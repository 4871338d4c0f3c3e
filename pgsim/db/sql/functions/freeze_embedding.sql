-- Stop keeping registration `registration` in sync, its column and vectors left as they are: its triggers go,
-- and its queue entries and dead letters with them. pgsim.change_embedding does this to the column that a
-- new source replaces; cancelling the change makes the triggers again (pgsim.create_triggers). Runs with the
-- caller's rights: only the table's owner may drop its triggers.
CREATE OR REPLACE FUNCTION pgsim.freeze_embedding(registration integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    e pgsim.embedding;
    target text;
BEGIN
    SELECT * INTO STRICT e FROM pgsim.embedding WHERE id = registration;
    target := e.table_oid::regclass::text;
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', format('pgsim_%s_insert', e.id), target);
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', format('pgsim_%s_update', e.id), target);
    EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', format('pgsim_%s_hide', e.id), target);
    DELETE FROM pgsim.queue WHERE embedding_id = e.id;
    DELETE FROM pgsim.dead_letter WHERE embedding_id = e.id;
END;
$$;
