-- Registrations follow their table by OID, never by a name another role could create; only a role with the
-- privileges of a table's owner may add, change or remove that table's registrations or queue its rows
-- (row-level security on pgsim.embedding and pgsim.queue). pgsim.enqueue and pgsim.forget_dropped run as
-- pgsim's owner, which row-level security does not restrict.

ALTER TABLE pgsim.embedding ADD COLUMN table_oid oid;
-- An earlier pgsim followed renames lazily, through the insert trigger it made, so a stored name may be
-- stale (or taken by another table since): take the table from that trigger (pgsim.enqueue, named after
-- the registration), preferring the one whose name still matches where a like-named trigger was planted
-- elsewhere; a registration with several candidates and no match, or none, is forgotten.
UPDATE pgsim.embedding e SET table_oid = found.table_oid
FROM (
    SELECT r.id, count(*) AS candidates, bool_or((n.nspname, c.relname) = (r.table_schema, r.table_name)) AS named,
           (pg_catalog.array_agg(t.tgrelid ORDER BY (n.nspname, c.relname) = (r.table_schema, r.table_name) DESC))[1]
               AS table_oid
    FROM pgsim.embedding r
    JOIN pg_catalog.pg_trigger t ON t.tgname = pg_catalog.format('pgsim_%s_insert', r.id)
        AND t.tgfoid = pg_catalog.to_regprocedure('pgsim.enqueue()') AND NOT t.tgisinternal
    JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    GROUP BY r.id
) AS found
WHERE found.id = e.id AND (found.named OR found.candidates = 1);
DELETE FROM pgsim.queue WHERE embedding_id IN (SELECT id FROM pgsim.embedding WHERE table_oid IS NULL);
DELETE FROM pgsim.dead_letter WHERE embedding_id IN (SELECT id FROM pgsim.embedding WHERE table_oid IS NULL);
DELETE FROM pgsim.embedding WHERE table_oid IS NULL;
ALTER TABLE pgsim.embedding ALTER COLUMN table_oid SET NOT NULL;
ALTER TABLE pgsim.embedding ADD CONSTRAINT embedding_table_oid_column_name_key UNIQUE (table_oid, column_name);
COMMENT ON COLUMN pgsim.embedding.table_oid IS
    'The registered table (pg_class.oid); table_schema and table_name follow it when it is renamed.';

ALTER TABLE pgsim.embedding ENABLE ROW LEVEL SECURITY;
CREATE POLICY registry_read ON pgsim.embedding FOR SELECT USING (true);
CREATE POLICY registry_owners ON pgsim.embedding FOR ALL
    USING (pg_catalog.pg_has_role(CURRENT_USER,
        (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = table_oid), 'USAGE'))
    WITH CHECK (pg_catalog.pg_has_role(CURRENT_USER,
        (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = table_oid), 'USAGE'));

ALTER TABLE pgsim.queue ENABLE ROW LEVEL SECURITY;
CREATE POLICY queue_read ON pgsim.queue FOR SELECT USING (true);
CREATE POLICY queue_update ON pgsim.queue FOR UPDATE USING (true);
CREATE POLICY queue_delete ON pgsim.queue FOR DELETE USING (true);
CREATE POLICY queue_owners ON pgsim.queue FOR INSERT
    WITH CHECK (EXISTS (
        SELECT 1 FROM pgsim.embedding e JOIN pg_catalog.pg_class c ON c.oid = e.table_oid
        WHERE e.id = embedding_id AND pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE')));
