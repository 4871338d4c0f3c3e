CREATE OR REPLACE FUNCTION pgsim.estimate_rows(tbl regclass, filter text DEFAULT NULL) RETURNS double precision
LANGUAGE plpgsql VOLATILE  -- PostgreSQL allows EXPLAIN only in volatile functions
AS $$
DECLARE
    plan json;
BEGIN
    EXECUTE format('EXPLAIN (FORMAT JSON) SELECT 1 FROM %s WHERE %s', tbl, coalesce(nullif(filter, ''), 'true'))
        INTO plan;
    RETURN (plan -> 0 -> 'Plan' ->> 'Plan Rows')::double precision;
END;
$$;
COMMENT ON FUNCTION pgsim.estimate_rows(regclass, text) IS
    'The planner''s estimate of the rows of tbl that pass filter (an SQL boolean expression over tbl).';
