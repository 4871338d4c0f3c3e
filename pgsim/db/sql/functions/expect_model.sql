-- A search that encoded its query with a model passes that model here, in the statement itself, so a
-- model change committed between planning and running cannot make it compare vectors of two models.
-- A NULL model (the caller passed a vector) is not checked.
CREATE OR REPLACE FUNCTION pgsim.expect_model(tbl_schema name, tbl name, col name, model text, revision text)
RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    registered pgsim.embedding;
BEGIN
    SELECT * INTO registered FROM pgsim.embedding e
    WHERE e.table_schema = tbl_schema AND e.table_name = tbl AND e.column_name = col;
    IF FOUND AND model IS NOT NULL
       AND (registered.model IS DISTINCT FROM model OR registered.model_revision IS DISTINCT FROM revision) THEN
        RAISE EXCEPTION 'pgsim: %.%.% holds embeddings of model % (revision %), not % (revision %)',
            tbl_schema, tbl, col, registered.model, registered.model_revision, model, revision
            USING ERRCODE = 'data_exception',
                  HINT = 'Encode the query with the column''s model.';
    END IF;
    RETURN true;
END;
$$;
