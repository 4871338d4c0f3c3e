-- Undo register_embedding for one registration: triggers, HNSW index, the column if pgsim added it
-- (unless drop_column is false), queue entries, dead letters, registry row. A view or other object that
-- depends on the column stops it with PostgreSQL's error, and nothing is removed. The table is the
-- registration's OID, never the names stored beside it (a writer of the row could have set those to another
-- table's).
CREATE OR REPLACE FUNCTION pgsim.unregister_embedding(registration integer, drop_column boolean DEFAULT true) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    e pgsim.embedding;
    target text;
    table_schema name;
BEGIN
    IF pg_is_in_recovery() THEN  -- a hot standby: say so, rather than which statement was refused
        RAISE EXCEPTION 'pgsim.unregister_embedding writes, and this server is a read-only standby; run it on the '
            'primary' USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    SELECT * INTO STRICT e FROM pgsim.embedding WHERE id = registration;
    SELECT c.oid::regclass::text, n.nspname INTO target, table_schema
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = e.table_oid;
    IF target IS NOT NULL THEN
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', format('pgsim_%s_insert', e.id), target);
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', format('pgsim_%s_update', e.id), target);
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', format('pgsim_%s_hide', e.id), target);
        IF e.index_name IS NOT NULL THEN
            EXECUTE format('DROP INDEX IF EXISTS %I.%I', table_schema, e.index_name);
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
