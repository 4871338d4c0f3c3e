-- The HNSW index of binary-quantised storage (dtype 'bit') on tbl.col: Hamming distance over exactly
-- binary_quantize(col)::bit(n), n the column's dimension, valid, not partial, first by name; NULL when there
-- is none. The expression is compared as PostgreSQL prints it (with pgvector's schema or without, as the
-- caller's search_path shows it) after pg_depend has found the index reads col and pgvector's
-- binary_quantize: an index over another expression of the column (l2_normalize(col), a shorter bit(m)) is
-- not the one searches order by, and would hide the real one. Searches order their candidates by exactly
-- that expression, and check with EXPLAIN that PostgreSQL scans this index for it (else they scan exactly).
-- The name is printed as the caller's search_path shows it, as pgsim.knn_plan's index names are.
CREATE OR REPLACE FUNCTION pgsim.bit_index(tbl regclass, col name) RETURNS text
LANGUAGE sql STABLE
BEGIN ATOMIC
    SELECT i.indexrelid::regclass::text
    FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_am am ON am.oid = c.relam
    JOIN pg_opclass oc ON oc.oid = i.indclass[0]
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped
    WHERE i.indrelid = tbl::oid AND am.amname = 'hnsw' AND i.indnkeyatts = 1 AND i.indkey[0] = 0
      AND i.indisvalid AND i.indpred IS NULL AND oc.opcname = 'bit_hamming_ops'
      AND EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                  AND d.refclassid = 'pg_class'::regclass AND d.refobjid = tbl::oid AND d.refobjsubid = a.attnum)
      AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                      AND d.refclassid = 'pg_class'::regclass AND d.refobjid = tbl::oid
                      AND d.refobjsubid NOT IN (0, a.attnum))
      AND EXISTS (SELECT FROM pg_depend d
                  JOIN pg_proc p ON p.oid = d.refobjid
                  JOIN pg_extension x ON x.extnamespace = p.pronamespace AND x.extname = 'vector'
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                    AND d.refclassid = 'pg_proc'::regclass AND p.proname = 'binary_quantize')
      AND pg_get_indexdef(i.indexrelid, 1, true) IN (
          format('(binary_quantize(%I)::bit(%s))', col, a.atttypmod),
          (SELECT format('(%s.binary_quantize(%I)::bit(%s))', quote_ident(n.nspname), col, a.atttypmod)
           FROM pg_extension x JOIN pg_namespace n ON n.oid = x.extnamespace WHERE x.extname = 'vector'))
    ORDER BY c.relname COLLATE "C"
    LIMIT 1;
END;
COMMENT ON FUNCTION pgsim.bit_index(regclass, name) IS
    'The Hamming HNSW index over binary_quantize(col)::bit(n) on tbl.col (dtype bit), or NULL.';
