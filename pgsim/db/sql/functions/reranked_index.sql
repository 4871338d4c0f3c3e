-- The index whose walk yields candidates that searches re-rank by cosine distance on the full vectors:
-- pgsim.prefix_index for a column registered with a prefix (Matryoshka prefix storage), else
-- pgsim.bit_index (binary-quantised storage); NULL when the column has no such index. A column registered
-- with a prefix never walks a bit index: searches order their candidates by the registered kind's expression.
CREATE OR REPLACE FUNCTION pgsim.reranked_index(tbl regclass, col name) RETURNS text
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT CASE WHEN pgsim.index_prefix(tbl, col) IS NOT NULL
                THEN pgsim.prefix_index(tbl, col) ELSE pgsim.bit_index(tbl, col) END;
END;
COMMENT ON FUNCTION pgsim.reranked_index(regclass, name) IS
    'The prefix or bit index on tbl.col whose walk yields candidates re-ranked on the full vectors, or NULL.';
