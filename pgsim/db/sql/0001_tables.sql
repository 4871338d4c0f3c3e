-- pgsim's tables and types. Numbered files run once each and must never change once released: a later
-- change to a table or type, or a data migration, goes into a new numbered file. Functions and views live
-- in functions/, one file per name, and are re-applied whenever their text changes.
-- The installer runs this with search_path = pgsim, <the vector extension's schema>, pg_catalog.
COMMENT ON SCHEMA pgsim IS 'pgsim: similarity search for PostgreSQL';

-- Filtered k-nearest-neighbour search (functions/knn_plan.sql, prepare_knn.sql, knn.sql).
CREATE TYPE pgsim.knn_plan AS (
    path text,                  -- 'exact' or 'hnsw'
    index_name text,            -- the HNSW index that serves the hnsw path (NULL for exact)
    estimated_rows double precision,  -- rows estimated to pass the filter
    indexed_rows double precision,    -- rows the index holds (a partial index holds fewer than the table)
    selectivity double precision,     -- estimated_rows / indexed_rows
    ef_search integer,
    max_scan_tuples integer,
    reason text
);

CREATE TYPE pgsim.knn_hit AS (row jsonb, distance double precision);

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

-- The content-hash cache: a text's vector, kept per model, so that text already encoded (by any table, any
-- earlier run, a run that crashed after encoding) is looked up instead of encoded again. Used by ingest,
-- sync and backfill when they are asked to (cache => true, --cache); nothing reads it otherwise.
CREATE TABLE pgsim.embedding_cache (
    model text NOT NULL,
    model_revision text NOT NULL,      -- as in pgsim.embedding: same name, other weights is another model
    digest bytea NOT NULL,             -- sha256 of the text exactly as the encoder was given it
    embedding vector NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, model_revision, digest)
);
COMMENT ON TABLE pgsim.embedding_cache IS
    'Vectors by (model, revision, sha256 of the text): text encoded once is not encoded again. '
    'Safe to empty at any time (DELETE or TRUNCATE); entries are only ever added.';

-- Hubness correction: a bank of typical queries per searched column (pgsim.quality.hubness.set_query_bank).
-- A "hub" row is near many queries whatever they ask; its similarity to a query is discounted by its mean
-- similarity to its nearest bank queries (cross-domain similarity local scaling, with the bank as the
-- query side's neighbourhood).
CREATE TABLE pgsim.query_bank (
    table_schema name NOT NULL,
    table_name name NOT NULL,
    column_name name NOT NULL,
    embedding vector NOT NULL
);
CREATE INDEX query_bank_column ON pgsim.query_bank (table_schema, table_name, column_name);
COMMENT ON TABLE pgsim.query_bank IS 'Typical queries of a searched column, encoded: the reference of hubness correction.';
