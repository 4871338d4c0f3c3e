"""``pgsim.calibrate``: measure a table's HNSW index on its own rows, so that searches take the fast path
exactly where it keeps its recall (pgsim.db.calibration says how it measures and what it stores)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg

from pgsim.db.calibration import DEFAULT_QUERIES, DEFAULT_SECONDS, Calibration, Progress, calibrate_index
from pgsim.knn.caches import forget_plans
from pgsim.quality.connections import psycopg_connection


def calibrate(
    conn: psycopg.Connection[Any] | Any,
    table: str,
    column: str,
    *,
    seconds: float = DEFAULT_SECONDS,
    k: int = 10,
    queries: int | Sequence[Sequence[float]] | np.ndarray[Any, Any] = DEFAULT_QUERIES,
    filters: Sequence[str] = (),
    progress: Progress | None = None,
) -> Calibration:
    """Measure recall@k and time of ``table.column``'s HNSW index against an exact scan, over filter
        selectivities and ``ef_search`` values, within about ``seconds``, and store the curve the planner then
        follows (``pgsim.search(..., recall=...)``). ``queries``: how many query vectors to sample from the
        table's rows, or vectors of real queries. ``filters``: SQL conditions your searches use (a workload),
    each measured as its own level besides the grid's. ``progress(fraction)`` after each level. Run it as the table's
        owner, after loading the data and again after large changes (a curve more than a fifth of the table
        out of date is not trusted). A table with too few rows stores nothing: ``Calibration.stored`` is false
        and ``reason`` says why."""
    conn = psycopg_connection(conn)
    calibration = calibrate_index(
        conn, table, column, k=k, seconds=seconds, queries=queries, filters=filters, progress=progress
    )
    forget_plans()  # this process's cached plans were made without the new curve
    return calibration
