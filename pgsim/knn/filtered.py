"""Filtered k-nearest-neighbour search that returns k rows when k rows match.

1. ``pgsim.knn_plan`` (SQL) estimates how many rows pass the filter and picks a path: ``exact``
   (filter first, then distances of the matching rows) or ``hnsw`` (iterative scan in relaxed order with
   ``ef_search`` and ``max_scan_tuples`` sized from the estimate). Plans are cached for a while per
   (database, table, column, k, filter).
2. The exact path is one statement that no index can order, so it needs no setting and no transaction.
   The hnsw path sets its settings in a transaction (a savepoint inside the caller's) that is rolled back,
   so nothing leaks, and re-sorts its rows by distance.
3. If the hnsw path still returns fewer than k rows, the exact statement runs: an estimate that was off
   costs time, never rows.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgsim.errors import InvalidInput
from pgsim.knn.caches import database_key, forget_plans, plan_cache, statement_cache
from pgsim.knn.documents import DOCUMENT_TUNING, NotChunked, documents_of
from pgsim.knn.planner import (
    DEFAULT_RECALL,
    DEFAULT_TUNING,
    ModelChanged,
    Plan,
    Tuning,
    UnknownColumn,
    check_recall,
    checked_plan,
    clear_errors,
    model_change_as_input_error,
    plan_params,
    run_plan,
    under_hnsw_settings,
    walk_statement,
    with_candidates,
)
from pgsim.knn.statements import DISTANCE, PATHS, QUERY_LITERAL, Where, filter_sql, search_statement
from pgsim.knn.target import VectorColumn, check_k, target_and_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    row: dict[str, Any]
    distance: float
    # on a chunked embedding: the document's nearest chunk, its number and its character span in the source text
    chunk_no: int | None = None
    span: tuple[int, int] | None = None


def search(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    query: str | Sequence[float] | Any,
    *,
    k: int = 10,
    where: Where = None,
    columns: Sequence[str] | None = None,
    model: str | None = None,
    tuning: Tuning = DEFAULT_TUNING,
    recall: float = DEFAULT_RECALL,
) -> list[Hit]:
    """The k rows of ``table`` nearest to ``query`` that pass ``where``, nearest first. ``query`` is a vector,
    or text encoded with the column's registered model (``model`` may name it; another model is an error),
    else with ``model`` or all-MiniLM-L6-v2. ``where`` is a ``psycopg.sql.Composable`` condition, or a dict:
    {column: value} for equality, {column: [values]} for IN, {column: Between(low, high)} for a range.
    ``recall``: the recall@k the HNSW path must have measured on this table (``pgsim.calibrate``) to be
    taken; where it was not measured, the planner's defaults decide."""
    return search_with_plan(
        conn, table, column, query, k=k, where=where, columns=columns, model=model, tuning=tuning, recall=recall
    )[0]


def search_with_plan(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    query: str | Sequence[float] | Any,
    *,
    k: int = 10,
    where: Where = None,
    columns: Sequence[str] | None = None,
    model: str | None = None,
    tuning: Tuning = DEFAULT_TUNING,
    recall: float = DEFAULT_RECALL,
) -> tuple[list[Hit], Plan]:
    """:func:`search`, and the plan it followed (``Plan.expected_recall``: what the calibration measured for
    the path taken; 1 on the exact path, None where nothing was measured)."""
    check_sync(conn)
    check_k(k)
    check_recall(recall)
    try:
        return _search(conn, table, column, query, k, where, columns, model, tuning, recall)
    except ModelChanged as exc:  # a model change completed since this column's registration was cached
        forget_plans()
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            raise InvalidInput(f"{exc} Roll back the transaction and search again.") from None
        log.info("the model of %s.%s changed; searching again", table, column)
    except UnknownColumn:  # perhaps the table changed since its columns were cached: once more, afresh
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raise
        forget_plans()
    try:
        return _search(conn, table, column, query, k, where, columns, model, tuning, recall)
    except ModelChanged as exc:
        raise InvalidInput(str(exc)) from None


