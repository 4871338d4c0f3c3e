"""``op.change_embedding`` offline: the DO block that makes :func:`pgsim.alembic.change_ops.apply_change`'s
decisions and changes in SQL, when the script runs (``alembic upgrade --sql``)."""

# apply_change in SQL (the registration's columns compared as apply_change compares Definitions); a NULL
# source, model or dtype keeps the registered one. The columns a new source reads are found by
# register_embedding, in the table's order, as pgsim.change_embedding finds them. The new column gets the
# old one's column grants, as pgsim.change_embedding gives them. A chunked column is refused: its chunks are
# made by pgsim's Python code. A change of prefix alone builds the index again under a staging name (the first
# of {staged_names} that is free, or an index of this table's that is not its registered one) and swaps it in,
# as pgsim.columns.prefix_change does (without CONCURRENTLY: the script runs in a transaction).
OFFLINE_CHANGE = """DO $pgsim$
DECLARE
    target regclass := {table}::regclass;
    registered pgsim.embedding;
    changing pgsim.embedding;
    wanted_source text;
    wanted_model text;
    wanted_revision text;
    wanted_dtype text;
    wanted_prefix integer;
    granted record;
    chunked boolean;
    table_schema name;
    extension_schema name;
    key text;
    staged name;
    candidate name;
    holder record;
BEGIN
    SELECT * INTO registered FROM pgsim.embedding
    WHERE table_oid = target AND column_name = {column} AND replaces IS NULL;
    IF registered.id IS NULL THEN
        RAISE EXCEPTION '%.% is not a registered embedding column.', target, {column};
    END IF;
    IF pg_catalog.to_regclass('pgsim.chunking') IS NOT NULL THEN
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM pgsim.chunking WHERE embedding_id OPERATOR(pg_catalog.=) $1)'
            INTO chunked USING registered.id;
        IF chunked THEN
            RAISE EXCEPTION '%.% is chunked: its change runs online only, not from an offline (--sql) script.',
                target, {column} USING HINT = 'Run the migration online, or pgsim change-embedding.';
        END IF;
    END IF;
    wanted_source := coalesce({source}, registered.source);
    wanted_model := coalesce({model}, registered.model);
    wanted_revision := coalesce({revision}, registered.model_revision);
    wanted_dtype := coalesce({dtype}, registered.dtype);
    wanted_prefix := CASE WHEN {prefix_given} THEN {prefix}::integer ELSE registered.prefix END;
    IF wanted_prefix IS NOT NULL AND (wanted_dtype <> 'vector'
                                      OR wanted_prefix >= coalesce({dimension}, registered.dimension)) THEN
        RAISE EXCEPTION 'prefix=% needs a vector column of more than % dimensions (%.% would be % of %).',
            wanted_prefix, wanted_prefix, target, {column}, wanted_dtype, coalesce({dimension}, registered.dimension);
    END IF;
    SELECT * INTO changing FROM pgsim.embedding WHERE replaces = registered.id AND table_oid = target;
    IF changing.id IS NOT NULL THEN
        IF ROW(changing.source, changing.model, changing.model_revision, changing.dtype, changing.prefix)
           IS NOT DISTINCT FROM ROW(wanted_source, wanted_model, wanted_revision, wanted_dtype, wanted_prefix) THEN
            RETURN;  -- under way: the workers finish it
        END IF;
        PERFORM pgsim.unregister_embedding(changing.id, true);  -- cancelled, as pgsim.remove_embedding does
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = target
                       AND tgname = pg_catalog.format('pgsim_%s_insert', registered.id)) THEN
            PERFORM pgsim.create_triggers(registered.id);
            PERFORM pgsim.queue_rows(registered.id, false);
        END IF;
    END IF;
    IF (registered.source, registered.model, registered.model_revision, registered.dtype)
       = (wanted_source, wanted_model, wanted_revision, wanted_dtype) THEN
        IF registered.prefix IS NOT DISTINCT FROM wanted_prefix THEN
            RETURN;
        END IF;
        IF registered.index_name IS NOT NULL AND registered.index_m IS NOT NULL THEN  -- the vectors stay
            SELECT n.nspname INTO table_schema FROM pg_catalog.pg_class c
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = target;
            SELECT n.nspname INTO extension_schema FROM pg_catalog.pg_extension x
            JOIN pg_catalog.pg_namespace n ON n.oid = x.extnamespace WHERE x.extname = 'vector';
            FOREACH candidate IN ARRAY {staged_names}::name[] LOOP
                CONTINUE WHEN candidate = registered.index_name;
                SELECT c.relkind, i.indrelid INTO holder FROM pg_catalog.pg_class c
                LEFT JOIN pg_catalog.pg_index i ON i.indexrelid = c.oid
                WHERE c.relnamespace = pg_catalog.to_regnamespace(table_schema) AND c.relname = candidate;
                IF NOT FOUND THEN
                    staged := candidate;
                ELSIF holder.relkind = 'i' AND holder.indrelid = target THEN  -- left by an interrupted change
                    EXECUTE pg_catalog.format('DROP INDEX %I.%I', table_schema, candidate);
                    staged := candidate;
                END IF;
                EXIT WHEN staged IS NOT NULL;
            END LOOP;
            IF staged IS NULL THEN
                RAISE EXCEPTION 'No free name for the new index of %.%: other objects hold %.', target, {column},
                    {staged_names}::name[] USING HINT = 'Rename them first.';
            END IF;
            key := CASE WHEN wanted_prefix IS NULL THEN pg_catalog.quote_ident({column})
                   ELSE pg_catalog.format('((%I.subvector(%I, 1, %s))::%I.vector(%s))', extension_schema,
                                          {column}, wanted_prefix, extension_schema, wanted_prefix) END;
            EXECUTE pg_catalog.format(
                'CREATE INDEX %I ON %s USING hnsw (%s %I.vector_cosine_ops) WITH (m = %s, ef_construction = %s)',
                staged, target, key, extension_schema, coalesce({m}, registered.index_m),
                coalesce({ef_construction}, registered.index_ef_construction));
            EXECUTE pg_catalog.format('DROP INDEX IF EXISTS %I.%I', table_schema, registered.index_name);
            EXECUTE pg_catalog.format('ALTER INDEX %I.%I RENAME TO %I', table_schema, staged, registered.index_name);
            UPDATE pgsim.embedding SET index_m = coalesce({m}, index_m),
                index_ef_construction = coalesce({ef_construction}, index_ef_construction)
            WHERE id = registered.id;
        END IF;
        UPDATE pgsim.embedding SET prefix = wanted_prefix WHERE id = registered.id;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = target AND attname = {next_column}
               AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'Column %.% exists already (left by a cancelled change?).', target, {next_column}
            USING HINT = 'Its vectors cannot be trusted to be the new definition''s. Drop it, then run this again.';
    END IF;
    PERFORM pgsim.register_embedding(target => target, column_name => {next_column}, source => wanted_source,
        model => wanted_model, model_revision => wanted_revision,
        dimension => coalesce({dimension}, registered.dimension), dtype => wanted_dtype, index_name => NULL,
        index_m => coalesce({m}, registered.index_m),
        index_ef_construction => coalesce({ef_construction}, registered.index_ef_construction),
        source_columns => CASE WHEN {source}::text IS NULL THEN registered.source_columns END,
        queue_existing => true, replaces => registered.id, stale => registered.stale, prefix => wanted_prefix);
    FOR granted IN SELECT a.privilege_type, a.grantee FROM pg_catalog.pg_attribute c
                   CROSS JOIN LATERAL pg_catalog.aclexplode(c.attacl) AS a
                   WHERE c.attrelid = target AND c.attname = registered.column_name
                     AND a.privilege_type IN ('SELECT', 'INSERT', 'UPDATE', 'REFERENCES') LOOP
        EXECUTE pg_catalog.format('GRANT %s (%I) ON %s TO %s', granted.privilege_type, {next_column}, target,
            CASE WHEN granted.grantee = 0 THEN 'PUBLIC' ELSE granted.grantee::regrole::text END);
    END LOOP;
    IF wanted_source <> registered.source THEN
        PERFORM pgsim.freeze_embedding(registered.id);
    END IF;
END
$pgsim$"""
