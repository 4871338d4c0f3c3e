-- An index built for pgsim (pgsim index-advise) carries the ef_search it was measured to need in its
-- comment, 'pgsim: ef_search=N'; other indexes get the caller's default.
-- Its names are bound when the installer creates it, with search_path pg_catalog, pg_temp (pgsim.db.sqlfiles).
CREATE OR REPLACE FUNCTION pgsim.index_ef_search(index regclass, default_ef integer) RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE
RETURN coalesce(substring(obj_description(index, 'pg_class') FROM 'pgsim: ef_search=([0-9]+)')::integer, default_ef);