def _search(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    query: Any,
    k: int,
    where: Where,
    columns: Sequence[str] | None,
    model: str | None,
    tuning: Tuning,
    recall: float,
) -> tuple[list[Hit], Plan]:
    target, params = target_and_params(conn, table, column, query, model)
    if target.chunked:
        return _documents(conn, target, params, k, where, columns, tuning)
    params["k"] = k
    condition = filter_sql(where)
    planned = plan_params(conn, target, k, condition, tuning, recall)
    plan_key = (database_key(conn), *planned)
    # database, table, column, filter, selected columns, guarded by the registry
    statement_key = (*plan_key[:3], plan_key[4], tuple(columns or ()), target.registration is not None)
    statements = statement_cache.get(statement_key)
    if statements is None:
        statements = statement_cache.put(
            statement_key, tuple(search_statement(target, condition, columns, path).as_bytes(conn) for path in PATHS)
        )
    exact, hnsw, reranked = statements
    chosen = plan_cache.get(plan_key)
    with clear_errors(), conn.cursor(row_factory=dict_row) as cur:
        if chosen is None:
            proposed = with_candidates(conn, run_plan(conn, planned, apply=False), target, k)
            proposed = checked_plan(conn, proposed, walk_statement(proposed, hnsw, reranked, params), params)
            chosen = plan_cache.put(plan_key, proposed)
        walk = walk_statement(chosen, hnsw, reranked, params)
        rows = [] if chosen.path == "exact" else under_hnsw_settings(conn, cur, chosen, walk, params)
        if chosen.path == "hnsw" and len(rows) < k:
            log.info("hnsw path gave %d of %d rows; exact scan instead", len(rows), k)
            chosen = replace(chosen, fell_back=True)
        if chosen.path == "exact" or chosen.fell_back:
            # no setting needed: the statement orders by an expression no index serves; one round trip
            rows = cur.execute(exact, params, prepare=False).fetchall()
    if chosen.index_name is None:
        warnings.warn(
            f"{table}.{column} has no HNSW index for cosine distance, so every search scans the table. Create one: "
            f"CREATE INDEX ON {table} USING hnsw ({_index_key(target)})",
            NoIndexWarning,
            stacklevel=4,
        )
    return [Hit(row=row, distance=float(row.pop(DISTANCE))) for row in rows], chosen


def _documents(
    conn: psycopg.Connection[Any],
    target: VectorColumn,
    params: dict[str, Any],
    k: int,
    where: Where,
    columns: Sequence[str] | None,
    tuning: Tuning,
) -> tuple[list[Hit], Plan]:
    """A chunked column's search: k documents by their chunks (pgsim.knn.documents), with its own
    thresholds unless ``tuning`` gives others."""
    condition = None if where is None else filter_sql(where).condition
    try:
        with clear_errors():
            found, path = documents_of(
                conn, target, params, k, condition, columns, DOCUMENT_TUNING if tuning == DEFAULT_TUNING else tuning
            )
    except NotChunked:  # chunking removed since the column was cached
        raise UnknownColumn(f"{target.table}.{target.column} is no longer chunked.") from None
    hits = [Hit(row=hit.row, distance=hit.distance, chunk_no=hit.chunk_no, span=hit.span) for hit in found]
    reason = "documents by their chunks"
    return hits, Plan(path, None, float("nan"), None, None, None, None, reason, 1.0 if path == "exact" else None)


def explain(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    query: str | Sequence[float] | Any,
    *,
    k: int = 10,
    where: Where = None,
    model: str | None = None,
    tuning: Tuning = DEFAULT_TUNING,
    recall: float = DEFAULT_RECALL,
) -> tuple[Plan, str]:
    """The plan a search takes and PostgreSQL's EXPLAIN ANALYZE of the statement it runs, as it runs it."""
    check_sync(conn)
    check_k(k)
    check_recall(recall)
    target, params = target_and_params(conn, table, column, query, model)
    params["k"] = k
    condition = filter_sql(where)
    exact, hnsw, reranked = (search_statement(target, condition, None, path).as_bytes(conn) for path in PATHS)
    with model_change_as_input_error(), clear_errors(), conn.cursor() as cur:
        chosen = run_plan(conn, plan_params(conn, target, k, condition, tuning, recall), apply=False)
        chosen = with_candidates(conn, chosen, target, k)
        chosen = checked_plan(conn, chosen, walk_statement(chosen, hnsw, reranked, params), params)
        analyze = b"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) "
        if chosen.path == "hnsw":
            lines = under_hnsw_settings(
                conn, cur, chosen, analyze + walk_statement(chosen, hnsw, reranked, params), params
            )
        else:
            lines = cur.execute(analyze + exact, params, prepare=False).fetchall()
    return chosen, "\n".join(QUERY_LITERAL.sub("<query vector>", str(line)) for (line,) in lines)


def check_sync(conn: Any) -> None:
    """A clear error for an async connection: searching from Python runs on a psycopg.Connection."""
    if isinstance(conn, psycopg.AsyncConnection):
        raise InvalidInput(
            "pgsim.search takes a psycopg.Connection, not an AsyncConnection. On an async connection, search in "
            "SQL: await pgsim.register_async(conn), then SELECT ... FROM pgsim.knn(table, column, %s, k, filter) "
            "with pgsim.Text(query) as the parameter (see docs/search.md)."
        )


def _index_key(target: VectorColumn) -> str:
    """The key and operator class of the index the column's storage searches (bit, prefix, or the vector's)."""
    column = target.column
    registration = target.registration
    if target.prefix is not None:
        return f"(subvector({column}, 1, {target.prefix})::vector({target.prefix})) vector_cosine_ops"
    if registration is not None and registration.dtype == "bit":
        return f"(binary_quantize({column})::bit({target.dimension})) bit_hamming_ops"
    return f"{column} {target.type_name}_cosine_ops"


class NoIndexWarning(UserWarning):
    """A search ran as an exact scan because its column has no usable HNSW index."""
