CREATE OR REPLACE FUNCTION pgsim.estimate_rows(tbl regclass, filter text DEFAULT NULL) RETURNS double precision
LANGUAGE plpgsql VOLATILE  -- PostgreSQL allows EXPLAIN only in volatile functions
AS $$
DECLARE
    plan json;
BEGIN
    -- FOR ... IN EXECUTE opens the text as a cursor, which must be one statement: a filter that ends the
    -- statement and starts another ("true; DELETE ...") is an error, never a second statement (EXECUTE ...
    -- INTO would run it, USING or not).
    FOR plan IN EXECUTE pg_catalog.format('EXPLAIN (FORMAT JSON) SELECT 1 FROM %s WHERE %s', tbl, coalesce(nullif(filter, ''), 'true'))
    LOOP
    END LOOP;
    -- keys typed: an unknown literal would match a ->(json, json) of another role's in a schema on the path
    RETURN (plan -> 0 -> 'Plan'::pg_catalog.text ->> 'Plan Rows'::pg_catalog.text)::double precision;
END;
$$;
COMMENT ON FUNCTION pgsim.estimate_rows(regclass, text) IS
    'The planner''s estimate of the rows of tbl that pass filter (an SQL boolean expression over tbl).';
