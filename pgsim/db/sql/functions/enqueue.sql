-- Row trigger: TG_ARGV[0] is the registration id, TG_ARGV[1..] the primary key columns. It runs with its
-- owner's rights so that writers to a registered table need no grant on pgsim's queue; it reads NEW only.
CREATE OR REPLACE FUNCTION pgsim.enqueue() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_row jsonb := to_jsonb(NEW);
    row_key jsonb := '{}';
BEGIN
    FOR i IN 1 .. TG_NARGS - 1 LOOP
        row_key := row_key || jsonb_build_object(TG_ARGV[i], new_row -> TG_ARGV[i]);
    END LOOP;
    INSERT INTO pgsim.queue (embedding_id, key, reason)
    VALUES (TG_ARGV[0]::integer, row_key, lower(TG_OP))
    ON CONFLICT (embedding_id, key) DO NOTHING;
    PERFORM pg_notify('pgsim', TG_ARGV[0]);  -- repeated payloads fold into one per transaction
    RETURN NULL;
END;
$$;
