-- Set back the settings a search changed for the rest of its transaction: names[i] to saved[i], as read with
-- current_setting(name, true) before it changed them (NULL: never set in this session, left as it is now).
CREATE OR REPLACE FUNCTION pgsim.restore_settings(names text[], saved text[]) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    FOR i IN 1 .. coalesce(array_length(names, 1), 0) LOOP
        IF saved[i] IS NOT NULL THEN
            PERFORM set_config(names[i], saved[i], true);
        END IF;
    END LOOP;
END;
$$;
COMMENT ON FUNCTION pgsim.restore_settings(text[], text[]) IS
    'Sets each of names back to its saved value (for the rest of the transaction), where one was saved.';
