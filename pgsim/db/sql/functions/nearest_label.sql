-- The label whose vector is nearest (cosine) to `embedding`: zero-shot classification against label
-- descriptions encoded with the column's model.
CREATE OR REPLACE FUNCTION pgsim.nearest_label(
    embedding @extschema:vector@.vector, labels text[], label_vectors @extschema:vector@.vector[]
) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN (
    SELECT u.label FROM unnest(labels, label_vectors) AS u(label, v)
    WHERE u.label IS NOT NULL AND u.v IS NOT NULL
    ORDER BY embedding OPERATOR(@extschema:vector@.<=>) u.v, u.label
    LIMIT 1
);
COMMENT ON FUNCTION pgsim.nearest_label(@extschema:vector@.vector, text[], @extschema:vector@.vector[]) IS
    'Zero-shot label: the label whose vector is nearest (cosine) to the embedding.';
