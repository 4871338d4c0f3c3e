"""Partial HNSW indexes for the filter values a workload asks for most, and the stored calibration curve
that says where the full index needs none.

A filter that keeps a small share of the rows makes an HNSW scan walk far to meet k matches, or pushes the
search onto an exact scan of many rows. A partial index per frequent value (``WHERE section = 'libs'``)
holds only the matching rows, so the walk stays short: the idea behind workload-aware partitioning in
hybrid-query systems. pgsim's planner recognises such an index when the filter implies its predicate.

Where ``pgsim calibrate`` measured the full index on the table's own rows (``pgsim.calibration``, kind
``knn``), :func:`advise` reads the curve first: see :meth:`StoredCurve.served_from`.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgsim.db.calibration import Level
from pgsim.db.catalog import has_schema_table, resolve_table
from pgsim.db.names import table_identifier
from pgsim.db.standby import require_primary
from pgsim.errors import InvalidInput
from pgsim.knn.caches import forget_plans
from pgsim.knn.planner import DEFAULT_RECALL, DEFAULT_TUNING, Plan, Tuning, check_recall, plan
from pgsim.knn.target import vector_column

MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1
# Build parameters of advised indexes and the ef_search they need (bench/filtered.py tunes them: a denser
# graph reaches the recall of pgvector's defaults at a lower ef_search). The ef_search travels in the
# index's comment, where pgsim.knn_plan reads it.
ADVISED_M = 24
ADVISED_EF_CONSTRUCTION = 200
ADVISED_EF_SEARCH = 64
STALE_SHARE = 0.2  # a calibration whose table has grown or shrunk by more than this share is not trusted


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
    recall: float = DEFAULT_RECALL,
) -> list[Advice]:
    """Partial indexes worth building: equality filter values used by at least ``min_share`` of the
    workload's searches, whose search today walks the full index at low selectivity or scans many rows
    exactly. Most frequent first.

    With a calibration of the full index (``pgsim calibrate``, measured at this ``k``, not stale), a value
    whose filter keeps at least :meth:`StoredCurve.served_from` of the rows is not advised: the curve shows
    the full index reaching ``recall`` at every measured selectivity from there up, on a walk faster than
    the exact scan, so the calibrated planner serves such filters on the HNSW path already, and a partial
    index per value would cost its build, its memory and slower writes for a speed-up the target does not
    need. Recall falls as filters get narrower (the walk skips more of the graph), so only measured levels
    at or below a filter's selectivity vouch for it: between two levels the lower one decides. Filters
    narrower than every level that reaches the target, and tables with no curve, a stale one or one
    measured at another k, get the advice as before."""
    if not 0 < min_share <= 1:
        raise InvalidInput(f"min_share must be in (0, 1]; got {min_share}.")
    check_recall(recall)
    target = vector_column(conn, table, column)
    served_from, rows = calibrated_cover(conn, table, column, k, recall)
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
        current = plan(conn, table, column, k=k, where={name: value}, tuning=tuning, recall=recall)
        slow = current.path == "exact" and current.estimated_rows > tuning.exact_below_rows
        narrow = current.path == "hnsw" and (current.selectivity or 1.0) < 0.5  # a partial index gives ~1
        if not (slow or narrow):
            continue
        if served_from is not None and current.estimated_rows / max(rows, 1) >= served_from:
            continue  # the full index reaches the recall target there (see above)
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


def calibrated_cover(
    conn: psycopg.Connection[Any], table: str, column: str, k: int, recall: float = DEFAULT_RECALL
) -> tuple[float | None, float]:
    """The selectivity from which the stored calibration shows the full index serving filters at ``recall``
    (None without a usable curve: none, stale, or measured at another k), and the table's rows now."""
    curve = stored_curve(conn, table, column)
    if curve is None or curve.k not in (None, k) or curve.rows_now is None:
        return None, 0.0
    return curve.served_from(recall), curve.rows_now


