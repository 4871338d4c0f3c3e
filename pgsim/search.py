"""k-nearest-neighbour search with equality filters, in one SQL statement per attempt.

This is the foundation's search: an HNSW scan in pgvector's ``strict_order`` iterative mode (so filtered
rows do not cut the result short and the order is exact), and, if the scan still gives up before k rows
(``hnsw.max_scan_tuples``), the same statement once more as an exact scan. When at least k rows pass the
filter, k rows come back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgsim.encode import DEFAULT_MODEL, check_vector
from pgsim.errors import InvalidInput
from pgsim.psycopg import Text

MAX_K = 10_000
EF_SEARCH_MAX = 1000  # pgvector's upper bound for hnsw.ef_search


@dataclass(frozen=True)
class Between:
    """A range filter value: ``low <= column < high``; either end may be left open."""

    low: Any = None
    high: Any = None


@dataclass(frozen=True)
class Hit:
    row: dict[str, Any]
    distance: float


def table_identifier(name: str) -> sql.Identifier:
    """``schema.table`` or ``table`` as a quoted identifier; each part is quoted, never interpolated."""
    parts = name.split(".")
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise InvalidInput(f"Table name {name!r} must be 'table' or 'schema.table'.")
    return sql.Identifier(*parts)


def column_dimension(conn: psycopg.Connection[Any], table: str, column: str) -> int:
    """The declared dimension of a vector column, with a clear error when the table or column is missing."""
    ident = table_identifier(table).as_string(conn)
    row = conn.execute(
        """
        SELECT a.atttypmod, format_type(a.atttypid, NULL)
        FROM pg_attribute a
        WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND a.attnum > 0 AND NOT a.attisdropped
        """,
        [ident, column],
    ).fetchone()
    if row is None:
        if conn.execute("SELECT to_regclass(%s)", [ident]).fetchone() == (None,):
            raise InvalidInput(f"Table {table!r} does not exist (or is not on the search_path).")
        raise InvalidInput(f"Table {table!r} has no column {column!r}.")
    typmod, type_name = row
    if type_name not in ("vector", "halfvec"):
        raise InvalidInput(f"Column {table}.{column} is {type_name}, not a pgvector vector column.")
    if typmod < 1:
        raise InvalidInput(f"Column {table}.{column} has no declared dimension; declare it as vector(n).")
    return int(typmod)


def search(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    query: str | Sequence[float] | Any,
    *,
    k: int = 10,
    where: Mapping[str, Any] | None = None,
    columns: Sequence[str] | None = None,
    model: str = DEFAULT_MODEL,
) -> list[Hit]:
    """The k rows of ``table`` nearest to ``query`` (text, encoded with ``model``, or a vector) that pass
    ``where`` ({column: value} for equality, {column: [values]} for IN, {column: Between(low, high)} for a
    range), nearest first."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidInput(f"k must be a whole number from 1 to {MAX_K}; got {k!r}.")
    dimension = column_dimension(conn, table, column)
    if isinstance(query, str):
        vector = Text(query).vector(model)
    else:
        vector = check_vector(query, dimension)
    if vector.shape[0] != dimension:
        raise InvalidInput(f"Model {model!r} gives {vector.shape[0]} dimensions; {table}.{column} holds {dimension}.")
    select = sql.SQL(", ").join(sql.Identifier(c) for c in columns) if columns else sql.SQL("*")
    filters, params = _filters(where or {})
    statement = sql.SQL(
        "SELECT {select}, {col} <=> %(q)s AS _pgsim_distance FROM {table} {where} ORDER BY {col} <=> %(q)s LIMIT %(k)s"
    ).format(select=select, col=sql.Identifier(column), table=table_identifier(table), where=filters)
    params.update(q=vector, k=k)
    rows = _run(conn, statement, params, exact=False)
    if len(rows) < k:
        rows = _run(conn, statement, params, exact=True)
    hits = []
    for row in rows:
        distance = row.pop("_pgsim_distance")
        row.pop(column, None)
        hits.append(Hit(row=row, distance=float(distance)))
    return hits


def _filters(where: Mapping[str, Any]) -> tuple[sql.Composable, dict[str, Any]]:
    clauses: list[sql.Composable] = []
    params: dict[str, Any] = {}
    for position, (name, value) in enumerate(where.items()):
        placeholder = sql.Placeholder(f"f{position}")
        if isinstance(value, (list, tuple, set, frozenset)):
            clauses.append(sql.SQL("{} = ANY({})").format(sql.Identifier(name), placeholder))
            params[f"f{position}"] = list(value)
        elif isinstance(value, Between):
            for bound, operator, given in (("lo", ">=", value.low), ("hi", "<", value.high)):
                if given is not None:
                    clauses.append(
                        sql.SQL("{} " + operator + " {}").format(
                            sql.Identifier(name), sql.Placeholder(f"f{position}{bound}")
                        )
                    )
                    params[f"f{position}{bound}"] = given
        elif value is None:
            clauses.append(sql.SQL("{} IS NULL").format(sql.Identifier(name)))
        else:
            clauses.append(sql.SQL("{} = {}").format(sql.Identifier(name), placeholder))
            params[f"f{position}"] = value
    if not clauses:
        return sql.SQL(""), params
    return sql.SQL("WHERE ") + sql.SQL(" AND ").join(clauses), params


def _run(
    conn: psycopg.Connection[Any], statement: sql.Composed, params: dict[str, Any], exact: bool
) -> list[dict[str, Any]]:
    k = int(params["k"])
    # The block ends in a rollback: the search only reads, and rolling back undoes the SET LOCALs even
    # when this runs as a savepoint inside the caller's open transaction (where a release would not).
    with conn.transaction() as tx, conn.cursor(row_factory=dict_row) as cur:
        if exact:
            cur.execute("SET LOCAL enable_indexscan = off")
        else:
            cur.execute("SET LOCAL hnsw.iterative_scan = strict_order")
            cur.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(min(max(40, k), EF_SEARCH_MAX))))
        try:
            cur.execute(statement, params)
        except psycopg.errors.UndefinedColumn as exc:
            raise InvalidInput(f"{exc.diag.message_primary}: check the column names in the filter.") from None
        rows = cur.fetchall()
        raise psycopg.Rollback(tx)
    return rows
