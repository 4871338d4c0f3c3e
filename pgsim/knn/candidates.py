"""Re-ranking's first step, shared by diversity and hubness correction: pgsim.search's nearest rows that
pass the filter, with their vectors, for a re-ranker to reorder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg

from pgsim.errors import InvalidInput
from pgsim.knn.filtered import Hit, search
from pgsim.knn.planner import Tuning
from pgsim.knn.statements import Where
from pgsim.knn.target import vector_column
from pgsim.psycopg import vector_array

CANDIDATES_PER_ROW = 5  # candidates fetched per row returned, by default


@dataclass(frozen=True)
class Candidates:
    hits: list[Hit]  # nearest first, each row with the vector column
    vectors: npt.NDArray[np.float32]  # one row per hit
    column: str
    keep_column: bool  # whether the caller asked for the vector column itself

    @property
    def similarities(self) -> npt.NDArray[np.float64]:
        return 1.0 - np.array([hit.distance for hit in self.hits])

    def row(self, position: int) -> dict[str, Any]:
        """The hit's row as the caller asked for it (without the vector column unless asked)."""
        row = self.hits[position].row
        return row if self.keep_column else {name: value for name, value in row.items() if name != self.column}


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
    for hit in hits:  # whatever the connection gives for a vector (a Session's has pgvector's text)
        hit.row[column] = vector_array(hit.row[column])
    vectors = np.stack([hit.row[column] for hit in hits]) if hits else np.zeros((0, 1), dtype=np.float32)
    return Candidates(hits, vectors, column, column in wanted)
