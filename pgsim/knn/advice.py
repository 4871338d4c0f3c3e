"""Partial HNSW indexes for the filter values a workload asks for most.

A filter that keeps a small share of the rows makes an HNSW scan walk far to meet k matches, or pushes the
search onto an exact scan of many rows. A partial index per frequent value (``WHERE section = 'libs'``)
holds only the matching rows, so the walk stays short: the idea behind workload-aware partitioning in
hybrid-query systems. pgsim's planner recognises such an index when the filter implies its predicate.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgsim.db.names import table_identifier
from pgsim.errors import InvalidInput
from pgsim.knn.caches import forget_plans
from pgsim.knn.planner import DEFAULT_TUNING, Plan, Tuning, plan
from pgsim.knn.target import vector_column

MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1
# Build parameters of advised indexes and the ef_search they need (bench/filtered.py tunes them: a denser
# graph reaches the recall of pgvector's defaults at a lower ef_search). The ef_search travels in the
# index's comment, where pgsim.knn_plan reads it.
ADVISED_M = 24
ADVISED_EF_CONSTRUCTION = 200
ADVISED_EF_SEARCH = 64


@dataclass(frozen=True)
class Advice:
    table: str
    column: str
    value: Any
    share: float  # of the workload's searches that filter on this value
    current: Plan  # how such a search runs today
    index_name: str
    statement: sql.Composed


def index_name(table: str, column: str, filter_column: str, value: Any) -> str:
    """A readable name that fits in 63 bytes and differs for every (table, column, filter value)."""
    digest = hashlib.sha256(repr((table, column, filter_column, value)).encode()).hexdigest()[:8]
    readable = re.sub(r"[^a-z0-9]+", "_", f"{table.split('.')[-1]}_{filter_column}_{value}".lower()).strip("_")
    return f"{readable[: MAX_IDENTIFIER - len(digest) - 6]}_{digest}_hnsw"


def advise(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    workload: Iterable[Mapping[str, Any]],
    *,
    k: int = 10,
    min_share: float = 0.05,
    tuning: Tuning = DEFAULT_TUNING,
) -> list[Advice]:
    """Partial indexes worth building: equality filter values used by at least ``min_share`` of the
    workload's searches, whose search today walks the full index at low selectivity or scans many rows
    exactly. Most frequent first."""
    if not 0 < min_share <= 1:
        raise InvalidInput(f"min_share must be in (0, 1]; got {min_share}.")
    target = vector_column(conn, table, column)
    counts: Counter[tuple[str, Any]] = Counter()
    searches = 0
    for where in workload:
        searches += 1
        for name, value in where.items():
            if isinstance(value, (str, int, float, bool)):
                counts[(name, value)] += 1
    advice = []
    for (name, value), count in counts.most_common():
        share = count / searches
        if share < min_share:
            break
        current = plan(conn, table, column, k=k, where={name: value}, tuning=tuning)
        slow = current.path == "exact" and current.estimated_rows > tuning.exact_below_rows
        narrow = current.path == "hnsw" and (current.selectivity or 1.0) < 0.5  # a partial index gives ~1
        if not (slow or narrow):
            continue
        name_of_index = index_name(table, column, name, value)
        statement = sql.SQL(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {table} USING hnsw ({column} {opclass}) "
            "WITH (m = {m}, ef_construction = {ef_construction}) WHERE {filter_column} = {value}"
        ).format(
            m=sql.Literal(ADVISED_M),
            ef_construction=sql.Literal(ADVISED_EF_CONSTRUCTION),
            index=sql.Identifier(name_of_index),
            table=table_identifier(table),
            column=sql.Identifier(column),
            opclass=sql.SQL(f"{target.type_name}_cosine_ops"),
            filter_column=sql.Identifier(name),
            value=sql.Literal(value),
        )
        advice.append(Advice(table, name, value, share, current, name_of_index, statement))
    return advice


def create(conn: psycopg.Connection[Any], advice: Advice) -> None:
    """Build one advised index without blocking writes, then refresh the table's statistics."""
    if not conn.autocommit:
        raise InvalidInput("CREATE INDEX CONCURRENTLY needs an autocommit connection (psycopg: autocommit=True).")
    conn.execute(advice.statement)
    schema = advice.table.split(".")[:-1]
    conn.execute(
        sql.SQL("COMMENT ON INDEX {} IS {}").format(
            sql.Identifier(*schema, advice.index_name), sql.Literal(f"pgsim: ef_search={ADVISED_EF_SEARCH}")
        )
    )
    conn.execute(sql.SQL("ANALYZE {}").format(table_identifier(advice.table)))
    forget_plans()  # searches cached a plan that did not know this index
