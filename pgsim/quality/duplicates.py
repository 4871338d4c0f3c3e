"""Near-duplicate rows, grouped in the database: ``pgsim.near_duplicates`` (pgsim/db/sql) links each row to its
nearest rows through the column's HNSW index when their cosine similarity reaches a threshold, and returns
the connected components. A k-NN self-join, not all pairs: one index probe per row. The rows themselves are
read back by their primary key, in the same statement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from pgsim.db.catalog import primary_key, resolve_table
from pgsim.errors import InvalidInput, SchemaMissing
from pgsim.knn.target import read_vector_column
from pgsim.quality.connections import psycopg_connection

DEFAULT_THRESHOLD = 0.95
DEFAULT_NEIGHBOURS = 10


def near_duplicates(
    conn: psycopg.Connection[Any] | Any,
    table: str,
    column: str,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    neighbours: int = DEFAULT_NEIGHBOURS,
    columns: Sequence[str] | None = None,
) -> list[list[dict[str, Any]]]:
    """Groups of two or more rows of ``table`` whose ``column`` embeddings are near-duplicates: each row is
    linked to those of its ``neighbours`` nearest rows with cosine similarity >= ``threshold``, and a group is
    what links connect. Each row is a dict of ``columns`` (default: every column the current role may read
    but ``column``, as :func:`pgsim.search` returns them; the primary key's columns alone give the keys);
    groups come largest first. ``conn``: a psycopg connection, or a SQLAlchemy Session or Connection on it."""
    conn = psycopg_connection(conn)
    check_threshold(threshold)
    if isinstance(neighbours, bool) or not isinstance(neighbours, int) or not 1 <= neighbours <= 1000:
        raise InvalidInput(f"neighbours must be an integer from 1 to 1000; got {neighbours!r}.")
    found = resolve_table(conn, table)
    target = read_vector_column(conn, table, column)
    selected = list(columns or target.default_columns)
    unknown = [name for name in selected if name != column and name not in target.other_columns]
    if unknown:
        raise InvalidInput(f"Table {table!r} has no column {', '.join(map(repr, unknown))}; its columns are "
                           f"{', '.join((*target.other_columns, column))}.")  # fmt: skip
    key = primary_key(conn, found.oid)
    record = sql.SQL("(pg_catalog.jsonb_populate_record(NULL::{}, d.key))").format(found.identifier)
    matches: list[sql.Composable] = [
        sql.SQL("t.{} = {}.{}").format(sql.Identifier(name), record, sql.Identifier(name)) for name in key
    ]
    statement = sql.SQL(
        "SELECT d.group_id{selected} FROM pgsim.near_duplicates(%s::oid::regclass, %s, %s, %s) "
        "WITH ORDINALITY AS d (key, group_id, group_size, position) JOIN {table} AS t ON {match} "
        "ORDER BY d.group_size DESC, d.group_id, d.position"
    ).format(
        selected=sql.SQL("").join(sql.SQL(", {}").format(sql.Identifier("t", name)) for name in selected),
        table=found.identifier,
        match=sql.SQL(" AND ").join(matches or [sql.SQL("true")]),  # no key: the function says so
    )
    try:
        rows = conn.execute(statement, [found.oid, column, threshold, neighbours]).fetchall()
    except (psycopg.errors.InvalidParameterValue, psycopg.errors.UndefinedObject, psycopg.errors.UndefinedColumn,
            psycopg.errors.WrongObjectType) as exc:  # fmt: skip
        hint = f" {exc.diag.message_hint}" if exc.diag.message_hint else ""
        raise InvalidInput(f"{exc.diag.message_primary}{hint}") from None
    except psycopg.errors.UndefinedFunction:
        raise SchemaMissing("This database lacks pgsim.near_duplicates: run `pgsim install`.") from None
    groups: dict[int, list[dict[str, Any]]] = {}
    for group, *values in rows:
        groups.setdefault(group, []).append(dict(zip(selected, values, strict=True)))
    return list(groups.values())


def check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise InvalidInput(f"threshold is a cosine similarity in (0, 1]; got {threshold!r}.")
