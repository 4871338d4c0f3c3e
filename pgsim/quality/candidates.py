"""Re-ranking's first step, shared by diversity and hubness correction: pgsim.search's nearest rows that pass
the filter, with their vectors, for a re-ranker to reorder. The vectors are read whatever the connection
gives for them (pgsim's adapters registered or not: a SQLAlchemy Session's connection has pgvector's text)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg

from pgsim.errors import InvalidInput
from pgsim.knn.candidates import CANDIDATES_PER_ROW, Candidates
from pgsim.knn.filtered import search
from pgsim.knn.planner import Tuning
from pgsim.knn.statements import Where
from pgsim.knn.target import vector_column
from pgsim.psycopg import vector_array


def nearest_candidates(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    query: Any,
    *,
    k: int,
    candidates: int | None,
    where: Where,
    columns: Sequence[str] | None,
    model: str | None,
    tuning: Tuning,
) -> Candidates:
    """The ``candidates`` (default ``5 * k``, at least ``k``) nearest rows passing ``where``; a row's vector
    column is a float32 array when the caller asked for it."""
    pool = CANDIDATES_PER_ROW * k if candidates is None else candidates
    if isinstance(pool, bool) or not isinstance(pool, int) or pool < k:
        raise InvalidInput(f"candidates must be an integer of at least k ({k}); got {candidates!r}.")
    wanted = list(columns or vector_column(conn, table, column).default_columns)
    hits = search(conn, table, column, query, k=pool, where=where, columns=[*wanted, column], model=model,
                  tuning=tuning)  # fmt: skip
    for hit in hits:
        hit.row[column] = vector_array(hit.row[column])
    vectors = np.stack([hit.row[column] for hit in hits]) if hits else np.zeros((0, 1), dtype=np.float32)
    return Candidates(hits, vectors, column, column in wanted)
