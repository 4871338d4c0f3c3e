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
