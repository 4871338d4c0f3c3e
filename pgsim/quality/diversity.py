"""Maximal marginal relevance: the k rows picked from a filtered search's nearest candidates so that each
adds relevance and little repetition. ``pgsim.mmr`` is the same rule for SQL users."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from pgsim.errors import InvalidInput
from pgsim.knn.candidates import nearest_candidates
from pgsim.knn.filtered import Hit
from pgsim.knn.planner import DEFAULT_TUNING, Tuning
from pgsim.knn.statements import Where
from pgsim.quality.connections import psycopg_connection


def diverse_search(
    conn: Any,
    table: str,
    column: str,
    query: str | Sequence[float] | Any,
    *,
    k: int = 10,
    lambda_mult: float = 0.7,
    candidates: int | None = None,
    where: Where = None,
    columns: Sequence[str] | None = None,
    model: str | None = None,
    tuning: Tuning = DEFAULT_TUNING,
) -> list[Hit]:
    """:func:`pgsim.search`'s ``candidates`` nearest rows (default ``5 * k``), of which the ``k`` picked by
    maximal marginal relevance are returned in the order picked: each maximises ``lambda_mult * similarity to
    the query - (1 - lambda_mult) * highest similarity to a row already picked`` (the λ of Carbonell and
    Goldstein; LangChain's name). 1 is the plain nearest-first order, lower values trade relevance for
    variety. ``Hit.distance`` stays the row's distance to the query."""
    conn = psycopg_connection(conn)
    check_lambda(lambda_mult)
    found = nearest_candidates(conn, table, column, query, k=k, candidates=candidates, where=where, columns=columns,
                               model=model, tuning=tuning)  # fmt: skip
    order = mmr_order(found.similarities, found.vectors, k, lambda_mult) if found.hits else []
    return [Hit(found.row(i), found.hits[i].distance) for i in order]


def mmr_order(relevance: npt.NDArray[Any], vectors: npt.NDArray[np.float32], k: int, weight: float) -> list[int]:
    """Positions picked by maximal marginal relevance, ``weight`` on relevance (pgsim.mmr's lambda)."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    redundancy = np.full(len(unit), -np.inf)
    picked: list[int] = []
    available = np.ones(len(unit), dtype=bool)
    for _ in range(min(k, len(unit))):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        score = np.where(available, weight * relevance - (1 - weight) * penalty, -np.inf)
        best = int(np.argmax(score))
        picked.append(best)
        available[best] = False
        redundancy = np.maximum(redundancy, unit @ unit[best])
    return picked


def check_lambda(lambda_mult: float) -> None:
    if isinstance(lambda_mult, bool) or not isinstance(lambda_mult, (int, float)) or not 0 <= lambda_mult <= 1:
        raise InvalidInput(f"lambda_mult must be between 0 (most varied) and 1 (most relevant); got {lambda_mult!r}.")
