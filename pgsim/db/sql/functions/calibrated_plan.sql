-- What the stored curve (pgsim.knn_calibration: fresh, for this index) says a search at this selectivity
-- should do: at the measured level next below it (or at most a tenth above: a 20 % level speaks for a filter
-- estimated at 19.9 %), the smallest ef_search whose recall reached `recall`,
-- if that walk was faster than the exact scan there, else the exact path. All NULL when there is no fresh
-- curve, or the filter is below every measured level: then pgsim.knn_plan's thresholds decide. A curve
-- that cannot be read (a malformed row) counts as none. Its search_path is pinned: knn_plan runs under the
-- caller's, so what reads the curve lives here.
CREATE OR REPLACE FUNCTION pgsim.calibrated_plan(
    tbl regclass, attnum smallint, index regclass, selectivity double precision, k integer, recall double precision,
    OUT path text, OUT ef_search integer, OUT max_scan_tuples integer, OUT expected_recall double precision,
    OUT reason text
)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    calibration jsonb := pgsim.knn_calibration(tbl, attnum, index);
    level jsonb;
    share numeric;
    step integer;
    measured_k integer;
    exact_ms double precision;
BEGIN
    IF calibration IS NULL OR jsonb_typeof(calibration -> 'levels') IS DISTINCT FROM 'array'
       OR jsonb_typeof(calibration -> 'ef_search') IS DISTINCT FROM 'array' THEN
        RETURN;
    END IF;
    BEGIN
        SELECT l INTO level FROM jsonb_array_elements(calibration -> 'levels') AS l
        WHERE jsonb_typeof(l -> 'selectivity') = 'number' AND (l ->> 'selectivity')::double precision <= selectivity * 1.1
        ORDER BY (l ->> 'selectivity')::double precision DESC LIMIT 1;
        IF level IS NULL THEN
            RETURN;
        END IF;
        share := round((level ->> 'selectivity')::numeric * 100, 2);
        -- The exact scan's time for this filter: at most what the level's filters took, and, when an index
        -- serves the filter, the rows that pass at a multiple of the unfiltered scan's time per row (fetching
        -- rows by index costs more per row than reading them in order; bench/sweep.py sets the multiple).
        exact_ms := least((level ->> 'exact_ms')::double precision,
                          3 * selectivity * (SELECT (l ->> 'exact_ms')::double precision
                                             FROM jsonb_array_elements(calibration -> 'levels') AS l
                                             WHERE (l ->> 'selectivity')::double precision = 1 LIMIT 1));
        SELECT r.i INTO step FROM jsonb_array_elements_text(level -> 'recall') WITH ORDINALITY AS r(value, i)
        WHERE r.value::double precision >= recall ORDER BY r.i LIMIT 1;
        IF step IS NULL THEN
            path := 'exact';
            expected_recall := 1;
            reason := format('calibrated: at %s%% of the rows no ef_search measured reaches recall %s; exact scan', share, recall);
        -- the walk must beat the exact scan by a margin: both were timed on a few queries, and a walk that
        -- only ties it costs recall for nothing (bench/sweep.py sets the margin)
        ELSIF 1.25 * (level -> 'hnsw_ms' ->> (step - 1))::double precision >= exact_ms THEN
            path := 'exact';
            expected_recall := 1;
            reason := format('calibrated: at %s%% of the rows an HNSW walk that reaches recall %s measured less than '
                             '1.25x faster than the exact scan', share, recall);
        ELSE
            -- measured at one k; a larger k needs a proportionally longer candidate list for the same recall
            measured_k := greatest(coalesce((calibration ->> 'k')::numeric::integer, k), 1);
            path := 'hnsw';
            expected_recall := (level -> 'recall' ->> (step - 1))::double precision;
            ef_search := least(greatest(ceil((calibration -> 'ef_search' ->> (step - 1))::double precision
                                             * greatest(k, measured_k) / measured_k)::integer, k), 1000);
            max_scan_tuples := least(greatest(20000, ceil(k / greatest(selectivity, 1e-9) * 20)), 2000000000)::integer;
            reason := format('calibrated: the filter keeps %s%% of the rows; ef_search %s reached recall %s at %s%%',
                             round((selectivity * 100)::numeric, 2), ef_search, round(expected_recall::numeric, 3), share);
        END IF;
    EXCEPTION WHEN data_exception THEN  -- a number that is not one, say: no curve
        path := NULL; ef_search := NULL; max_scan_tuples := NULL; expected_recall := NULL; reason := NULL;
    END;
END;
$$;
