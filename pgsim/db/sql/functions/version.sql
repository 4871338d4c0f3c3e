-- The ledger's newest entry: an install that changes anything records its package version on what it
-- applies (a numbered file, or a function file whose text changed).
-- Its names are bound when the installer creates it, with search_path pg_catalog, pg_temp (pgsim.db.sqlfiles).
CREATE OR REPLACE FUNCTION pgsim.version() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT package_version FROM pgsim.migration ORDER BY applied_at DESC, name DESC LIMIT 1;
END;
COMMENT ON FUNCTION pgsim.version() IS 'The pgsim package version that last changed this schema.';
