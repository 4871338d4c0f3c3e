"""Filtered k-NN for ORM queries: exactly k rows when k rows pass the filter.

A ``select(...).where(...).order_by(Doc.embedding.nearest(q)).limit(k)`` runs as the user wrote it, except
that a ``do_orm_execute`` hook asks ``pgsim.knn_plan`` (sql/0002) which path the filter needs:
- exact: the same statement ordered by ``distance + 0``, which no index serves, so the filter runs first;
- hnsw: the statement under pgvector's iterative scan (strict order) with ``ef_search`` and
  ``max_scan_tuples`` sized for the filter, set with ``set_config`` just before it and set back just after
  it (in a ``finally``), so no other statement of the session sees them; in a transaction they are local
  to it besides. If the hnsw path still returns fewer than k rows, the exact statement runs.
A statement that reads other tables (joins, aliases, joined inheritance, subqueries), a filter that does
not compile to literal SQL, and a database without pgsim's schema (a warning says so) take the exact
path; the plan runs in a savepoint, so its failure never aborts the caller's transaction. The thresholds
are pgsim.search's; ``.execution_options(pgsim_tuning=Tuning(...))`` changes them per query.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import nullcontext
from typing import Any

from sqlalchemy import Float, Select, Table, literal, text
from sqlalchemy.exc import CompileError, DBAPIError
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.sql.util import find_tables

from pgsim.errors import InvalidInput
from pgsim.search import DEFAULT_TUNING, Tuning
from pgsim.sqlalchemy.types import NEAREST

log = logging.getLogger(__name__)

PLAN = text(
    "SELECT path, ef_search, max_scan_tuples FROM pgsim.knn_plan(CAST(:table AS regclass), :column, :k, :filter, "
    ":exact_below_rows, :hnsw_ef_search, :min_hnsw_selectivity)"
)
# pgvector's defaults, for a session where its settings were never read (the library not yet loaded)
DEFAULTS = {"iterative_scan": "off", "ef_search": "40", "max_scan_tuples": "20000"}
SWAP = text(
    "SELECT current_setting('hnsw.iterative_scan', true), current_setting('hnsw.ef_search', true), "
    "current_setting('hnsw.max_scan_tuples', true), set_config('hnsw.iterative_scan', 'strict_order', :local), "
    "set_config('hnsw.ef_search', :ef_search, :local), set_config('hnsw.max_scan_tuples', :max_scan_tuples, :local)"
)
RESTORE = text(
    "SELECT set_config('hnsw.iterative_scan', :iterative_scan, :local), "
    "set_config('hnsw.ef_search', :ef_search, :local), set_config('hnsw.max_scan_tuples', :max_scan_tuples, :local)"
)


def filtered_knn(state: ORMExecuteState) -> Any:
    """``do_orm_execute`` hook: None (run as written) unless the statement orders by ``.nearest()`` with a
    LIMIT; then the rows of the path ``pgsim.knn_plan`` picks."""
    if not state.is_select or state.is_column_load or state.is_relationship_load:
        return None
    statement = state.statement
    if not isinstance(statement, Select):
        return None
    order = list(statement._order_by_clauses)
    nearest = next((term for term in order if NEAREST in getattr(term, "_annotations", {})), None)
    if nearest is None:
        return None
    try:
        limit = statement._limit
    except CompileError:  # a LIMIT given as a parameter: nothing to plan for, run as written
        return None
    if not isinstance(limit, int):
        return None
    # no index can order by distance + 0: the filter runs first, then the distances of the rows that pass
    exact = statement.order_by(None).order_by(
        *[term + literal(0, Float) if term is nearest else term for term in order]
    )
    column = nearest._annotations[NEAREST]
    connection = state.session.connection(bind_arguments=state.bind_arguments)
    tuning = state.execution_options.get("pgsim_tuning", DEFAULT_TUNING)
    try:
        offset = statement._offset
    except CompileError:
        return state.invoke_statement(statement=exact)  # an OFFSET given as a parameter: plan nothing
    if offset is not None and not isinstance(offset, int):
        return state.invoke_statement(statement=exact)  # an OFFSET given as a parameter: plan nothing
    chosen = _plan(connection, column, limit + (offset or 0), statement, tuning)  # the scan must reach them all
    log.info("k-NN on %s: %s path", column, chosen[0] if chosen else "exact (filter not plannable)")
    if chosen is None or chosen[0] == "exact":
        return state.invoke_statement(statement=exact)
    _, ef_search, max_scan_tuples = chosen
    local = local_transaction(connection)  # else set, and set back, for the session
    swap = {"ef_search": str(ef_search), "max_scan_tuples": str(max_scan_tuples), "local": local}
    saved = connection.execute(SWAP, swap).one()
    restore = {key: value or DEFAULTS[key] for key, value in zip(DEFAULTS, saved[:3], strict=True)}
    try:
        frozen = state.invoke_statement().freeze()
    finally:
        # after an error (or a cancel) the transaction's rollback takes local settings with it, and a
        # connection still busy with the query takes no more statements
        if _idle(connection):
            connection.execute(RESTORE, {**restore, "local": local})
    if len(frozen.data) < limit:
        log.info("hnsw path gave %d of %d rows; exact scan instead", len(frozen.data), limit)
        return state.invoke_statement(statement=exact)
    return frozen()


def _idle(connection: Any) -> bool:
    """Whether the connection can take a statement: idle, in a transaction that has not failed."""
    from psycopg.pq import TransactionStatus

    info = getattr(connection.connection.driver_connection, "info", None)
    if info is None:
        return True
    return info.transaction_status in (TransactionStatus.IDLE, TransactionStatus.INTRANS)


def _tables(element: Any) -> set[Any]:
    """The tables (and aliases) ``element`` reads, without the ORM's annotations."""
    found = find_tables(element, check_columns=True, include_aliases=True, include_joins=False)
    return {table._deannotate() for table in found}


