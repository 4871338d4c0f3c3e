-- Follow renamed tables and forget the registrations whose table is gone (or whose insert trigger its owner
-- dropped, unless pgsim.freeze_embedding dropped it for a change of source still being filled), with their
-- queue entries and dead letters, and the calibrations of tables that are gone. A registration follows its table by OID only: no
-- name, and no trigger another role makes on a table of its own, can move it. It acts on the catalog's
-- facts alone, whoever calls it, so it runs as pgsim's owner (workers and registrants need no write access
-- to the registry for it). Returns the forgotten ids.
CREATE OR REPLACE FUNCTION pgsim.forget_dropped() RETURNS integer[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    gone integer[];
BEGIN
    IF pg_is_in_recovery() THEN  -- a hot standby: say so, rather than which statement was refused
        RAISE EXCEPTION 'pgsim.forget_dropped (run by workers, backfills and registrations) writes, and this server '
            'is a read-only standby; run it on the primary' USING ERRCODE = 'read_only_sql_transaction';
    END IF;
    UPDATE pgsim.embedding e SET table_schema = n.nspname, table_name = c.relname
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = e.table_oid AND (n.nspname, c.relname) IS DISTINCT FROM (e.table_schema, e.table_name);
    WITH deleted AS (
        DELETE FROM pgsim.embedding e
        WHERE NOT EXISTS (
            SELECT 1 FROM pg_trigger t
            WHERE t.tgrelid = e.table_oid AND t.tgname = format('pgsim_%s_insert', e.id)
              AND t.tgfoid = 'pgsim.enqueue()'::regprocedure)
          AND NOT (EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = e.table_oid)
                   AND EXISTS (SELECT 1 FROM pgsim.embedding r WHERE r.replaces = e.id AND r.table_oid = e.table_oid))
        RETURNING id
    )
    SELECT coalesce(array_agg(id), '{}') INTO gone FROM deleted;
    IF cardinality(gone) > 0 THEN
        DELETE FROM pgsim.queue WHERE embedding_id = ANY(gone);
        DELETE FROM pgsim.dead_letter WHERE embedding_id = ANY(gone);
    END IF;
    -- what was measured on a table that is gone: its OID may name another table one day
    DELETE FROM pgsim.calibration c WHERE NOT EXISTS (SELECT 1 FROM pg_class t WHERE t.oid = c.table_oid);
    RETURN gone;
END;
$$;
