"""Per-index calibration: how recall@k and time of the HNSW path grow with ``ef_search`` on this table, at
several filter selectivities, measured against an exact scan and stored in ``pgsim.calibration``.

pgsim.knn_plan reads the stored curve (when it is fresh and names the column's current index) to take the
HNSW path only where some ``ef_search`` reaches the search's recall target, with the smallest such
``ef_search``. The measurement:

- queries: vectors the caller gives (a query log); else the column's query bank (pgsim.set_query_bank), when
  it has one; else a row's vector moved towards another row's (``a + b/2``, normalised), so that no query is
  a row of the table, as real queries are not;
- filters: for each selectivity of the grid, the most common value of one of the table's own columns whose
  share is closest (a filter correlated with the data, the hard case for a graph walk), and a filter on a
  hash of the row's position (uncorrelated); a level's recall is the worse of the two;
- per query and filter, the exact k nearest, then the HNSW path (iterative scan, relaxed order, re-sorted,
  the ``max_scan_tuples`` the planner would give it) at each ``ef_search`` of the grid, until every query
  finds all k.

Everything is measured first and written in one statement at the end, so a calibration interrupted (Ctrl-C,
the time budget, a lost connection) leaves the previous row, or none, and never part of a new one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from pgsim.db.calibration_inputs import (
    EXACT_BELOW_ROWS,
    Target,
    calibration_target,
    level_filters,
    one_statement,
    query_vectors,
    table_oid,
    workload_levels,
)
from pgsim.db.catalog import vector_schema
from pgsim.errors import InvalidInput

DEFAULT_SECONDS = 60.0
DEFAULT_QUERIES = 50  # 30 left one stuck query 3 % of a level's recall (bench/sweep.py)
MIN_ROWS = 2000  # below, the exact path is cheap enough that the planner's defaults stand
EF_SEARCH_GRID = (20, 40, 64, 100, 160, 200, 250, 320, 400, 640, 1000)
# Standard errors taken off a level's mean recall. More than one kept Debian's text queries well above the
# target at ef_search 640 or 1,000 where 250 was enough: one query stuck in the graph moves a small sample's
# error more than its mean (bench/sweep.py).
BOUND_ERRORS = 1.0
TIE = 1e-6  # a row as near as the exact k-th counts as found (tables repeat texts)

Progress = Callable[[float], None]


@dataclass(frozen=True)
class Level:
    """One selectivity of the grid: the exact scan's time and, per ``ef_search``, recall and time."""

    selectivity: float
    filters: tuple[str, ...]
    rows: int
    exact_ms: float
    recall: tuple[float, ...]  # aligned with Calibration.ef_search; shorter when every query found all k
    hnsw_ms: tuple[float, ...]


@dataclass(frozen=True)
class Calibration:
    table: str
    column: str
    index_name: str | None
    k: int
    queries: int
    ef_search: tuple[int, ...]
    levels: tuple[Level, ...]
    rows: int  # rows with an embedding
    seconds: float
    stored: bool
    reason: str = ""  # why nothing was stored
    table_rows: int = field(default=0, repr=False)

    def measured(self) -> dict[str, Any]:
        """What goes into pgsim.calibration.measured (the shape pgsim.knn_plan and ``pgsim doctor`` read)."""
        return {
            "k": self.k,
            "queries": self.queries,
            "ef_search": list(self.ef_search),
            "levels": [
                {
                    "selectivity": level.selectivity,
                    "filter": " OR ".join(level.filters) if level.filters else None,
                    "rows": level.rows,
                    "exact_ms": round(level.exact_ms, 3),
                    "recall": [math.floor(r * 10000) / 10000 for r in level.recall],  # never up to a target
                    "hnsw_ms": [round(t, 3) for t in level.hnsw_ms],
                }
                for level in self.levels
            ],
        }


