-- Its names are bound when the installer creates it, with search_path pg_catalog, pg_temp (pgsim.db.sqlfiles).
CREATE OR REPLACE FUNCTION pgsim.requeue_dead_letters(registration integer DEFAULT NULL) RETURNS bigint
LANGUAGE sql
BEGIN ATOMIC
    WITH moved AS (
        DELETE FROM pgsim.dead_letter
        WHERE (registration IS NULL OR embedding_id = registration)
          -- only what the caller may queue (row-level security on pgsim.queue): its own tables' letters, or
          -- every letter for pgsim's owner
          AND embedding_id IN (
              SELECT e.id FROM pgsim.embedding e JOIN pg_catalog.pg_class c ON c.oid = e.table_oid
              WHERE pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE')
                 OR pg_catalog.pg_has_role(CURRENT_USER,
                        (SELECT q.relowner FROM pg_catalog.pg_class q WHERE q.oid = 'pgsim.queue'::regclass), 'USAGE'))
        RETURNING embedding_id, key, reason
    ), requeued AS (
        INSERT INTO pgsim.queue (embedding_id, key, reason)
        SELECT DISTINCT ON (embedding_id, key) embedding_id, key, reason FROM moved
        ON CONFLICT (embedding_id, key) DO NOTHING
        RETURNING 1
    )
    SELECT count(*) FROM requeued;
END;
COMMENT ON FUNCTION pgsim.requeue_dead_letters(integer) IS
    'Move dead letters (of one registration, or all) back to the queue; returns how many were queued.';
