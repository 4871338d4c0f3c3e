"""Near-duplicate rows, grouped in the database: ``pgsim.near_duplicates`` (pgsim/db/sql) links each row to its
nearest rows through the column's HNSW index when their cosine similarity reaches a threshold, and returns
the connected components. A k-NN self-join, not all pairs: one index probe per row."""

from __future__ import annotations

from typing import Any

import psycopg

from pgsim.db.catalog import resolve_table
from pgsim.errors import InvalidInput, SchemaMissing

DEFAULT_THRESHOLD = 0.95
DEFAULT_NEIGHBOURS = 10


def near_duplicates(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    neighbours: int = DEFAULT_NEIGHBOURS,
) -> list[list[dict[str, Any]]]:
    """Groups of two or more rows of ``table`` whose ``column`` embeddings are near-duplicates: each row is
    linked to those of its ``neighbours`` nearest rows with cosine similarity >= ``threshold``, and a group is
    what links connect. Each row is its primary key as a dict; groups come largest first."""
    check_threshold(threshold)
    if isinstance(neighbours, bool) or not isinstance(neighbours, int) or not 1 <= neighbours <= 1000:
        raise InvalidInput(f"neighbours must be an integer from 1 to 1000; got {neighbours!r}.")
    oid = resolve_table(conn, table).oid
    try:
        rows = conn.execute(
            "SELECT key, group_id FROM pgsim.near_duplicates(%s::oid::regclass, %s, %s, %s)",
            [oid, column, threshold, neighbours],
        ).fetchall()
    except (psycopg.errors.InvalidParameterValue, psycopg.errors.UndefinedObject, psycopg.errors.UndefinedColumn,
            psycopg.errors.WrongObjectType) as exc:  # fmt: skip
        hint = f" {exc.diag.message_hint}" if exc.diag.message_hint else ""
        raise InvalidInput(f"{exc.diag.message_primary}{hint}") from None
    except psycopg.errors.UndefinedFunction:
        raise SchemaMissing("This database lacks pgsim.near_duplicates: run `pgsim install`.") from None
    groups: dict[int, list[dict[str, Any]]] = {}
    for key, group in rows:
        groups.setdefault(group, []).append(key)
    return sorted(groups.values(), key=len, reverse=True)


def check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise InvalidInput(f"threshold is a cosine similarity in (0, 1]; got {threshold!r}.")
