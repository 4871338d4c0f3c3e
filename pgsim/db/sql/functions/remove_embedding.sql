-- The registration of target.column_name, and a model change still filling for it, removed (see
-- pgsim.unregister_embedding).
CREATE OR REPLACE FUNCTION pgsim.remove_embedding(target regclass, column_name name, drop_column boolean DEFAULT true)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    registration integer;
BEGIN
    SELECT e.id INTO registration FROM pgsim.embedding e
    WHERE e.table_oid = target AND e.column_name = remove_embedding.column_name AND e.replaces IS NULL;
    IF registration IS NULL THEN
        RAISE EXCEPTION '%.% is not a registered embedding column.', target, column_name
            USING HINT = 'pgsim status lists the registered columns.';
    END IF;
    PERFORM pgsim.unregister_embedding(id) FROM pgsim.embedding WHERE replaces = registration AND table_oid = target;
    PERFORM pgsim.unregister_embedding(registration, drop_column);
END;
$$;
