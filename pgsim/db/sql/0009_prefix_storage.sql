-- Matryoshka prefix storage: the column keeps the full vector(d), which every exact scan and every re-rank
-- reads; the HNSW index is cosine over its first `prefix` values, subvector(column, 1, prefix)::vector(prefix),
-- for a model trained so that such a prefix ranks nearly as the whole vector does. A search walks that index
-- for candidates and re-ranks them by cosine distance on the full vectors (pgsim.knn, pgsim.search).
ALTER TABLE pgsim.embedding ADD COLUMN prefix integer;
ALTER TABLE pgsim.embedding ADD CONSTRAINT embedding_prefix_check
    CHECK (prefix IS NULL OR (prefix > 0 AND prefix < dimension AND dtype = 'vector'));
COMMENT ON COLUMN pgsim.embedding.prefix IS
    'NULL, or the length of the prefix of each vector the column''s cosine HNSW index holds (Matryoshka prefix '
    'storage, dtype vector): subvector(column, 1, prefix)::vector(prefix), searched by candidates re-ranked on '
    'the full vectors.';
