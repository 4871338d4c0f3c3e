-- BEFORE UPDATE row trigger of a registration whose stale rows are hidden (pgsim.embedding.stale = 'hide';
-- see pgsim.create_triggers): the row's embedding, TG_ARGV[0], becomes NULL, so no search finds the row by
-- its old text's vector; pgsim's AFTER UPDATE trigger then queues it. It changes nothing but NEW, with the
-- writer's rights.
CREATE OR REPLACE FUNCTION pgsim.hide_stale() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    NEW := jsonb_populate_record(NEW, jsonb_build_object(TG_ARGV[0], NULL));
    RETURN NEW;
END;
$$;
