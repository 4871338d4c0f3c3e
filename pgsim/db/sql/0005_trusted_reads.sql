-- Queue entries and dead letters carry rows' keys and, in an error, values of their source: only the roles
-- that keep a registration in sync (its table's owner, or a role that may update its embedding column)
-- read them, as they write them. The embedding column is found by name through pg_attribute, so a renamed
-- or dropped column makes the predicate false instead of an error for every reader.
DROP POLICY queue_read ON pgsim.queue;
DROP POLICY queue_workers ON pgsim.queue;
CREATE POLICY queue_workers ON pgsim.queue FOR ALL
    USING (EXISTS (
        SELECT 1 FROM pgsim.embedding e
        JOIN pg_catalog.pg_class c ON c.oid = e.table_oid
        LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = e.table_oid AND a.attname = e.column_name
            AND a.attnum > 0 AND NOT a.attisdropped
        WHERE e.id = embedding_id
          AND (pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE')
               OR coalesce(pg_catalog.has_column_privilege(e.table_oid, a.attnum, 'UPDATE'), false))))
    WITH CHECK (EXISTS (
        SELECT 1 FROM pgsim.embedding e
        JOIN pg_catalog.pg_class c ON c.oid = e.table_oid
        LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = e.table_oid AND a.attname = e.column_name
            AND a.attnum > 0 AND NOT a.attisdropped
        WHERE e.id = embedding_id
          AND (pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE')
               OR coalesce(pg_catalog.has_column_privilege(e.table_oid, a.attnum, 'UPDATE'), false))));

DROP POLICY dead_letter_read ON pgsim.dead_letter;
DROP POLICY dead_letter_workers ON pgsim.dead_letter;
CREATE POLICY dead_letter_workers ON pgsim.dead_letter FOR ALL
    USING (EXISTS (
        SELECT 1 FROM pgsim.embedding e
        JOIN pg_catalog.pg_class c ON c.oid = e.table_oid
        LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = e.table_oid AND a.attname = e.column_name
            AND a.attnum > 0 AND NOT a.attisdropped
        WHERE e.id = embedding_id
          AND (pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE')
               OR coalesce(pg_catalog.has_column_privilege(e.table_oid, a.attnum, 'UPDATE'), false))))
    WITH CHECK (EXISTS (
        SELECT 1 FROM pgsim.embedding e
        JOIN pg_catalog.pg_class c ON c.oid = e.table_oid
        LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = e.table_oid AND a.attname = e.column_name
            AND a.attnum > 0 AND NOT a.attisdropped
        WHERE e.id = embedding_id
          AND (pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE')
               OR coalesce(pg_catalog.has_column_privilege(e.table_oid, a.attnum, 'UPDATE'), false))));

-- A registration changes model or source into another column of its own table only (checked by a foreign
-- key, which row-level security does not hide rows from; deferred, as a switch removes the old registration
-- before it clears the new one's replaces).
UPDATE pgsim.embedding e SET replaces = NULL
WHERE replaces IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM pgsim.embedding r WHERE r.id = e.replaces AND r.table_oid = e.table_oid);
ALTER TABLE pgsim.embedding ADD CONSTRAINT embedding_id_table_oid_key UNIQUE (id, table_oid);
ALTER TABLE pgsim.embedding ADD CONSTRAINT embedding_replaces_same_table FOREIGN KEY (replaces, table_oid)
    REFERENCES pgsim.embedding (id, table_oid) DEFERRABLE INITIALLY DEFERRED;

-- The content-hash cache: each entry says which role stored it, and a role reads only the entries of roles
-- whose privileges it has (itself, the roles it inherits from; pgsim's owner reads all), so no role can
-- plant a vector for a text another role's worker will look up, nor learn which texts other roles store.
ALTER TABLE pgsim.embedding_cache ADD COLUMN stored_by oid NOT NULL
    DEFAULT pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER))::oid;
ALTER TABLE pgsim.embedding_cache DROP CONSTRAINT embedding_cache_pkey;
ALTER TABLE pgsim.embedding_cache ADD PRIMARY KEY (model, model_revision, digest, stored_by);
ALTER TABLE pgsim.embedding_cache ENABLE ROW LEVEL SECURITY;
CREATE POLICY cache_trusted ON pgsim.embedding_cache FOR SELECT
    USING (pg_catalog.pg_has_role(CURRENT_USER, stored_by, 'USAGE'));
CREATE POLICY cache_own ON pgsim.embedding_cache FOR INSERT
    WITH CHECK (stored_by = pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER))::oid);
COMMENT ON COLUMN pgsim.embedding_cache.stored_by IS
    'The role that stored the entry; a role reads the entries of the roles whose privileges it has.';
