-- The z-score calibration of 0007 (a query's similarity against a stored random sample of the column) lost
-- to the margin over the query's own nearest rows on real data (bench/quality.py: recall 0.10-0.17 against
-- 0.16-0.26 at precision 0.6, and a worse AUC than raw cosine); pgsim.relevant_search uses the margin, which
-- needs nothing stored.
DROP FUNCTION pgsim.score_background(regclass, name, vector);
DROP FUNCTION pgsim.sample_scores(regclass, name, integer);
DROP TABLE pgsim.score_sample;
