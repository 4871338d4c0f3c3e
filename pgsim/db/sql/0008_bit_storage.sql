-- Binary-quantised storage (dtype 'bit'): the column keeps the full vector (vector(d)), which every exact
-- scan and every re-rank reads; the HNSW index is over binary_quantize(column)::bit(d) with Hamming
-- distance, about a sixth of a cosine index's size at 384 dimensions. A search walks the bit index for
-- candidates and re-ranks them by cosine distance on the full vectors (pgsim.knn, pgsim.search).
ALTER TABLE pgsim.embedding DROP CONSTRAINT embedding_dtype_check;
ALTER TABLE pgsim.embedding ADD CONSTRAINT embedding_dtype_check CHECK (dtype IN ('vector', 'halfvec', 'bit'));
COMMENT ON COLUMN pgsim.embedding.dtype IS
    'vector or halfvec: the column''s type, and its cosine HNSW index''s; bit: a vector column with a Hamming HNSW '
    'index over binary_quantize(column)::bit(dimension), searched by candidates re-ranked on the full vectors.';
