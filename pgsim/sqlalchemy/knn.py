"""Filtered k-NN for ORM queries: exactly k rows when k rows pass the filter.

A ``select(...).where(...).order_by(Doc.embedding.nearest(q)).limit(k)`` runs as the user wrote it, except
that a ``do_orm_execute`` hook asks ``pgsim.knn_plan`` (sql/0002) which path the filter needs:
- exact: the same statement ordered by ``distance + 0``, which no index serves, so the filter runs first;
- hnsw: the statement under pgvector's iterative scan (strict order) with ``ef_search`` and
  ``max_scan_tuples`` sized for the filter, set with ``set_config(..., is_local)`` just before it and set
  back just after it, so no other statement of the session sees them; if it still returns fewer than k
  rows, the exact statement runs.
A filter that reads other tables, or does not compile to literal SQL, takes the exact path. The
thresholds are pgsim.search's; ``.execution_options(pgsim_tuning=Tuning(...))`` changes them per query.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Float, Select, literal, text
from sqlalchemy.exc import CompileError
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.sql.util import find_tables

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
    "current_setting('hnsw.max_scan_tuples', true), set_config('hnsw.iterative_scan', 'strict_order', true), "
    "set_config('hnsw.ef_search', :ef_search, true), set_config('hnsw.max_scan_tuples', :max_scan_tuples, true)"
)
RESTORE = text(
    "SELECT set_config('hnsw.iterative_scan', :iterative_scan, true), set_config('hnsw.ef_search', :ef_search, true), "
    "set_config('hnsw.max_scan_tuples', :max_scan_tuples, true)"
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
    saved = connection.execute(SWAP, {"ef_search": str(ef_search), "max_scan_tuples": str(max_scan_tuples)}).one()
    restore = {key: value or DEFAULTS[key] for key, value in zip(DEFAULTS, saved[:3], strict=True)}
    try:
        frozen = state.invoke_statement().freeze()
    except Exception:
        if not _failed(connection):  # a failed transaction's rollback takes the settings with it
            connection.execute(RESTORE, restore)
        raise
    connection.execute(RESTORE, restore)
    if len(frozen.data) < limit:
        log.info("hnsw path gave %d of %d rows; exact scan instead", len(frozen.data), limit)
        return state.invoke_statement(statement=exact)
    return frozen()


def _failed(connection: Any) -> bool:
    import psycopg

    info = getattr(connection.connection.driver_connection, "info", None)
    return info is not None and info.transaction_status == psycopg.pq.TransactionStatus.INERROR


def _plan(connection: Any, column: Any, k: int, statement: Select[Any], tuning: Tuning) -> tuple[str, int, int] | None:
    """(path, ef_search, max_scan_tuples) from pgsim.knn_plan, or None when the filter cannot be planned."""
    table = getattr(column, "table", None)
    where = statement.whereclause
    if table is None or (where is not None and set(find_tables(where)) - {table}):
        return None
    try:
        condition = (
            None
            if where is None
            else str(where.compile(dialect=connection.dialect, compile_kwargs={"literal_binds": True}))
        )
    except CompileError:
        return None
    row = connection.execute(
        PLAN,
        {
            "table": connection.dialect.identifier_preparer.format_table(table),  # quoted as the statement has it
            "column": column.name,
            "k": k,
            "filter": condition,
            "exact_below_rows": tuning.exact_below_rows,
            "hnsw_ef_search": tuning.hnsw_ef_search,
            "min_hnsw_selectivity": tuning.min_hnsw_selectivity,
        },
    ).one()
    return str(row[0]), row[1], row[2]
