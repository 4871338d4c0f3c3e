"""The SQL of a search: the filter as one condition and the statement on each path."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from pgsim.db.names import table_identifier
from pgsim.errors import InvalidInput
from pgsim.knn.target import VectorColumn

DISTANCE = "_pgsim_distance"


QUERY_LITERAL = re.compile(r"'\[[^\]]*\]'::(?:vector|halfvec)")


@dataclass(frozen=True)
class Between:
    """A range filter value: ``low <= column < high``; either end may be left open."""

    low: Any = None
    high: Any = None


Where = Mapping[str, Any] | sql.Composable | None


def check_no_nul(value: object, what: str) -> None:
    """PostgreSQL's text cannot hold NUL: say so, instead of letting psycopg fail (or cut a name short)."""
    if isinstance(value, str) and "\x00" in value:
        raise InvalidInput(f"{what} {value!r} holds a NUL character, which PostgreSQL text cannot hold; remove it.")


class Condition(sql.Composable):
    """A filter, to be placed in a statement that has parameters: its ``%`` signs (in a value such as
    ``'50% off'``, or a LIKE pattern) are doubled, so psycopg reads none of them as a placeholder.
    :meth:`text` is the condition itself, for where it is passed as a value (the planner's filter)."""

    def __init__(self, condition: sql.Composable) -> None:
        super().__init__(condition)
        self.condition = condition

    def as_bytes(self, context: Any = None) -> bytes:
        return self.condition.as_bytes(context).replace(b"%", b"%%")

    def text(self, context: Any) -> str:
        return self.condition.as_string(context)


def filter_sql(where: Where) -> Condition:
    """A WHERE condition with its values as literals (psycopg quotes them); identifiers always quoted."""
    return Condition(_condition(where))


def _condition(where: Where) -> sql.Composable:
    if where is None:
        return sql.SQL("TRUE")
    if isinstance(where, Condition):
        return where.condition
    if isinstance(where, sql.Composable):
        return where
    clauses: list[sql.Composable] = []
    for name, value in where.items():
        check_no_nul(name, "The filter column")
        for part in value if isinstance(value, (list, tuple, set, frozenset)) else (value,):
            check_no_nul(part, f"The filter value of {name!r}")
        column = sql.Identifier(name)
        if isinstance(value, (list, tuple, set, frozenset)):
            values = list(value)
            if not values:
                clauses.append(sql.SQL("FALSE"))
            else:
                clauses.append(sql.SQL("{} IN ({})").format(column, sql.SQL(", ").join(map(sql.Literal, values))))
        elif isinstance(value, Between):
            if value.low is not None:
                clauses.append(sql.SQL("{} >= {}").format(column, sql.Literal(value.low)))
            if value.high is not None:
                clauses.append(sql.SQL("{} < {}").format(column, sql.Literal(value.high)))
        elif value is None:
            clauses.append(sql.SQL("{} IS NULL").format(column))
        else:
            clauses.append(sql.SQL("{} = {}").format(column, sql.Literal(value)))
    return sql.SQL(" AND ").join(clauses) if clauses else sql.SQL("TRUE")


PATHS = ("exact", "hnsw", "reranked")


def search_statement(
    target: VectorColumn, condition: sql.Composable, columns: Sequence[str] | None, path: str, limit: str = "k"
) -> sql.Composed:
    """The search on one path. Exact: ordered by the distance plus zero, an expression no index can serve,
    so no setting is needed to keep the HNSW index out. HNSW: ordered by the indexed operator, and re-sorted
    afterwards, since an iterative scan yields rows in relaxed order. Reranked (bit or prefix storage): the
    walk over the compressed index (:func:`compressed_order`) yields ``%(candidates)s`` rows, which are
    re-ranked by cosine distance on the full vectors, and the nearest ``limit`` kept."""
    query = sql.SQL("%(q)s::halfvec") if target.type_name == "halfvec" else sql.SQL("%(q)s")
    column = sql.Identifier(target.column)
    if path == "exact":
        order: sql.Composable = sql.SQL("({} <=> {}) + 0").format(column, query)
    elif path == "reranked":
        order = compressed_order(target, column, query)
    else:
        order = sql.SQL("{} <=> {}").format(column, query)
    if path != "hnsw":  # a row not embedded yet has no distance: the HNSW index holds no such row, a scan skips it
        condition = sql.SQL("{} IS NOT NULL AND ({})").format(column, condition)
    if path == "reranked":  # a plan cached before the index was dropped or replaced walks nothing: k rows short,
        # the search scans exactly (a constant condition, evaluated once)
        condition = sql.SQL(
            "pgsim.reranked_index(%(reranked_table)s::pg_catalog.regclass, %(reranked_column)s::pg_catalog.name) "
            "OPERATOR(pg_catalog.=) %(reranked_index)s::pg_catalog.text AND {}{}"
        ).format(walkable_query(target, query), condition)
    nearest = sql.SQL(
        "SELECT {selected}, {col} <=> {q} AS {distance} FROM {table} WHERE {condition} ORDER BY {order} LIMIT {limit}"
    ).format(
        limit=sql.Placeholder("candidates" if path == "reranked" else limit),
        selected=sql.SQL(", ").join(sql.Identifier(c) for c in (columns or target.default_columns)),
        col=column,
        q=query,
        distance=sql.Identifier(DISTANCE),
        table=table_identifier(target.table),
        condition=guarded(target, condition),
        order=order,
    )
    if path == "exact":
        return nearest
    return sql.SQL("WITH relaxed AS MATERIALIZED ({}) SELECT * FROM relaxed ORDER BY {} LIMIT {}").format(
        nearest, sql.Identifier(DISTANCE), sql.Placeholder(limit)
    )


def walkable_query(target: VectorColumn, query: sql.Composable) -> sql.Composable:
    """On prefix storage, a condition that the query's prefix has a direction: a query whose first values are
    all zero has no cosine distance to any row's prefix, so its walk walks nothing and the exact scan follows."""
    if target.prefix is None:
        return sql.SQL("")
    return sql.SQL("vector_norm(subvector({}, 1, {})) > 0 AND ").format(query, sql.Literal(target.prefix))


def compressed_order(target: VectorColumn, column: sql.Composable, query: sql.Composable) -> sql.Composed:
    """The distance a walk of ``target``'s compressed index orders by, as the index's expression reads:
    cosine over the first ``prefix`` values (prefix storage), else Hamming over the binary-quantised vectors
    (bit storage). ``column`` and ``query`` are SQL for the column and the query vector."""
    if target.prefix is not None:
        return sql.SQL("(subvector({col}, 1, {n}))::vector({n}) <=> (subvector({q}, 1, {n}))::vector({n})").format(
            col=column, q=query, n=sql.Literal(target.prefix)
        )
    return sql.SQL("(binary_quantize({col}))::bit({n}) <~> (binary_quantize({q}))::bit({n})").format(
        col=column, q=query, n=sql.Literal(target.dimension)
    )


def guarded(target: VectorColumn, condition: sql.Composable) -> sql.Composable:
    """For a registered column, the filter behind a check that the query's model is the column's: a constant
    condition, which PostgreSQL evaluates once, before the scan."""
    if target.registration is None:
        return condition
    return sql.SQL(
        "pgsim.expect_model(%(g_schema)s, %(g_table)s, %(g_column)s, %(g_model)s, %(g_revision)s) AND ({})"
    ).format(condition)