def _plan(connection: Any, column: Any, k: int, statement: Select[Any], tuning: Tuning) -> tuple[str, int, int] | None:
    """(path, ef_search, max_scan_tuples) from pgsim.knn_plan, or None when the filter cannot be planned."""
    table = getattr(column, "table", None)
    table = table._deannotate() if table is not None else None
    # knn_plan estimates the filter on the column's table alone: joins, aliases, inheritance and subqueries
    # that read other tables are not plannable
    if not isinstance(table, Table) or _tables(statement) != {table}:
        return None
    where = statement.whereclause
    try:
        condition = (
            None
            if where is None
            else str(where.compile(dialect=connection.dialect, compile_kwargs={"literal_binds": True}))
        )
    except (CompileError, ValueError, TypeError, InvalidInput):  # e.g. a bound query text, a custom type
        return None
    parameters = {
        "table": connection.dialect.identifier_preparer.format_table(table),  # quoted as the statement has it
        "column": column.name,
        "k": k,
        "filter": condition,
        "exact_below_rows": tuning.exact_below_rows,
        "hnsw_ef_search": tuning.hnsw_ef_search,
        "min_hnsw_selectivity": tuning.min_hnsw_selectivity,
    }
    try:
        with nullcontext() if not local_transaction(connection) else connection.begin_nested():
            row = connection.execute(PLAN, parameters).one()
    except DBAPIError as exc:  # e.g. pgsim's schema missing (tables made by Alembic or an async engine)
        warnings.warn(
            f"pgsim.knn_plan failed ({type(exc.orig).__name__}), so k-NN queries on {table.name} scan exactly: "
            "run `pgsim install` (or create_all on a psycopg engine) for index-served filtered search.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return str(row[0]), row[1], row[2]


def local_transaction(connection: Any) -> bool:
    """Whether statements on ``connection`` run in a transaction (not autocommit)."""
    return not getattr(connection.connection.driver_connection, "autocommit", False)
