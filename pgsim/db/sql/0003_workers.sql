-- Who keeps a registration in sync: its table's owner, or a worker of that table, that is a role that may
-- UPDATE the embedding column (pgsim grant worker gives that). Only they may queue, claim, retry, bury and
-- requeue the registration's entries; any other role sees only the entries of tables it may read. pgsim's
-- owner (it owns these tables) and superusers are not restricted. pgsim.enqueue runs as pgsim's owner.
DROP POLICY queue_read ON pgsim.queue;
DROP POLICY queue_update ON pgsim.queue;
DROP POLICY queue_delete ON pgsim.queue;
DROP POLICY queue_owners ON pgsim.queue;
CREATE POLICY queue_read ON pgsim.queue FOR SELECT USING (EXISTS (
    SELECT 1 FROM pgsim.embedding e
    WHERE e.id = embedding_id AND pg_catalog.has_any_column_privilege(e.table_oid, 'SELECT')));
CREATE POLICY queue_workers ON pgsim.queue FOR ALL
    USING (EXISTS (
        SELECT 1 FROM pgsim.embedding e JOIN pg_catalog.pg_class c ON c.oid = e.table_oid
        WHERE e.id = embedding_id
          AND (pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE')
               OR pg_catalog.has_column_privilege(e.table_oid, e.column_name::text, 'UPDATE'))))
    WITH CHECK (EXISTS (
        SELECT 1 FROM pgsim.embedding e JOIN pg_catalog.pg_class c ON c.oid = e.table_oid
        WHERE e.id = embedding_id
          AND (pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE')
               OR pg_catalog.has_column_privilege(e.table_oid, e.column_name::text, 'UPDATE'))));

ALTER TABLE pgsim.dead_letter ENABLE ROW LEVEL SECURITY;
CREATE POLICY dead_letter_read ON pgsim.dead_letter FOR SELECT USING (EXISTS (
    SELECT 1 FROM pgsim.embedding e
    WHERE e.id = embedding_id AND pg_catalog.has_any_column_privilege(e.table_oid, 'SELECT')));
CREATE POLICY dead_letter_workers ON pgsim.dead_letter FOR ALL
    USING (EXISTS (
        SELECT 1 FROM pgsim.embedding e JOIN pg_catalog.pg_class c ON c.oid = e.table_oid
        WHERE e.id = embedding_id
          AND (pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE')
               OR pg_catalog.has_column_privilege(e.table_oid, e.column_name::text, 'UPDATE'))))
    WITH CHECK (EXISTS (
        SELECT 1 FROM pgsim.embedding e JOIN pg_catalog.pg_class c ON c.oid = e.table_oid
        WHERE e.id = embedding_id
          AND (pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE')
               OR pg_catalog.has_column_privilege(e.table_oid, e.column_name::text, 'UPDATE'))));
