"""``pgsim.calibrate``: measure a table on its own rows, so that searches take the fast path exactly where
it keeps its recall (pgsim.db.calibration) and the relevance threshold and hybrid fusion suit the table
(pgsim.quality.relevance_calibration)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg

from pgsim.db.calibration import DEFAULT_QUERIES, DEFAULT_SECONDS, Calibration, Progress, calibrate_index
from pgsim.db.standby import require_primary
from pgsim.encoding.encoder import encoder_for
from pgsim.errors import InvalidInput
from pgsim.knn.caches import forget_plans
from pgsim.knn.target import read_vector_column
from pgsim.quality.connections import psycopg_connection
from pgsim.quality.relevance_calibration import RelevanceCalibration, calibrate_relevance

RELEVANCE_SECONDS = 20.0
MAX_LOGGED_QUERIES = 1000  # as many as calibrate samples at most: the budget measures no more


def calibrate(
    conn: psycopg.Connection[Any] | Any,
    table: str,
    column: str,
    *,
    seconds: float = DEFAULT_SECONDS,
    k: int = 10,
    queries: int | Sequence[str] | Sequence[Sequence[float]] | np.ndarray[Any, Any] = DEFAULT_QUERIES,
    filters: Sequence[str] = (),
    progress: Progress | None = None,
    relevance: bool = True,
) -> Calibration:
    """Measure recall@k and time of ``table.column``'s HNSW index against an exact scan, over filter
    selectivities and ``ef_search`` values, within about ``seconds``, and store the curve the planner then
    follows (``pgsim.search(..., recall=...)``); then, with ``relevance``, the table's relevance threshold
    and hybrid fusion (``relevant_search``, ``hybrid_search``; at most 20 s more). ``queries``: how many
    query vectors to sample from the table's rows, or real queries (a query log): their texts, encoded with
    the column's registered model, or their vectors. ``filters``: SQL conditions
    your searches use (a workload), each measured as its own level besides the grid's.
    ``progress(fraction)`` after each level. Run it as the table's owner, after loading the data and again
    after large changes (a curve more than a fifth of the table out of date is not trusted). A table with
    too few rows stores nothing: ``Calibration.stored`` is false and ``reason`` says why."""
    conn = psycopg_connection(conn)
    require_primary(conn, "pgsim.calibrate")
    if isinstance(queries, (str, bytes)):
        raise InvalidInput(
            "queries is a count, a list of query texts or a list of vectors; got one text (read a log file's "
            "lines into a list, or run pgsim calibrate --query-log FILE)."
        )
    measured: int | Sequence[Sequence[float]] | np.ndarray[Any, Any] = queries  # type: ignore[assignment]
    if not isinstance(queries, (int, np.ndarray)) and any(isinstance(query, str) for query in queries):
        measured = query_log_vectors(conn, table, column, queries)  # type: ignore[arg-type]
    calibration = calibrate_index(
        conn, table, column, k=k, seconds=seconds, queries=measured, filters=filters, progress=progress
    )
    if relevance:
        relevance_of(conn, table, column, seconds)
    forget_plans()  # this process's cached plans were made without the new curve
    return calibration


def relevance_of(conn: psycopg.Connection[Any], table: str, column: str, seconds: float) -> RelevanceCalibration:
    """The relevance part of :func:`calibrate`, within ``seconds`` (at most RELEVANCE_SECONDS)."""
    return calibrate_relevance(conn, table, column, seconds=min(seconds, RELEVANCE_SECONDS))


def query_log_vectors(
    conn: psycopg.Connection[Any], table: str, column: str, texts: Sequence[str]
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Query texts (a log of what users searched) as the column's registered model encodes a search's query;
    a log longer than MAX_LOGGED_QUERIES is thinned to that many, evenly, before anything is encoded."""
    if not all(isinstance(text, str) and text.strip() for text in texts):
        raise InvalidInput("A query log is a list of query texts, none of them empty (or a list of vectors).")
    registration = read_vector_column(conn, table, column).registration  # not cached: read as it is now
    if registration is None:
        raise InvalidInput(
            f"{table}.{column} is not a registered embedding column: its model is unknown, so give the queries "
            "as vectors of that model."
        )
    encoder = encoder_for(registration.model)
    if encoder.revision != registration.model_revision:
        raise InvalidInput(
            f"Model {registration.model!r} here (revision {encoder.revision}) is not the one {table}.{column} "
            f"holds (revision {registration.model_revision}): its queries would measure another model's vectors."
        )
    step = max(1, -(-len(texts) // MAX_LOGGED_QUERIES))  # ceiling: at most MAX_LOGGED_QUERIES, in log order
    chosen = list(texts)[::step]
    print(f"pgsim: encoding {len(chosen)} logged queries with {registration.model}", file=sys.stderr)
    return np.asarray(encoder.encode(chosen, kind="query"), dtype=np.float32)
