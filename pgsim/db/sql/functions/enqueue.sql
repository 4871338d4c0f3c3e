-- Row trigger of a registration (pgsim.create_triggers): TG_ARGV[0] is the registration id. It runs with
-- its owner's rights so that writers to a registered table need no grant on pgsim's queue, reads NEW only,
-- and queues a row only for a registration of the very table it fires on (by OID; for a partitioned table,
-- the partition the row landed in or one of its ancestors): a trigger of some other table that calls it (any
-- role may write one) is an error, not a forged queue entry.
CREATE OR REPLACE FUNCTION pgsim.enqueue() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    registration integer := TG_ARGV[0]::integer;
    registered oid;
    key_columns name[];
    new_row jsonb := to_jsonb(NEW);
    row_key jsonb := '{}';
BEGIN
    SELECT e.table_oid, e.key_columns INTO registered, key_columns FROM pgsim.embedding e WHERE e.id = registration;
    -- it runs for every row written: the partition look-up only where the table is not the registered one
    IF registered IS DISTINCT FROM TG_RELID
       AND NOT EXISTS (SELECT 1 FROM pg_partition_ancestors(TG_RELID) AS a WHERE a.relid = registered) THEN
        RAISE EXCEPTION 'pgsim.enqueue: % holds no registration %', TG_RELID::regclass, registration
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'pgsim''s triggers are made by pgsim.add_embedding; drop this one.';
    END IF;
    FOR i IN 1 .. cardinality(key_columns) LOOP
        row_key := row_key || jsonb_build_object(key_columns[i], new_row -> key_columns[i]);
    END LOOP;
    INSERT INTO pgsim.queue (embedding_id, key, reason)
    VALUES (registration, row_key, lower(TG_OP))
    ON CONFLICT (embedding_id, key) DO NOTHING;
    PERFORM pg_notify('pgsim', registration::text);  -- repeated payloads fold into one per transaction
    RETURN NULL;
END;
$$;