def create(conn: psycopg.Connection[Any], advice: Advice) -> None:
    """Build one advised index without blocking writes, then refresh the table's statistics."""
    if not conn.autocommit:
        raise InvalidInput("CREATE INDEX CONCURRENTLY needs an autocommit connection (psycopg: autocommit=True).")
    require_primary(conn, "pgsim index-advise --create")
    conn.execute(advice.statement)
    schema = advice.table.split(".")[:-1]
    conn.execute(
        sql.SQL("COMMENT ON INDEX {} IS {}").format(
            sql.Identifier(*schema, advice.index_name), sql.Literal(f"pgsim: ef_search={ADVISED_EF_SEARCH}")
        )
    )
    conn.execute(sql.SQL("ANALYZE {}").format(table_identifier(advice.table)))
    forget_plans()  # searches cached a plan that did not know this index


@dataclass(frozen=True)
class StoredCurve:
    """``pgsim.calibration``'s ``knn`` row for a column, and what has changed since it was measured."""

    table: str
    column: str
    k: int | None
    queries: int | None
    ef_search: tuple[int, ...]
    levels: tuple[Level, ...]
    rows_measured: float
    rows_now: float | None  # the table's rows now, as the planner counts them (pg_class.reltuples); None: unknown
    seconds: float
    measured_by: str
    measured_at: datetime
    index_measured: str | None  # the index measured, by name, while it exists
    index_now: str | None  # the column's HNSW index for cosine distance now (the one pgsim.knn_plan walks unfiltered)
    index_current: bool  # the index measured is that one still

    @property
    def stale(self) -> list[str]:
        """Why the curve is no longer trusted; empty when it is. The rules of pgsim.knn_calibration, which the
        planner follows: the table's row count (pg_class.reltuples, kept by ANALYZE and autovacuum) is unknown
        or more than a fifth away from the rows measured, or the index measured is no longer the column's HNSW
        index (rebuilt, replaced)."""
        reasons = []
        if self.rows_now is None:
            reasons.append(
                "the table's row count is unknown (not analyzed since it was created or emptied): run ANALYZE"
            )
        elif abs(self.rows_now - self.rows_measured) > STALE_SHARE * max(self.rows_measured, 1):
            reasons.append(
                f"the table has about {self.rows_now:.0f} rows now against {self.rows_measured:.0f} when measured "
                f"(more than {STALE_SHARE:.0%} apart)"
            )
        if not self.index_current:
            was = self.index_measured or "an index that no longer exists"
            reasons.append(f"it measured {was}, and the column's HNSW index is now {self.index_now or 'none'}")
        return reasons

    def reached(self, level: Level, recall: float) -> int | None:
        """As pgsim.knn_plan reads a level: the smallest measured ``ef_search`` whose recall reached ``recall``,
        if the HNSW walk there was faster than the exact scan (or no time was measured); else None."""
        for position, found in enumerate(level.recall[: len(self.ef_search)]):
            if found >= recall:
                ms = level.hnsw_ms[position] if position < len(level.hnsw_ms) else None
                faster = ms is None or not level.exact_ms or ms < level.exact_ms
                return self.ef_search[position] if faster else None
        return None

    def served_from(self, recall: float = DEFAULT_RECALL) -> float | None:
        """The smallest measured selectivity from which the full index serves every measured filter at
        ``recall``: each level at or above it reaches the target at some ``ef_search``, faster than the exact
        scan. None when the unfiltered level does not, or the curve is stale."""
        if self.stale:
            return None
        served = None
        for level in sorted(self.levels, key=lambda level: -level.selectivity):
            if self.reached(level, recall) is None:
                break
            served = level.selectivity
        return served


