"""pgsim.knn forced onto the walk, as the bit- and prefix-storage attack tests call it."""

from __future__ import annotations

from typing import Any

import numpy as np
import psycopg

K = 10


def walk_knn(
    conn: psycopg.Connection[Any], table: str, column: str, query: np.ndarray, k: int = K, where: str | None = None
) -> list[tuple[int, float]]:
    """pgsim.knn's (id, distance) rows under the thresholds that send a small table to the walk (ef_search 40)."""
    rows = conn.execute(
        "SELECT (r.row->>'id')::int, r.distance FROM pgsim.knn(%s, %s, %s, %s, %s, exact_below_rows => 0, "
        "min_hnsw_selectivity => 0, hnsw_ef_search => 40) AS r",
        [table, column, query, k, where],
    ).fetchall()
    return [(int(i), float(d)) for i, d in rows]
