-- Reciprocal rank fusion: one list's contribution for a row at 1-based `rank` (NULL: not in that list).
-- Its names are bound when the installer creates it, with search_path pg_catalog, pg_temp (pgsim.db.sqlfiles).
CREATE OR REPLACE FUNCTION pgsim.rrf(rank bigint, k integer DEFAULT 60) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN rank IS NULL THEN 0.0 ELSE 1.0::double precision / (k + rank) END;
COMMENT ON FUNCTION pgsim.rrf(bigint, integer) IS
    'Reciprocal rank fusion term 1 / (k + rank); 0 for a row missing from the list. Sum it over the lists.';
