-- What a row's vector does between a change of its source text and the worker's new vector: 'keep' serves
-- searches with the old vector, 'hide' sets it to NULL in the writer's statement (a BEFORE UPDATE trigger,
-- pgsim.hide_stale), so that the row is not found until it is embedded again.
ALTER TABLE pgsim.embedding ADD COLUMN stale text NOT NULL DEFAULT 'keep' CHECK (stale IN ('keep', 'hide'));
COMMENT ON COLUMN pgsim.embedding.stale IS
    'keep: a changed row is found by its old vector until re-embedded; hide: not found until re-embedded.';
