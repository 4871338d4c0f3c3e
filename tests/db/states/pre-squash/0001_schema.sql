-- pgsim's schema. Append-only once released: later changes go into new numbered files.
-- The installer runs this with search_path = pgsim, <the vector extension's schema>, pg_catalog.
COMMENT ON SCHEMA pgsim IS 'pgsim: similarity search for PostgreSQL';

CREATE FUNCTION pgsim.version() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT package_version FROM pgsim.migration ORDER BY name DESC LIMIT 1;
END;
COMMENT ON FUNCTION pgsim.version() IS 'The pgsim package version that last changed this schema.';

-- Cosine similarity in [-1, 1], for the SELECT list. To rank, ORDER BY embedding <=> query: an HNSW
-- index serves that, and no index serves a filter or ordering written on this function.
CREATE FUNCTION pgsim.cosine_similarity(a vector, b vector) RETURNS double precision
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN 1 - (a <=> b);
