"""Which path a search takes: ``pgsim.knn_plan``'s choice, checked against the index PostgreSQL would scan,
and the settings the hnsw path runs under.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql

from pgsim.db.names import table_identifier
from pgsim.errors import InvalidInput, SchemaMissing
from pgsim.knn.caches import forget_plans
from pgsim.knn.statements import Condition, Where, filter_sql
from pgsim.knn.target import VectorColumn, check_k, vector_column


@dataclass(frozen=True)
class Plan:
    """What ``pgsim.knn_plan`` decided, and whether the exact fallback ran."""

    path: str
    index_name: str | None
    estimated_rows: float
    indexed_rows: float | None
    selectivity: float | None
    ef_search: int | None
    max_scan_tuples: int | None
    reason: str
    expected_recall: float | None = None  # recall@k the calibration measured for this path (1 when exact)
    fell_back: bool = False
    # bit or prefix storage: the candidates the walk over the compressed index yields, re-ranked by cosine
    # distance on the full vectors; None on other indexes and on the exact path
    candidates: int | None = None


@dataclass(frozen=True)
class Tuning:
    """The planner's thresholds (bench/filtered.py tunes the defaults)."""

    exact_below_rows: float = 1000  # fewer estimated matching rows: exact scan
    hnsw_ef_search: int = 200  # unfiltered and on the hnsw path's start
    min_hnsw_selectivity: float = 0.5  # below: exact scan, unless a partial index makes the filter ~1


DEFAULT_TUNING = Tuning()
DEFAULT_RECALL = 0.99  # the recall@k a calibrated plan must have measured for the HNSW path


class ModelChanged(Exception):
    """The registry names another model for the column than the one the query was encoded with."""


class UnknownColumn(InvalidInput):
    """A column the statement names is not in the table: the filter's mistake, or a column list cached
    before the table changed (ALTER TABLE, the switch of a changed embedding)."""


def settings_statement(chosen: Plan) -> sql.Composed:
    """The settings pgsim.prepare_knn applies on the hnsw path; on a bit or prefix index's, sorting off too: a
    sort by Hamming or prefix distance in place of the walk would give approximate candidates (on other
    indexes a sort by cosine distance in place of the walk is exact)."""
    return sql.SQL(
        "SELECT set_config('enable_indexscan', 'on', true), set_config('hnsw.iterative_scan', 'relaxed_order', true), "
        "set_config('hnsw.ef_search', {}, true), set_config('hnsw.max_scan_tuples', {}, true), "
        "set_config('enable_sort', {}, true)"
    ).format(
        sql.Literal(str(chosen.ef_search)),
        sql.Literal(str(chosen.max_scan_tuples)),
        sql.SQL("'off'" if chosen.candidates else "pg_catalog.current_setting('enable_sort')"),
    )


def plan(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    *,
    k: int = 10,
    where: Where = None,
    tuning: Tuning = DEFAULT_TUNING,
    recall: float = DEFAULT_RECALL,
) -> Plan:
    """What ``pgsim.knn_plan`` decides for such a search, without running it. (A search also checks that
    PostgreSQL would scan the planned index; :func:`explain` shows the plan after that check.)"""
    check_k(k)
    check_recall(recall)
    target = vector_column(conn, table, column)
    with clear_errors(), conn.transaction() as tx:
        chosen = run_plan(conn, plan_params(conn, target, k, filter_sql(where), tuning, recall), apply=False)
        raise psycopg.Rollback(tx)
    return chosen


def under_hnsw_settings(
    conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any], chosen: Plan, statement: bytes, params: dict[str, Any]
) -> list[Any]:
    """``statement``'s rows under the hnsw path's settings, in a transaction that is rolled back (a savepoint
    inside the caller's), so the settings never outlive it."""
    with conn.transaction() as tx:
        conn.execute(settings_statement(chosen))
        rows = cur.execute(statement, params, prepare=False).fetchall()
        raise psycopg.Rollback(tx)
    return rows


def checked_plan(conn: psycopg.Connection[Any], chosen: Plan, hnsw: bytes, params: dict[str, Any]) -> Plan:
    """``chosen``, or the exact path if PostgreSQL would scan a different HNSW index than the one planned for.

    knn_plan's selectivity is relative to the index it expects (a partial one, say), but the planner picks
    the index when the search runs, and pgvector's costs move with ef_search: a higher ef_search can make
    it prefer the full index, where the same filter is narrow and the walk loses recall. So the search
    statement itself is explained once, under the hnsw settings, before the plan is cached."""
    if chosen.path != "hnsw" or chosen.index_name is None:
        return chosen
    with conn.cursor() as cur:
        ((explained,),) = under_hnsw_settings(conn, cur, chosen, b"EXPLAIN (FORMAT JSON) " + hnsw, params)
    ordering = set(ordering_indexes(explained))
    if not ordering and chosen.candidates is None:
        return chosen  # no index ordering at all: the rows are exact anyway (a compressed walk's candidates are not)
    if ordering and ordering <= index_names(conn, chosen.index_name):
        return chosen  # the planned index (on a partitioned table: its partitions)
    return replace(
        chosen,
        path="exact",
        ef_search=None,
        max_scan_tuples=None,
        candidates=None,
        reason=f"planned for index {chosen.index_name}, but at these settings PostgreSQL would scan "
        f"{', '.join(sorted(ordering)) or 'no index'} instead: an exact scan keeps the recall",
    )


