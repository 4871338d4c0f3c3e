-- Embeddings that stay in sync with their rows.
--
-- pgsim.embedding says which table.column holds embeddings of which source, made by which model. Two triggers
-- per registered column put changed rows in pgsim.queue, in the writer's transaction, and NOTIFY channel
-- 'pgsim' (payload: the registration id). Workers (Python: pgsim.sync, `pgsim worker`) claim queue entries
-- with FOR UPDATE SKIP LOCKED, encode, and write. An entry that fails max_attempts times moves to
-- pgsim.dead_letter with its error.

CREATE TABLE pgsim.embedding (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_schema name NOT NULL,
    table_name name NOT NULL,
    column_name name NOT NULL,
    source text NOT NULL,              -- SQL expression over the table's columns that gives the text
    source_columns name[] NOT NULL,    -- the columns it reads: an UPDATE of one of them re-embeds the row
    key_columns name[] NOT NULL,       -- the table's primary key
    model text NOT NULL,
    model_revision text NOT NULL,      -- a digest of the model's files: same name, other weights is another model
    dimension integer NOT NULL CHECK (dimension > 0),
    metric text NOT NULL DEFAULT 'cosine' CHECK (metric = 'cosine'),
    dtype text NOT NULL CHECK (dtype IN ('vector', 'halfvec')),
    index_name name,
    index_m integer,
    index_ef_construction integer,
    created_column boolean NOT NULL,   -- remove drops only a column that pgsim added
    replaces integer,                  -- set while this column is filled to take over from another (model change)
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (table_schema, table_name, column_name)
);
COMMENT ON TABLE pgsim.embedding IS 'Registered embedding columns: which source, model and index each holds.';

-- One entry per (registration, row): a row changed again before a worker took it needs no second entry,
-- and a worker that finds the row changed while it was encoding leaves the entry for the newer text.
CREATE TABLE pgsim.queue (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    embedding_id integer NOT NULL,
    key jsonb NOT NULL,                -- the row's primary key, {"column": value, ...}
    reason text NOT NULL,              -- insert, update, backfill
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    not_before timestamptz,            -- after a failure: not retried before this
    UNIQUE (embedding_id, key)
);
CREATE INDEX queue_claim ON pgsim.queue (embedding_id, id);
COMMENT ON TABLE pgsim.queue IS 'Rows whose embedding is missing or stale, waiting for a pgsim worker.';

CREATE TABLE pgsim.dead_letter (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    embedding_id integer NOT NULL,
    key jsonb NOT NULL,
    reason text NOT NULL,
    attempts integer NOT NULL,
    last_error text,
    enqueued_at timestamptz NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgsim.dead_letter IS
    'Queue entries that failed too often. Fix the cause, then SELECT pgsim.requeue_dead_letters().';

-- Row trigger: TG_ARGV[0] is the registration id, TG_ARGV[1..] the primary key columns. It runs with its
-- owner's rights so that writers to a registered table need no grant on pgsim's queue; it reads NEW only.
CREATE FUNCTION pgsim.enqueue() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_row jsonb := to_jsonb(NEW);
    row_key jsonb := '{}';
BEGIN
    FOR i IN 1 .. TG_NARGS - 1 LOOP
        row_key := row_key || jsonb_build_object(TG_ARGV[i], new_row -> TG_ARGV[i]);
    END LOOP;
    INSERT INTO pgsim.queue (embedding_id, key, reason)
    VALUES (TG_ARGV[0]::integer, row_key, lower(TG_OP))
    ON CONFLICT (embedding_id, key) DO NOTHING;
    PERFORM pg_notify('pgsim', TG_ARGV[0]);  -- repeated payloads fold into one per transaction
    RETURN NULL;
END;
$$;

CREATE FUNCTION pgsim.requeue_dead_letters(registration integer DEFAULT NULL) RETURNS bigint
LANGUAGE sql
BEGIN ATOMIC
    WITH moved AS (
        DELETE FROM pgsim.dead_letter
        WHERE registration IS NULL OR embedding_id = registration
        RETURNING embedding_id, key, reason
    ), requeued AS (
        INSERT INTO pgsim.queue (embedding_id, key, reason)
        SELECT DISTINCT ON (embedding_id, key) embedding_id, key, reason FROM moved
        ON CONFLICT (embedding_id, key) DO NOTHING
        RETURNING 1
    )
    SELECT count(*) FROM requeued;
END;
COMMENT ON FUNCTION pgsim.requeue_dead_letters(integer) IS
    'Move dead letters (of one registration, or all) back to the queue; returns how many were queued.';

-- A search that encoded its query with a model passes that model here, in the statement itself, so a
-- model change committed between planning and running cannot make it compare vectors of two models.
-- A NULL model (the caller passed a vector) is not checked.
CREATE FUNCTION pgsim.expect_model(tbl_schema name, tbl name, col name, model text, revision text)
RETURNS boolean
LANGUAGE plpgsql STABLE
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

CREATE VIEW pgsim.sync_status AS
SELECT
    e.id,
    format('%I.%I', e.table_schema, e.table_name) AS table_name,
    e.column_name,
    e.model,
    e.replaces,
    (SELECT count(*) FROM pgsim.queue q WHERE q.embedding_id = e.id) AS queued,
    (SELECT count(*) FROM pgsim.queue q WHERE q.embedding_id = e.id AND q.attempts > 0) AS retrying,
    (SELECT count(*) FROM pgsim.dead_letter d WHERE d.embedding_id = e.id) AS dead_letters,
    (SELECT now() - min(q.enqueued_at) FROM pgsim.queue q WHERE q.embedding_id = e.id) AS lag
FROM pgsim.embedding e;
COMMENT ON VIEW pgsim.sync_status IS 'Per registered column: queue depth, entries retrying, dead letters, and the age of the oldest entry.';