def calibrate_index(
    conn: psycopg.Connection[Any],
    table: str | int,
    column: str,
    *,
    k: int = 10,
    seconds: float = DEFAULT_SECONDS,
    queries: int | Sequence[Sequence[float]] | np.ndarray[Any, Any] = DEFAULT_QUERIES,
    filters: Sequence[str] = (),
    progress: Progress | None = None,
) -> Calibration:
    """Measure ``table.column``'s HNSW index (see the module's text) within about ``seconds`` and store the
    curve. ``queries``: how many to sample from the table, or query vectors of your own (a query log).
    Only the table's owner (or a member of the owning role) may calibrate."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= 3600:
        raise InvalidInput(f"The time budget must be more than 0 and at most 3600 seconds; got {seconds!r}.")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
        raise InvalidInput(f"k must be a whole number from 1 to 1000; got {k!r}.")
    oid = table_oid(conn, table)  # the one name resolved on the caller's path; all else by OID, pinned
    with conn.transaction(), pinned(conn):
        target = calibration_target(conn, oid, column)
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        # its own short transaction: ANALYZE's lock would otherwise last the whole measurement
        with conn.transaction(), pinned(conn):
            conn.execute(sql.SQL("ANALYZE {}").format(target.qualified))
        analysed = True
    else:
        analysed = False
    with conn.transaction(), pinned(conn):  # the row is written at the end, or not at all
        if not analysed:
            conn.execute(sql.SQL("ANALYZE {}").format(target.qualified))
        return _calibrate(conn, target, k, float(seconds), queries, tuple(filters), progress)


@contextmanager
def pinned(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """search_path pg_catalog, pg_temp for the block (which must be in a transaction): nothing on the
    session's path, a role's shadowing operator, say, takes part; the caller's path is back afterwards."""
    row = conn.execute("SELECT pg_catalog.current_setting('search_path')").fetchone()
    conn.execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true)")
    yield
    # (after an error, the block's savepoint or transaction rolls the setting back itself)
    conn.execute("SELECT pg_catalog.set_config('search_path', %s, true)", [row[0] if row else ""])


def _calibrate(
    conn: psycopg.Connection[Any],
    target: Target,
    k: int,
    seconds: float,
    queries: int | Any,
    filters: tuple[str, ...],
    progress: Progress | None,
) -> Calibration:
    started = time.perf_counter()
    deadline = started + seconds
    table, column = target.qualified.as_string(conn), target.name
    table_rows, rows = _row_counts(conn, target)

    def not_stored(reason: str) -> Calibration:
        return Calibration(table, column, target.index_name, k, 0, (), (), rows, 0.0, False, reason, table_rows)

    if rows < max(MIN_ROWS, 2 * k):
        return not_stored(
            f"{rows} rows have an embedding: fewer than {MIN_ROWS}, where an exact scan is cheap; the defaults stand"
        )
    vectors = query_vectors(conn, target, queries, rows)
    if not len(vectors):
        return not_stored("no query vector: every sampled row's vector is zero")
    levels = level_filters(conn, target, rows) + workload_levels(conn, target, filters, rows)
    levels.sort(key=lambda level: -level[0])
    plan = [(s, f, n) for s, f, n in levels if n >= max(EXACT_BELOW_ROWS, k) or s == 1.0]
    ef_grid = tuple(sorted({max(ef, k) for ef in EF_SEARCH_GRID if ef >= k or ef == EF_SEARCH_GRID[-1]}))
    measured: list[Level] = []
    total = len(plan) * len(vectors)
    done = 0
    for selectivity, level_filter, matching in plan:
        level = _measure_level(conn, target, vectors, k, selectivity, level_filter, matching, ef_grid, deadline)
        done += len(vectors)
        if progress is not None:
            progress(min(done / total, 1.0))
        if level is None:
            break
        measured.append(level)
    elapsed = time.perf_counter() - started
    if not measured:
        return not_stored(f"the time budget ({seconds} s) ended before the first level was measured")
    calibration = Calibration(
        table, column, target.index_name, k, len(vectors), ef_grid, monotone(measured), rows, elapsed, True, "",
        table_rows,
    )  # fmt: skip
    _store(conn, target, calibration)
    return calibration


def monotone(levels: list[Level]) -> tuple[Level, ...]:
    """The levels, most selective last, each level's recall at an ef_search no higher than any less
    selective level's: the planner reads the level next below a filter's selectivity, and a filter between
    two levels may be as hard as the harder of everything measured above it (a correlated filter at 70 %
    needing more than a hash filter at 40 %)."""
    ordered = sorted(levels, key=lambda level: -level.selectivity)
    worst: list[float] = []
    result = []
    for level in ordered:
        width = max(len(worst), len(level.recall))
        own = [level.recall[min(i, len(level.recall) - 1)] for i in range(width)]
        above = [worst[min(i, len(worst) - 1)] for i in range(width)] if worst else own
        worst = [min(a, b) for a, b in zip(own, above, strict=True)]
        depth = next((i + 1 for i, r in enumerate(worst) if r >= 1.0), width)
        times = [level.hnsw_ms[min(i, len(level.hnsw_ms) - 1)] for i in range(depth)]
        result.append(replace(level, recall=tuple(worst[:depth]), hnsw_ms=tuple(times)))
    return tuple(result)


