-- The HNSW index of Matryoshka prefix storage on tbl.col: cosine distance over exactly
-- subvector(col, 1, p)::vector(p), p the prefix the registry records for the column (pgsim.index_prefix),
-- valid, not partial, first by name; NULL when the column has no registered prefix or no such index. As
-- pgsim.bit_index does, it checks with pg_depend that the index reads col and pgvector's subvector, then
-- compares the expression as PostgreSQL prints it (with pgvector's schema or without, as the caller's
-- search_path shows it): an index over another prefix or another expression of the column is not the one searches order by. The name is
-- printed as the caller's search_path shows it, as pgsim.knn_plan's index names are.
CREATE OR REPLACE FUNCTION pgsim.prefix_index(tbl regclass, col name) RETURNS text
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT i.indexrelid::regclass::text
    FROM (SELECT pgsim.index_prefix(tbl, col) AS prefix) AS e
    JOIN pg_index i ON i.indrelid = tbl::oid
    JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_am am ON am.oid = c.relam
    JOIN pg_opclass oc ON oc.oid = i.indclass[0]
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped
    WHERE e.prefix IS NOT NULL AND am.amname = 'hnsw' AND i.indnkeyatts = 1 AND i.indkey[0] = 0
      AND i.indisvalid AND i.indpred IS NULL AND oc.opcname = 'vector_cosine_ops'
      AND EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                  AND d.refclassid = 'pg_class'::regclass AND d.refobjid = tbl::oid AND d.refobjsubid = a.attnum)
      AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                      AND d.refclassid = 'pg_class'::regclass AND d.refobjid = tbl::oid
                      AND d.refobjsubid NOT IN (0, a.attnum))
      AND EXISTS (SELECT FROM pg_depend d
                  JOIN pg_proc p ON p.oid = d.refobjid
                  JOIN pg_extension x ON x.extnamespace = p.pronamespace AND x.extname = 'vector'
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                    AND d.refclassid = 'pg_proc'::regclass AND p.proname = 'subvector')
      AND pg_get_indexdef(i.indexrelid, 1, true) IN (
          format('(subvector(%I, 1, %s)::vector(%s))', col, e.prefix, e.prefix),
          (SELECT format('(%1$s.subvector(%2$I, 1, %3$s)::%1$s.vector(%3$s))', quote_ident(n.nspname), col, e.prefix)
           FROM pg_extension x JOIN pg_namespace n ON n.oid = x.extnamespace WHERE x.extname = 'vector'))
    ORDER BY c.relname COLLATE "C"
    LIMIT 1;
END;
COMMENT ON FUNCTION pgsim.prefix_index(regclass, name) IS
    'The cosine HNSW index over subvector(col, 1, prefix)::vector(prefix) on tbl.col (Matryoshka prefix storage), or NULL.';