def stored_curve(conn: psycopg.Connection[Any], table: str, column: str) -> StoredCurve | None:
    """The ``knn`` calibration stored for ``table.column`` (None when there is none, or pgsim's schema has no
    pgsim.calibration yet). Row-level security shows it to whoever may read the table."""
    found = resolve_table(conn, table)
    if not has_schema_table(conn, "calibration"):
        return None
    # On the caller's search_path (index names print as the caller sees them): every operator, function and
    # type pg_catalog's, named so, and every parameter cast (the rule in pgsim.db.catalog).
    attnum = conn.execute(
        "SELECT attnum FROM pg_catalog.pg_attribute WHERE attrelid OPERATOR(pg_catalog.=) %s::pg_catalog.oid "
        "AND attname OPERATOR(pg_catalog.=) %s::pg_catalog.name AND attnum OPERATOR(pg_catalog.>) 0 "
        "AND NOT attisdropped",
        [found.oid, column],
    ).fetchone()
    if attnum is None:
        raise InvalidInput(f"Table {table!r} has no column {column!r}.")
    row = conn.execute(
        """
        SELECT c.measured, c.rows_measured, c.seconds, pg_catalog.pg_get_userbyid(c.measured_by),
               c.measured_at,
               (SELECT i.indexrelid::pg_catalog.regclass::pg_catalog.text FROM pg_catalog.pg_index i
                WHERE i.indexrelid OPERATOR(pg_catalog.=) c.index_oid),
               (SELECT pg_catalog.min(i.indexrelid::pg_catalog.regclass::pg_catalog.text) FROM pg_catalog.pg_index i
                JOIN pg_catalog.pg_class ic ON ic.oid OPERATOR(pg_catalog.=) i.indexrelid
                JOIN pg_catalog.pg_am am ON am.oid OPERATOR(pg_catalog.=) ic.relam
                JOIN pg_catalog.pg_opclass oc ON oc.oid OPERATOR(pg_catalog.=) i.indclass[0]
                WHERE i.indrelid OPERATOR(pg_catalog.=) c.table_oid
                  AND am.amname OPERATOR(pg_catalog.=) 'hnsw'::pg_catalog.name
                  AND i.indkey[0] OPERATOR(pg_catalog.=) c.column_attnum
                  AND i.indisvalid AND i.indpred IS NULL
                  AND oc.opcname OPERATOR(pg_catalog.~~) '%%cosine%%'::pg_catalog.text),
               (SELECT CASE WHEN t.reltuples OPERATOR(pg_catalog.>=) 0::pg_catalog.float4 THEN t.reltuples END
                FROM pg_catalog.pg_class t WHERE t.oid OPERATOR(pg_catalog.=) c.table_oid)
        FROM pgsim.calibration c WHERE c.table_oid OPERATOR(pg_catalog.=) %s::pg_catalog.oid
          AND c.column_attnum OPERATOR(pg_catalog.=) %s::pg_catalog.int2
          AND c.kind OPERATOR(pg_catalog.=) 'knn'::pg_catalog.text
        """,
        [found.oid, attnum[0]],
    ).fetchone()
    if row is None:
        return None
    measured, rows_measured, seconds, by, at, index_measured, index_now, reltuples = row
    ef_search = tuple(int(ef) for ef in measured.get("ef_search") or ())
    levels = tuple(
        Level(
            float(level.get("selectivity", 1.0)),
            (level["filter"],) if level.get("filter") else (),
            int(level.get("rows") or 0),
            float(level.get("exact_ms") or 0.0),
            tuple(float(r) for r in level.get("recall") or ()),
            tuple(float(ms) for ms in level.get("hnsw_ms") or ()),
        )
        for level in measured.get("levels") or ()
    )
    return StoredCurve(
        found.qualified,
        column,
        measured.get("k"),
        measured.get("queries"),
        ef_search,
        levels,
        float(rows_measured),
        None if reltuples is None else float(reltuples),
        float(seconds),
        str(by),
        at,
        index_measured,
        index_now,
        index_measured is not None and index_measured == index_now,
    )