def _row_counts(conn: psycopg.Connection[Any], target: Target) -> tuple[int, int]:
    row = conn.execute(
        sql.SQL("SELECT count(*), count({col}) FROM {table}").format(col=target.column, table=target.qualified)
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _measure_level(
    conn: psycopg.Connection[Any],
    target: Target,
    vectors: np.ndarray[Any, Any],
    k: int,
    selectivity: float,
    filters: tuple[str, ...],
    matching: int,
    ef_grid: tuple[int, ...],
    deadline: float,
) -> Level | None:
    """The level's exact time and, per ef_search, its worst recall over its filters and mean time; None when
    the budget ran out before enough queries were measured."""
    max_scan_tuples = min(max(20000, math.ceil(20 * k / max(selectivity, 1e-9))), 2_000_000_000)
    conditions = filters or ("TRUE",)
    schema = sql.Identifier(vector_schema(conn))
    exact_ms: list[float] = []
    found: dict[str, list[list[float]]] = {c: [] for c in conditions}  # per filter, per query: recall per ef
    times: list[list[float]] = []  # per query and filter: milliseconds per ef_search, as far as measured
    for query in vectors:
        if time.perf_counter() > deadline:
            break
        # the query as a literal, and no parameters: nothing in a name or a value is read as a placeholder
        typed_query = sql.SQL("{}::{}.{}").format(
            sql.Literal("[" + ",".join(f"{x:.7g}" for x in query) + "]"), schema, sql.Identifier(target.type_name)
        )
        distance = sql.SQL("{col} OPERATOR({schema}.<=>) {q}").format(col=target.column, schema=schema, q=typed_query)
        for condition in conditions:
            parts = {
                "d": distance,
                "table": target.qualified,
                "col": target.column,
                "cond": sql.SQL(condition),
                "k": sql.Literal(k),
                "schema": schema,
                "q": typed_query,
            }
            exact = sql.SQL(
                "SELECT ({d}) + 0 FROM {table} WHERE {col} IS NOT NULL AND ({cond}) ORDER BY 1 LIMIT {k}"
            ).format(**parts)
            started = time.perf_counter()
            truth = [d for (d,) in one_statement(conn, exact)]
            exact_ms.append((time.perf_counter() - started) * 1000)
            if not truth:
                continue
            walk = _walk(target, parts, k)
            recalls, ms = _walks(conn, walk, ef_grid, max_scan_tuples, truth[-1] + TIE, len(truth), target.reranked)
            found[condition].append(recalls + [recalls[-1]] * (len(ef_grid) - len(recalls)))
            times.append(ms + [math.nan] * (len(ef_grid) - len(ms)))
    measured = min((len(v) for v in found.values()), default=0)
    if measured < min(5, len(vectors)):
        return None
    recall_per_ef = [
        min(_lower_bound([r[i] for r in found[c]]) for c in conditions if found[c]) for i in range(len(ef_grid))
    ]
    everything = [all(r[i] >= 1.0 for c in conditions for r in found[c]) for i in range(len(ef_grid))]
    depth = next((i + 1 for i, done in enumerate(everything) if done), len(ef_grid))
    measured_ms = np.array(times, dtype=np.float64)[:, :depth]
    hnsw_ms = [float(np.nanmedian(column)) if np.isfinite(column).any() else 0.0 for column in measured_ms.T]
    return Level(
        selectivity, filters, matching, float(np.median(exact_ms)), tuple(recall_per_ef[:depth]), tuple(hnsw_ms)
    )


def _lower_bound(recalls: list[float]) -> float:
    """The mean recall over the queries, less ``BOUND_ERRORS`` standard errors: what the next queries may
    expect, not what these few happened to find."""
    if len(recalls) < 2:
        return float(np.mean(recalls)) if recalls else 0.0
    error = float(np.std(recalls, ddof=1)) / math.sqrt(len(recalls))
    return max(0.0, float(np.mean(recalls)) - BOUND_ERRORS * error)


def _walk(target: Target, parts: dict[str, sql.Composable], k: int) -> Callable[[int], sql.Composed]:
    """The HNSW path's statement at an ef_search, as the search runs it: on a bit or prefix index (bit or
    prefix storage), ef_search candidates by Hamming or prefix distance re-ranked by cosine distance
    (pgsim.knn)."""
    if not target.reranked:
        return lambda ef: sql.SQL(
            "WITH r AS MATERIALIZED (SELECT {d} AS d FROM {table} WHERE ({cond}) ORDER BY {d} LIMIT {k}) "
            "SELECT d FROM r ORDER BY d"
        ).format(**parts)

    def compressed(value: sql.Composable) -> sql.Composed:
        if target.prefix is not None:
            return sql.SQL("({schema}.subvector({value}, 1, {n}))::{schema}.vector({n})").format(
                schema=parts["schema"], value=value, n=sql.Literal(target.prefix)
            )
        return sql.SQL("({}.binary_quantize({}))::bit({})").format(
            parts["schema"], value, sql.Literal(target.dimension)
        )

    operator = sql.SQL("<=>" if target.prefix is not None else "<~>")
    return lambda ef: sql.SQL(
        "WITH r AS MATERIALIZED (SELECT {d} AS d FROM {table} WHERE ({cond}) AND {col} IS NOT NULL "
        "ORDER BY {column_key} OPERATOR({schema}.{operator}) {query_key} LIMIT {candidates}) "
        "SELECT d FROM r ORDER BY d LIMIT {k}"
    ).format(
        column_key=compressed(parts["col"]),
        query_key=compressed(parts["q"]),
        operator=operator,
        candidates=sql.Literal(max(k, ef)),
        **parts,
    )


def _walks(
    conn: psycopg.Connection[Any],
    statement_at: Callable[[int], sql.Composed],
    ef_grid: tuple[int, ...],
    max_scan_tuples: int,
    kth: float,
    wanted: int,
    reranked: bool = False,
) -> tuple[list[float], list[float]]:
    """Recall and milliseconds of the HNSW statement at each ef_search, until it finds all ``wanted`` rows
    as near as the exact ``kth`` distance; the settings last only for each walk's savepoint."""
    recalls: list[float] = []
    ms: list[float] = []
    for ef in ef_grid:
        with conn.transaction() as tx:
            conn.execute(
                "SELECT set_config('enable_indexscan', 'on', true), "
                "set_config('hnsw.iterative_scan', 'relaxed_order', true), "
                "set_config('hnsw.ef_search', %s, true), set_config('hnsw.max_scan_tuples', %s, true), "
                # a bit or prefix walk runs without sorting, as searches run it (pgsim.knn.planner)
                "set_config('enable_sort', CASE WHEN %s THEN 'off' ELSE current_setting('enable_sort') END, true)",
                [str(ef), str(max_scan_tuples), reranked],
            )
            started = time.perf_counter()
            got = [d for (d,) in one_statement(conn, statement_at(ef))]
            ms.append((time.perf_counter() - started) * 1000)
            raise psycopg.Rollback(tx)
        recalls.append(sum(1 for d in got if d is not None and d <= kth) / wanted)
        if recalls[-1] >= 1.0:
            break
    return recalls, ms


def _store(conn: psycopg.Connection[Any], target: Target, calibration: Calibration) -> None:
    conn.execute(
        """
        INSERT INTO pgsim.calibration AS c (table_oid, column_attnum, kind, index_oid, measured, rows_measured,
            changes_measured, seconds)
        SELECT %(table)s, %(attnum)s, 'knn', %(index)s, %(measured)s::jsonb,
               pgsim.analysed_rows(%(table)s::pg_catalog.oid::pg_catalog.regclass),
               (SELECT s.n_tup_ins + s.n_tup_del FROM pg_catalog.pg_stat_all_tables s
                WHERE s.relid = %(table)s::pg_catalog.oid), %(seconds)s
        ON CONFLICT (table_oid, column_attnum, kind) DO UPDATE SET index_oid = excluded.index_oid,
            measured = excluded.measured, rows_measured = excluded.rows_measured,
            changes_measured = excluded.changes_measured, seconds = excluded.seconds,
            measured_by = excluded.measured_by, measured_at = excluded.measured_at
        """,
        {
            "table": target.oid,
            "attnum": target.attnum,
            "index": target.index_oid,
            "measured": json.dumps(calibration.measured()),
            "seconds": calibration.seconds,
        },
    )
