-- Chunked embeddings (pgsim.chunks): a registration whose documents are cut into chunks of at most `tokens`
-- word pieces of the model's tokenizer, `overlap` of them shared by neighbours. The chunks' vectors live in a
-- table pgsim makes next to the registered table (same schema, same owner), recorded here by OID; the queue
-- worker replaces a document's chunks in the transaction that writes its vector. A registration removed takes
-- its row with it (pgsim drops the chunk table first).
CREATE TABLE pgsim.chunking (
    embedding_id integer PRIMARY KEY,
    table_oid oid NOT NULL,              -- the registered table: what the policies below check
    tokens integer NOT NULL CHECK (tokens >= 8),
    overlap integer NOT NULL CHECK (overlap >= 0 AND overlap < tokens),
    chunk_table oid NOT NULL UNIQUE,     -- the table of chunk vectors (pg_class OID)
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    FOREIGN KEY (embedding_id, table_oid) REFERENCES pgsim.embedding (id, table_oid) ON DELETE CASCADE
);
COMMENT ON TABLE pgsim.chunking IS
    'Registrations whose documents are chunked: chunk size and overlap in word pieces, and the chunk table.';

-- Anyone who may read the registered table (or a column of it) reads its chunk settings; only its owner (or a
-- member of the owning role) writes them, and only for a chunk table of that same owner, since the worker
-- writes there and searches read it.
ALTER TABLE pgsim.chunking ENABLE ROW LEVEL SECURITY;
CREATE POLICY chunking_read ON pgsim.chunking FOR SELECT
    USING (pg_catalog.has_any_column_privilege(table_oid, 'SELECT'));
CREATE POLICY chunking_owners ON pgsim.chunking FOR ALL
    USING (pg_catalog.pg_has_role(CURRENT_USER,
        (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = table_oid), 'USAGE'))
    WITH CHECK (pg_catalog.pg_has_role(CURRENT_USER,
        (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = table_oid), 'USAGE')
        AND (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = chunk_table)
            = (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = table_oid));
-- Every batch of every registration looks its chunk table up here, so every role that reaches schema pgsim
-- may read it (the policy above shows the rows of tables it may read): a worker role granted before this
-- table existed would otherwise fail every batch, chunked or not, from the upgrade on.
GRANT SELECT ON pgsim.chunking TO PUBLIC;
