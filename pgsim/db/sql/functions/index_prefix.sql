-- The prefix length the registry records for tbl.col (Matryoshka prefix storage: its index holds each
-- vector's first `prefix` values), or NULL. Every search plans with it, including a role that may search a
-- table but was never granted SELECT on pgsim's registry: SECURITY DEFINER, so the registry is read with its
-- owner's rights, and it returns one number of one registration, nothing the caller could not learn from the
-- index's own definition in the catalog.
CREATE OR REPLACE FUNCTION pgsim.index_prefix(tbl regclass, col name) RETURNS integer
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT e.prefix FROM pgsim.embedding e WHERE e.table_oid = tbl::oid AND e.column_name = col;
END;
COMMENT ON FUNCTION pgsim.index_prefix(regclass, name) IS
    'The length of the vectors'' prefix the index of tbl.col holds (prefix storage), or NULL.';
