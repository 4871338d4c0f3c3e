-- A view's names are bound when it is made (the installer makes it with search_path pg_catalog, pg_temp);
-- what it calls is qualified all the same.
CREATE OR REPLACE VIEW pgsim.sync_status AS
SELECT
    e.id,
    pg_catalog.format('%I.%I', e.table_schema, e.table_name) AS table_name,
    e.column_name,
    e.model,
    e.replaces,
    (SELECT pg_catalog.count(*) FROM pgsim.queue q WHERE q.embedding_id = e.id) AS queued,
    (SELECT pg_catalog.count(*) FROM pgsim.queue q WHERE q.embedding_id = e.id AND q.attempts > 0) AS retrying,
    (SELECT pg_catalog.count(*) FROM pgsim.dead_letter d WHERE d.embedding_id = e.id) AS dead_letters,
    (SELECT pg_catalog.now() - pg_catalog.min(q.enqueued_at) FROM pgsim.queue q WHERE q.embedding_id = e.id) AS lag
FROM pgsim.embedding e
-- the view reads the queue with its owner's rights: each caller sees the counts of the tables it may read
WHERE pg_catalog.has_any_column_privilege(e.table_oid, 'SELECT');
COMMENT ON VIEW pgsim.sync_status IS 'Per registered column: queue depth, entries retrying, dead letters, and the age of the oldest entry.';
