"""Relevance threshold: return only rows that stand out from the query's own neighbourhood, or nothing.

A raw cosine similarity means different things for different queries: a short generic query is close to
everything, a specific one to little, so no one cut-off serves them all. The score here is calibrated per
query against the table itself: a row's similarity minus the similarity of the query's ``reference``-th
nearest row (among the rows that pass the filter). A row a few hundredths above the crowd of the query's
50 nearest rows is no better than them; a row well above it is what the query was looking for. One
threshold (``min_score``) then holds for every query, and a query with nothing clearly relevant in the
table returns an empty list. How wide margins run depends on the table (they shrink where rows crowd
together), so a table calibrated by :func:`pgsim.quality.relevance_calibration.calibrate_relevance` has its
own default ``min_score``, read from its own neighbourhoods; other tables get ``DEFAULT_MIN_SCORE``.

bench/quality.py measures this margin against the best raw-cosine threshold and a z-score against a
random sample of the table, on known-item queries with their answer present and held out.
``pgsim.relevant_search`` (SQL) is the same search for SQL users; hybrid search cuts by the same score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from pgsim.errors import InvalidInput
from pgsim.knn.filtered import search
from pgsim.knn.planner import DEFAULT_TUNING, Tuning
from pgsim.knn.statements import Where
from pgsim.knn.target import MAX_K
from pgsim.quality.connections import psycopg_connection
from pgsim.quality.relevance_calibration import calibrated

DEFAULT_REFERENCE = 50
# tuned by bench/quality.py for a precision of 0.6 on held-out queries
DEFAULT_MIN_SCORE = 0.27


@dataclass(frozen=True)
class RelevantHit:
    row: dict[str, Any]
    distance: float  # cosine distance to the query, as pgsim.search gives it
    score: float  # similarity minus the similarity of the query's reference-th nearest row


def relevant_search(
    conn: psycopg.Connection[Any] | Any,
    table: str,
    column: str,
    query: str | Sequence[float] | Any,
    *,
    k: int = 10,
    min_score: float | None = None,
    reference: int = DEFAULT_REFERENCE,
    where: Where = None,
    columns: Sequence[str] | None = None,
    model: str | None = None,
    tuning: Tuning = DEFAULT_TUNING,
) -> list[RelevantHit]:
    """The rows among :func:`pgsim.search`'s ``k`` nearest (that pass ``where``) whose similarity is at least
    ``min_score`` above the query's ``reference``-th nearest row's, best first; an empty list when none is.
    One search of ``reference`` rows. With fewer than ``reference`` rows passing the filter, the last of them
    is the reference. ``min_score`` left out: the table's calibrated threshold for ``reference`` when a fresh
    calibration holds one, else ``DEFAULT_MIN_SCORE``. ``conn``: a psycopg connection, or a SQLAlchemy
    Session or Connection on it."""
    conn = psycopg_connection(conn)
    if min_score is not None:
        check_min_score(min_score)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInput(f"k must be a whole number of at least 1; got {k!r}.")
    if isinstance(reference, bool) or not isinstance(reference, int) or not k < reference <= MAX_K:
        raise InvalidInput(f"reference must be a whole number above k ({k}) and at most {MAX_K}; got {reference!r}.")
    hits = search(conn, table, column, query, k=reference, where=where, columns=columns, model=model, tuning=tuning)
    if not hits:
        return []
    if min_score is None:
        min_score = default_min_score(conn, table, column, reference)
    floor = 1.0 - hits[-1].distance
    scored = [RelevantHit(hit.row, hit.distance, (1.0 - hit.distance) - floor) for hit in hits[:k]]
    return [hit for hit in scored if hit.score >= min_score]


def default_min_score(conn: psycopg.Connection[Any], table: str, column: str, reference: int) -> float:
    """The table's calibrated min_score for ``reference`` when a fresh calibration holds one, else the default."""
    return calibrated(conn, table, column).min_scores.get(reference, DEFAULT_MIN_SCORE)


def check_min_score(min_score: float) -> None:
    if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not 0 <= min_score <= 2:
        raise InvalidInput(
            f"min_score is a margin of cosine similarity from 0 to 2; got {min_score!r} "
            f"(the default, {DEFAULT_MIN_SCORE}, was measured on real data: see pgsim.quality.relevance)."
        )
