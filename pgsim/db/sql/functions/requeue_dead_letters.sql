-- Its names are bound when the installer creates it, with search_path pg_catalog, pg_temp (pgsim.db.sqlfiles).
-- It runs with the caller's rights: row-level security on pgsim.dead_letter and pgsim.queue (0003_workers.sql)
-- limits it to the letters of tables the caller owns or works for, and to every letter for pgsim's owner.
CREATE OR REPLACE FUNCTION pgsim.requeue_dead_letters(registration integer DEFAULT NULL) RETURNS bigint
LANGUAGE sql
BEGIN ATOMIC
    WITH moved AS (
        DELETE FROM pgsim.dead_letter
        WHERE registration IS NULL OR embedding_id = registration
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
