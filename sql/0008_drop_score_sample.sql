-- The z-score calibration of 0007 (a query's similarity against a stored random sample of the column) did
-- worse than raw cosine on real data (bench/quality.py); pgsim.relevant_search calibrates against the query's
-- own nearest rows instead, which needs nothing stored.
DROP FUNCTION pgsim.score_background(regclass, name, vector);
DROP FUNCTION pgsim.sample_scores(regclass, name, integer);
DROP TABLE pgsim.score_sample;
