"""Calibrated relevance: a score whose one threshold means the same for every query.

A raw cosine similarity is not comparable across queries: a short generic query is close to everything,
a specific one to little. So each query's similarities are measured against the background of the column
itself: the mean and standard deviation of the query's similarity to a stored random sample of the
column's vectors (``pgsim.score_sample``, filled by :func:`calibrate` or on first use). The score is the
number of those standard deviations a row stands above the mean (a z-score, in the spirit of
query-dependent score calibration); a search with ``min_score`` returns only rows above it, and nothing
when no row is clearly relevant.

Not exported yet: on the Debian corpus (bench/quality.py) this score separated queries that have a relevant
row from queries that have none no better than the raw cosine of the top hit (AUC 0.57 against 0.61), so it
has not earned its place; another calibration is to be measured first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from pgsim.errors import InvalidInput
from pgsim.names import table_identifier
from pgsim.search import DEFAULT_TUNING, Tuning, Where, _target_and_params, search

DEFAULT_SAMPLE = 1000
# Measured on the Debian corpus (bench/quality.py, 1,000 known-item queries, half with their answer held
# out): the threshold with the best F1 of "returned something, and it was relevant" on a tuning half was 4.4.
DEFAULT_MIN_SCORE = 4.4


@dataclass(frozen=True)
class ScoredHit:
    row: dict[str, Any]
    distance: float
    score: float  # standard deviations above the query's mean similarity to the column's sample


def calibrate(conn: psycopg.Connection[Any], table: str, column: str, *, sample: int = DEFAULT_SAMPLE) -> int:
    """Store a fresh random sample of ``table.column`` as the background of calibrated scores; how many
    vectors it holds. Run it again after the table's content changed a lot."""
    if isinstance(sample, bool) or not isinstance(sample, int) or not 30 <= sample <= 100_000:
        raise InvalidInput(f"sample must be a whole number from 30 to 100000; got {sample!r}.")
    row = conn.execute(
        "SELECT pgsim.sample_scores(%s::regclass, %s, %s)", [table_identifier(table).as_string(conn), column, sample]
    ).fetchone()
    stored = int(row[0]) if row else 0
    if stored < 30:
        raise InvalidInput(f"{table}.{column} has {stored} vectors; calibrated scores need at least 30.")
    return stored


def relevant_search(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    query: str | Sequence[float] | Any,
    *,
    k: int = 10,
    min_score: float = DEFAULT_MIN_SCORE,
    where: Where = None,
    columns: Sequence[str] | None = None,
    model: str | None = None,
    tuning: Tuning = DEFAULT_TUNING,
) -> list[ScoredHit]:
    """:func:`pgsim.search`'s k nearest rows that score at least ``min_score`` (see the module's text),
    best first; an empty list when none does."""
    if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not -10 <= min_score <= 50:
        raise InvalidInput(f"min_score is a number of standard deviations from -10 to 50; got {min_score!r}.")
    _, params = _target_and_params(conn, table, column, query, model)
    mean, stddev = background(conn, table, column, params["q"])
    hits = search(conn, table, column, params["q"], k=k, where=where, columns=columns, tuning=tuning)
    scored = [ScoredHit(hit.row, hit.distance, (1 - hit.distance - mean) / stddev) for hit in hits]
    return [hit for hit in scored if hit.score >= min_score]


def background(conn: psycopg.Connection[Any], table: str, column: str, vector: Any) -> tuple[float, float]:
    """The query's mean and standard deviation of similarity to the column's sample (drawn on first use)."""
    name = table_identifier(table).as_string(conn)
    statement = (
        "SELECT (b).mean, (b).stddev, (b).sampled "
        "FROM (SELECT pgsim.score_background(%s::regclass, %s, %s::vector) AS b) AS s"
    )
    row = conn.execute(statement, [name, column, vector]).fetchone()
    if row is None or not row[2]:
        calibrate(conn, table, column)
        row = conn.execute(statement, [name, column, vector]).fetchone()
    assert row is not None
    mean, stddev = float(row[0]), float(row[1])
    if not stddev > 0:
        raise InvalidInput(f"The sample of {table}.{column} does not vary; calibrated scores need distinct vectors.")
    return mean, stddev
