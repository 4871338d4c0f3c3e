-- Maximal marginal relevance: positions (1-based) into `candidates`, in the order picked. Each pick
-- maximises lambda * sim(query, c) - (1 - lambda) * max sim(c, already picked); lambda 1 is plain
-- relevance order, lower values trade relevance for diversity.
CREATE OR REPLACE FUNCTION pgsim.mmr(
    query @extschema:vector@.vector, candidates @extschema:vector@.vector[], k integer, lambda double precision
) RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer := coalesce(cardinality(candidates), 0);
    relevance double precision[];
    redundancy double precision[] := array_fill(0.0::double precision, ARRAY[n]);
    picked boolean[] := array_fill(false, ARRAY[n]);
    chosen integer[] := '{}';
    best integer;
    best_score double precision;
    score double precision;
BEGIN
    IF lambda IS NULL OR lambda < 0 OR lambda > 1 THEN  -- NaN sorts above 1 in PostgreSQL
        RAISE EXCEPTION 'lambda must be between 0 and 1; got %', lambda
            USING ERRCODE = 'invalid_parameter_value', HINT = '1 ranks by relevance only, 0 by novelty only.';
    END IF;
    IF k IS NULL OR k < 0 THEN
        RAISE EXCEPTION 'k must be 0 or more; got %', k USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT array_agg(1 - (query OPERATOR(@extschema:vector@.<=>) c) ORDER BY o) INTO relevance
    FROM unnest(candidates) WITH ORDINALITY AS u(c, o);
    FOR step IN 1 .. least(k, n) LOOP
        best := NULL;
        FOR i IN 1 .. n LOOP
            CONTINUE WHEN picked[i];
            score := lambda * relevance[i] - (1 - lambda) * redundancy[i];
            IF best IS NULL OR score > best_score THEN
                best := i;
                best_score := score;
            END IF;
        END LOOP;
        picked[best] := true;
        chosen := chosen || best;
        FOR i IN 1 .. n LOOP
            CONTINUE WHEN picked[i];
            redundancy[i] := greatest(
                CASE WHEN step = 1 THEN '-Infinity'::double precision ELSE redundancy[i] END,
                1 - (candidates[i] OPERATOR(@extschema:vector@.<=>) candidates[best])
            );
        END LOOP;
    END LOOP;
    RETURN chosen;
END
$$;
COMMENT ON FUNCTION pgsim.mmr(@extschema:vector@.vector, @extschema:vector@.vector[], integer, double precision) IS
    'Maximal marginal relevance: 1-based positions into candidates, in the order picked.';
