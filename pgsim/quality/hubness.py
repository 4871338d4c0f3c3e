"""Hubness correction with a query bank.

In high-dimensional embedding spaces a few rows ("hubs") are among the nearest neighbours of very many
queries, whatever those ask, and crowd out the right answer. Given a bank of typical queries for a column
(:func:`set_query_bank`: a query log, or questions users ask), a search re-ranks its nearest candidates by
``similarity - weight * hubness``, where a row's hubness is its mean similarity to its ``neighbours``
nearest bank queries (cross-domain similarity local scaling); bench/quality.py compares it with query-bank
normalisation's inverted softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg

from pgsim.db.catalog import resolve_table
from pgsim.db.standby import require_primary
from pgsim.encoding.encoder import encoder_for
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.errors import InvalidInput
from pgsim.knn.caches import TtlCache, database_key
from pgsim.knn.candidates import nearest_candidates
from pgsim.knn.planner import DEFAULT_TUNING, Tuning
from pgsim.knn.statements import Where
from pgsim.knn.target import vector_column
from pgsim.psycopg import bindable, vector_array
from pgsim.quality.connections import psycopg_connection

DEFAULT_WEIGHT = 0.5
DEFAULT_NEIGHBOURS = 10
BANK_SECONDS = 60.0  # a bank read from the database is reused this long in this process
_banks: TtlCache[tuple[Any, ...], npt.NDArray[np.float32]] = TtlCache(BANK_SECONDS, size=16)


@dataclass(frozen=True)
class CorrectedHit:
    row: dict[str, Any]
    distance: float  # cosine distance to the query, as pgsim.search gives it
    score: float  # similarity - weight * hubness: what the rows are ordered by


def set_query_bank(conn: psycopg.Connection[Any] | Any, table: str, column: str, queries: Sequence[str]) -> int:
    """Replace the query bank of ``table.column`` with ``queries`` (texts, encoded with the column's model;
    blank ones and repeats are dropped). Returns how many the bank holds."""
    conn = psycopg_connection(conn)
    require_primary(conn, "pgsim.set_query_bank")
    texts = sorted({text for text in queries if isinstance(text, str) and text.strip()})
    if len(texts) < DEFAULT_NEIGHBOURS:
        raise InvalidInput(f"A query bank needs at least {DEFAULT_NEIGHBOURS} distinct queries; got {len(texts)}.")
    target = vector_column(conn, table, column)
    encoder = encoder_for(target.registration.model if target.registration else DEFAULT_MODEL)
    if encoder.dimension != target.dimension:
        raise InvalidInput(f"Model {encoder.model_name!r} gives {encoder.dimension} dimensions; {table}.{column} "
                           f"holds {target.dimension}.")  # fmt: skip
    vectors = encoder.encode(texts, kind="query")
    found = resolve_table(conn, table)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "DELETE FROM pgsim.query_bank WHERE (table_schema, table_name, column_name) = (%s, %s, %s)",
            [found.schema, found.name, column],
        )
        cur.execute(  # bound as the connection can: pgsim's adapters need not be registered on it
            "INSERT INTO pgsim.query_bank (table_schema, table_name, column_name, embedding) "
            "SELECT %s, %s, %s, pgsim_vector FROM unnest(%s::vector[]) AS pgsim_vector",
            [found.schema, found.name, column, [bindable(conn, v) for v in vectors if v is not None]],
        )
    _banks.clear()
    return len(texts)


def corrected_search(
    conn: psycopg.Connection[Any] | Any,
    table: str,
    column: str,
    query: str | Sequence[float] | Any,
    *,
    k: int = 10,
    weight: float = DEFAULT_WEIGHT,
    neighbours: int = DEFAULT_NEIGHBOURS,
    candidates: int | None = None,
    where: Where = None,
    columns: Sequence[str] | None = None,
    model: str | None = None,
    tuning: Tuning = DEFAULT_TUNING,
) -> list[CorrectedHit]:
    """:func:`pgsim.search`'s ``candidates`` nearest rows (default ``5 * k``), re-ranked by
    ``similarity - weight * hubness`` (see the module's text); the best ``k``."""
    conn = psycopg_connection(conn)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise InvalidInput(f"weight must be between 0 (no correction) and 1; got {weight!r}.")
    bank = _bank(conn, table, column)
    if isinstance(neighbours, bool) or not isinstance(neighbours, int) or not 1 <= neighbours <= len(bank):
        raise InvalidInput(f"neighbours must be a whole number from 1 to the bank's {len(bank)}; got {neighbours!r}.")
    found = nearest_candidates(conn, table, column, query, k=k, candidates=candidates, where=where, columns=columns,
                               model=model, tuning=tuning)  # fmt: skip
    if not found.hits:
        return []
    scores = found.similarities - weight * hubness_of(found.vectors, bank, neighbours)
    ranked = sorted(range(len(found.hits)), key=lambda i: -scores[i])[:k]
    return [CorrectedHit(found.row(i), found.hits[i].distance, float(scores[i])) for i in ranked]


def forget_banks() -> None:
    """Drop the query banks this process holds (after changing pgsim.query_bank by hand)."""
    _banks.clear()


def hubness_of(vectors: npt.NDArray[np.float32], bank: npt.NDArray[np.float32], neighbours: int) -> Any:
    """Each row's mean cosine similarity to its ``neighbours`` nearest bank queries."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similar = unit @ bank.T
    nearest = np.partition(similar, similar.shape[1] - neighbours, axis=1)[:, -neighbours:]
    return nearest.mean(axis=1)


def _bank(conn: psycopg.Connection[Any], table: str, column: str) -> npt.NDArray[np.float32]:
    key = (database_key(conn), table, column)
    bank = _banks.get(key)
    if bank is None:
        found = resolve_table(conn, table)
        rows = conn.execute(
            "SELECT embedding FROM pgsim.query_bank WHERE (table_schema, table_name, column_name) = (%s, %s, %s)",
            [found.schema, found.name, column],
        ).fetchall()
        if not rows:
            raise InvalidInput(
                f"{table}.{column} has no query bank: set one with pgsim.set_query_bank(conn, "
                f"{table!r}, {column!r}, queries), from a query log or typical questions."
            )
        matrix = np.stack([vector_array(vector) for (vector,) in rows])  # whatever the connection reads them as
        bank = _banks.put(key, matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12))
    return bank
