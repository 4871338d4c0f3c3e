-- Cosine similarity in [-1, 1], for the SELECT list. To rank, ORDER BY embedding <=> query: an HNSW
-- index serves that, and no index serves a filter or ordering written on this function.
CREATE OR REPLACE FUNCTION pgsim.cosine_similarity(a @extschema:vector@.vector, b @extschema:vector@.vector)
RETURNS double precision
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN 1 - (a OPERATOR(@extschema:vector@.<=>) b);