def with_candidates(conn: psycopg.Connection[Any], chosen: Plan, target: VectorColumn, k: int) -> Plan:
    """``chosen``, with the candidates to re-rank when its index is the compressed index of bit or prefix
    storage (``pgsim.reranked_index``): as many as the walk's ``ef_search``, at least k."""
    if chosen.path != "hnsw" or chosen.index_name is None or chosen.ef_search is None:
        return chosen
    row = conn.execute(  # both names printed on the caller's path, as knn_plan printed index_name
        "SELECT pgsim.reranked_index(%s::pg_catalog.regclass, %s::pg_catalog.name)",
        [table_identifier(target.table).as_string(conn), target.column],
    ).fetchone()
    if row is None or row[0] != chosen.index_name:
        return chosen
    return replace(chosen, candidates=max(k, chosen.ef_search))


def walk_statement(chosen: Plan, hnsw: bytes, reranked: bytes, params: dict[str, Any]) -> bytes:
    """The statement of the hnsw path for ``chosen``'s index, with its candidates in ``params``."""
    params["candidates"] = chosen.candidates or params.get("k")
    params["reranked_index"] = chosen.index_name
    return reranked if chosen.candidates else hnsw


def index_names(conn: psycopg.Connection[Any], index_name: str) -> set[str]:
    """The bare names of an index and, if partitioned, of its partitions, as EXPLAIN names them (unquoted)."""
    rows = conn.execute(  # the name as knn_plan gave it, on the caller's path: so every name here qualified
        "SELECT c.relname::pg_catalog.text FROM pg_catalog.pg_class c "
        "WHERE c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(%s::pg_catalog.text) "
        "UNION SELECT c.relname::pg_catalog.text "
        "FROM pg_catalog.pg_partition_tree(pg_catalog.to_regclass(%s::pg_catalog.text)) AS t "
        "JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.relid",
        [index_name, index_name],
    ).fetchall()
    return {name for (name,) in rows}


def ordering_indexes(node: Any) -> Iterator[str]:
    """Names of the indexes that produce an ORDER BY (HNSW scans) anywhere in an EXPLAIN (FORMAT JSON) tree."""
    if isinstance(node, list):
        for item in node:
            yield from ordering_indexes(item)
    elif isinstance(node, dict):
        if "Order By" in node and "Index Name" in node:
            yield str(node["Index Name"])
        for value in node.values():
            if isinstance(value, (list, dict)):
                yield from ordering_indexes(value)


def run_plan(conn: psycopg.Connection[Any], params: list[Any], *, apply: bool) -> Plan:
    """pgsim.prepare_knn (which also applies the settings) or pgsim.knn_plan (which only tells)."""
    function = sql.SQL("pgsim.prepare_knn" if apply else "pgsim.knn_plan")
    statement = sql.SQL("SELECT (p).* FROM (SELECT {}(%s::regclass, %s, %s, %s, %s, %s, %s, %s) AS p) AS planned")
    row = conn.execute(statement.format(function), params).fetchone()
    assert row is not None
    return Plan(*row)


def plan_params(
    conn: psycopg.Connection[Any],
    target: VectorColumn,
    k: int,
    condition: sql.Composable,
    tuning: Tuning,
    recall: float = DEFAULT_RECALL,
) -> list[Any]:
    return [
        table_identifier(target.table).as_string(conn),
        target.column,
        k,
        condition.text(conn) if isinstance(condition, Condition) else condition.as_string(conn),
        tuning.exact_below_rows,
        tuning.hnsw_ef_search,
        tuning.min_hnsw_selectivity,
        recall,
    ]


def check_recall(recall: float) -> None:
    if isinstance(recall, bool) or not isinstance(recall, (int, float)) or not 0 < recall <= 1:
        raise InvalidInput(f"recall is a target from 0 (exclusive) to 1; got {recall!r}.")


@contextmanager
def model_change_as_input_error() -> Iterator[None]:
    try:
        yield
    except ModelChanged as exc:
        forget_plans()
        raise InvalidInput(f"{exc} Run it again.") from None


@contextmanager
def clear_errors() -> Iterator[None]:
    """The database's complaints about a search, as InvalidInput that says what to do."""
    try:
        yield
    except psycopg.errors.DataException as exc:
        if (exc.diag.message_primary or "").startswith("pgsim:"):
            raise ModelChanged(exc.diag.message_primary) from None
        raise
    except (psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName):
        raise SchemaMissing("Schema pgsim is missing or out of date here: run `pgsim install` first.") from None
    except psycopg.errors.UndefinedColumn as exc:
        raise UnknownColumn(
            f"The filter is not valid here: {exc.diag.message_primary}; check its column names (or, if the table "
            "changed while this transaction ran, roll back and search again)."
        ) from None
    except psycopg.errors.SyntaxError as exc:
        raise InvalidInput(
            f"The filter is not valid here: {exc.diag.message_primary}; check its column names."
        ) from None
