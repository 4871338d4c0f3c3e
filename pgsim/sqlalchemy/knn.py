"""Filtered k-NN for ORM queries: exactly k rows when k rows pass the filter.

A ``select(...).where(...).order_by(Doc.embedding.nearest(q)).limit(k)`` runs as the user wrote it, except
that a ``do_orm_execute`` hook asks ``pgsim.knn_plan`` which path the filter needs:
- exact: the same statement ordered by ``distance + 0``, which no index serves, so the filter runs first;
- hnsw: the statement under pgvector's iterative scan (strict order) with ``ef_search`` and
  ``max_scan_tuples`` sized for the filter, set with ``set_config`` just before it and set back just after
  it, so no other statement of the session sees them; in a transaction they are local to it besides.
  If the hnsw path still returns fewer than k rows (ORM objects counted once, however many rows a joined
  eager load gave them), or ran with more conditions than were planned (a ``do_orm_execute`` hook after
  pgsim's added some), the exact statement runs.
The filter planned is the WHERE clause the ORM compiles: with the criteria it adds itself (single-table
inheritance, ``with_loader_criteria``). A LIMIT given as a bound parameter is planned with its value;
FETCH, or a LIMIT/OFFSET that is an expression, takes the exact path. A statement that reads other
tables (joins, aliases, joined inheritance, subqueries), a filter that does not compile to literal SQL,
and a database without pgsim's schema (a warning says so) take the exact path too; the plan runs in a
savepoint, so its failure never aborts the caller's transaction. The thresholds are pgsim.search's;
``.execution_options(pgsim_tuning=Tuning(...))`` changes them per query. Only ORM execution (a Session)
runs this hook: Core's ``Connection.execute`` runs the statement as written.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from pgvector.sqlalchemy import VECTOR
from sqlalchemy import (
    Float,
    Select,
    Table,
    and_,
    cast,
    func,
    inspect,
    literal,
    literal_column,
    select,
    text,
    true,
    tuple_,
)
from sqlalchemy.dialects.postgresql import BIT
from sqlalchemy.exc import CompileError, DBAPIError
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.orm.util import LoaderCriteriaOption
from sqlalchemy.sql.elements import BindParameter, ColumnElement
from sqlalchemy.sql.util import find_tables

from pgsim.errors import InvalidInput
from pgsim.knn.planner import DEFAULT_TUNING, Tuning
from pgsim.sqlalchemy.documents import chunk_table_of, local_transaction, nearest_documents
from pgsim.sqlalchemy.types import NEAREST

log = logging.getLogger(__name__)

PLAN = text(
    "SELECT p.path, p.ef_search, p.max_scan_tuples, "
    "p.index_name = pgsim.reranked_index(CAST(:table AS regclass), :column), "
    "pgsim.index_prefix(CAST(:table AS regclass), :column) "
    "FROM pgsim.knn_plan(CAST(:table AS regclass), :column, :k, :filter, :exact_below_rows, :hnsw_ef_search, "
    ":min_hnsw_selectivity) AS p"
)
# pgvector's defaults, for a session where its settings were never read (the library not yet loaded)
DEFAULTS = {"iterative_scan": "off", "ef_search": "40", "max_scan_tuples": "20000", "sort": "on"}
# a bit or prefix walk runs with sorting off: a sort by Hamming or prefix distance in place of the index walk
# would re-rank approximate candidates (a sort by cosine distance, on other indexes, is exact)
SWAP = text(
    "SELECT current_setting('hnsw.iterative_scan', true), current_setting('hnsw.ef_search', true), "
    "current_setting('hnsw.max_scan_tuples', true), current_setting('enable_sort'), "
    "set_config('hnsw.iterative_scan', 'strict_order', :local), set_config('hnsw.ef_search', :ef_search, :local), "
    "set_config('hnsw.max_scan_tuples', :max_scan_tuples, :local), "
    "set_config('enable_sort', CASE WHEN :reranked THEN 'off' ELSE current_setting('enable_sort') END, :local)"
)
RESTORE = text(
    "SELECT set_config('hnsw.iterative_scan', :iterative_scan, :local), "
    "set_config('hnsw.ef_search', :ef_search, :local), set_config('hnsw.max_scan_tuples', :max_scan_tuples, :local), "
    "set_config('enable_sort', :sort, :local)"
)


def filtered_knn(state: ORMExecuteState) -> Any:
    """``do_orm_execute`` hook: None (run as written) unless the statement orders by ``.nearest()`` with a
    LIMIT; then the rows of the path ``pgsim.knn_plan`` picks. On a chunked column, documents, LIMIT or not."""
    if not state.is_select or state.is_column_load or state.is_relationship_load:
        return None
    statement = state.statement
    if not isinstance(statement, Select):
        return None
    order = list(statement._order_by_clauses)
    nearest = next((term for term in order if NEAREST in getattr(term, "_annotations", {})), None)
    if nearest is None:
        return None
    column = nearest._annotations[NEAREST]
    connection = state.session.connection(bind_arguments=state.bind_arguments)
    chunks = chunk_table_of(connection, column)
    if chunks is not None:  # documents by their chunks, with a LIMIT or without
        return _documents(state, connection, statement, nearest, column, chunks)
    if statement._limit_clause is None and statement._fetch_clause is None:
        return None  # no k to keep
    # no index can order by distance + 0: the filter runs first, then the distances of the rows that pass;
    # a row not embedded yet has no distance (and no place in the HNSW index): the scan leaves it out too
    exact = (
        statement.order_by(None)
        .order_by(*[term + literal(0, Float) if term is nearest else term for term in order])
        .where(column.is_not(None))
    )
    if statement._fetch_clause is not None:  # FETCH FIRST (maybe PERCENT or WITH TIES): no k to plan for
        return state.invoke_statement(statement=exact)
    parameters = state.parameters if isinstance(state.parameters, Mapping) else {}
    limit = _bound_int(statement._limit_clause, parameters)
    offset = 0 if statement._offset_clause is None else _bound_int(statement._offset_clause, parameters)
    if limit is None or offset is None:  # not a number known here (an expression, say): plan nothing
        return state.invoke_statement(statement=exact)
    if limit <= 0:
        return None  # LIMIT 0 returns no row on any path (a negative one is the server's error to give)
    tuning = state.execution_options.get("pgsim_tuning", DEFAULT_TUNING)
    plan = _plan(connection, column, limit + max(offset, 0), statement, tuning)  # the scan must reach them all
    log.info("k-NN on %s: %s path", column, plan.path if plan else "exact (filter not plannable)")
    if plan is None or plan.path == "exact":
        return state.invoke_statement(statement=exact)
    local = local_transaction(connection)  # else set, and set back, for the session
    swap = {"ef_search": str(plan.ef_search), "max_scan_tuples": str(plan.max_scan_tuples), "local": local,
            "reranked": plan.candidates is not None}  # fmt: skip
    saved = connection.execute(SWAP, swap).one()
    restore = {key: value or DEFAULTS[key] for key, value in zip(DEFAULTS, saved[:4], strict=True)}
    walked = statement if plan.candidates is None else _with_candidates(statement, column, nearest, plan)
    try:
        result = state.invoke_statement(statement=walked)
        criteria = _executed_criteria(result)
        frozen = result.freeze()
    except BaseException as exc:
        # after an error the transaction's rollback takes local settings with it; a lost connection, or a
        # cancel (KeyboardInterrupt, asyncio's CancelledError) that may leave it busy, takes no statement:
        # the caller sees the original exception in every case
        if isinstance(exc, Exception):
            _restore(connection, restore, local, quiet=True)
        raise
    _restore(connection, restore, local, quiet=False)
    if criteria is not None and criteria != plan.criteria + (plan.candidates is not None):
        # a do_orm_execute hook that ran after pgsim's added conditions knn_plan did not see
        log.info("the statement run had %d conditions, %d were planned; exact scan instead", criteria, plan.criteria)
        return state.invoke_statement(statement=exact)
    found = _count(frozen)
    if found < limit:
        log.info("hnsw path gave %d of %d rows; exact scan instead", found, limit)
        return state.invoke_statement(statement=exact)
    return frozen()


def _documents(
    state: ORMExecuteState, connection: Any, statement: Select[Any], nearest: Any, column: Any, chunks: Any
) -> Any:
    """A chunked column's statement: its k (LIMIT + OFFSET, if known) and its filter, for pgsim.sqlalchemy.documents."""
    parameters = state.parameters if isinstance(state.parameters, Mapping) else {}
    limit = None if statement._limit_clause is None else _bound_int(statement._limit_clause, parameters)
    offset = 0 if statement._offset_clause is None else _bound_int(statement._offset_clause, parameters)
    if offset is None or statement._fetch_clause is not None:
        limit = None  # no k known here
    if limit is not None and limit <= 0:
        return None  # LIMIT 0 returns no row on any path
    planned = _filter(connection, column, statement)
    condition = planned[0] if planned is not None else None
    return nearest_documents(state, connection, nearest, chunks, limit, max(offset or 0, 0), condition, bool(planned))


@dataclass(frozen=True)
class _Plan:
    path: str
    ef_search: int
    max_scan_tuples: int
    criteria: int  # how many WHERE conditions the compiled statement had (the ORM's own included)
    candidates: int | None = None  # on a bit or prefix index (bit or prefix storage): the walk's, re-ranked
    prefix: int | None = None  # prefix storage: the length of the vectors' prefix the index holds


def _with_candidates(statement: Select[Any], column: Any, nearest: Any, plan: _Plan) -> Select[Any]:
    """Bit or prefix storage: ``statement`` kept to the ``plan.candidates`` rows that pass its filter nearest
    by the compressed index's distance (Hamming over ``binary_quantize(column)::bit(n)``, or cosine over
    ``subvector(column, 1, prefix)::vector(prefix)``), which its own ORDER BY then re-ranks by cosine
    distance on the full vectors (pgsim.knn does the same)."""
    table = column.table._deannotate()
    dimension, prefix = column.type.dim, plan.prefix
    query = cast(nearest.right, VECTOR(dimension))
    walkable: ColumnElement[bool] = true()
    if prefix is None:

        def bits(value: Any) -> Any:
            return cast(func.binary_quantize(value), BIT(dimension))

        distance = bits(column).op("<~>", return_type=Float)(bits(query))
    else:

        def head(value: Any) -> Any:  # constants, as the index's expression has them (prefix is an int)
            return cast(func.subvector(value, literal_column("1"), literal_column(str(int(prefix)))), VECTOR(prefix))

        distance = head(column).op("<=>", return_type=Float)(head(query))
        # a query whose prefix is all zero has no prefix distance: the walk yields nothing, the exact scan follows
        walkable = func.vector_norm(head(query)) > 0
    keys = list(table.primary_key.columns)
    walk = (
        select(*keys)
        .where(*statement._where_criteria)
        .where(column.is_not(None), walkable)
        .order_by(distance)
        .limit(plan.candidates)
        .correlate(None)  # its own scan of the table, not the outer statement's row
    )
    return statement.where((keys[0] if len(keys) == 1 else tuple_(*keys)).in_(walk))


def _bound_int(clause: Any, parameters: Mapping[str, Any]) -> int | None:
    """The integer a LIMIT/OFFSET clause stands for: a literal, or a bound parameter given a value in
    ``parameters``; None when it is not known before the statement runs."""
    if not isinstance(clause, BindParameter):
        return None
    if clause.key in parameters:
        value = parameters[clause.key]
    elif clause.callable is not None:
        value = clause.callable()
    else:
        value = clause.value
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _count(frozen: Any) -> int:
    """Rows of a frozen result, counting an ORM object once however many rows it took (a joined eager
    load of a collection repeats it)."""
    rows = [(row,) for row in frozen.data] if frozen._source_supports_scalars else [tuple(row) for row in frozen.data]
    if not any(hasattr(value, "_sa_instance_state") for row in rows[:1] for value in row):
        return len(rows)
    return len({tuple(id(value) for value in row if hasattr(value, "_sa_instance_state")) for row in rows})


def _restore(connection: Any, restore: dict[str, str], local: bool, *, quiet: bool) -> None:
    """Set pgvector's settings back, if the connection can take a statement. ``quiet``: an exception is
    on its way already, so a failure here is logged, not raised."""
    try:
        if not connection.invalidated and _idle(connection):
            connection.execute(RESTORE, {**restore, "local": local})
    except Exception:
        if not quiet:
            raise
        log.debug("could not set pgvector's settings back after a failed k-NN query", exc_info=True)


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


def where_criteria(statement: Select[Any], dialect: Any) -> tuple[Any, ...] | None:
    """The WHERE conditions of ``statement`` as the ORM compiles it: the user's, with the criteria the ORM
    adds itself (single-table inheritance, ``with_loader_criteria``). None if they cannot be read."""
    try:
        compile_state = statement.compile(dialect=dialect).compile_state
        criteria = getattr(compile_state, "_where_criteria", None)
    except Exception:  # e.g. an ORM construct this version compiles differently
        log.debug("could not compile %s to read its WHERE criteria", statement, exc_info=True)
        return None
    return tuple(criteria) if criteria is not None else None


def _executed_criteria(result: Any) -> int | None:
    """How many WHERE conditions the statement ``result`` comes from had, or None if that is unknown."""
    compiled = getattr(getattr(getattr(result, "raw", None), "context", None), "compiled", None)
    criteria = getattr(getattr(compiled, "compile_state", None), "_where_criteria", None)
    return len(criteria) if criteria is not None else None


def _orm_adds_criteria(statement: Select[Any]) -> bool:
    """Whether the ORM may add WHERE criteria of its own: loader criteria, a single-table-inheritance entity."""
    if any(isinstance(option, LoaderCriteriaOption) for option in statement._with_options):
        return True
    for description in statement.column_descriptions:
        entity = description.get("entity")
        mapper = getattr(inspect(entity, raiseerr=False), "mapper", None) if entity is not None else None
        if mapper is not None and mapper._single_table_criterion is not None:
            return True
    return False


def _literal_sql(condition: Any, dialect: Any) -> str:
    """``condition`` as literal SQL, as the server sees it: with a paramstyle that does not double ``%``."""
    literal_dialect = _LITERAL_DIALECTS.get(type(dialect))
    if literal_dialect is None:
        literal_dialect = _LITERAL_DIALECTS[type(dialect)] = type(dialect)(paramstyle="named")
    return str(condition.compile(dialect=literal_dialect, compile_kwargs={"literal_binds": True}))


_LITERAL_DIALECTS: dict[type, Any] = {}


def _plan(connection: Any, column: Any, k: int, statement: Select[Any], tuning: Tuning) -> _Plan | None:
    """The path pgsim.knn_plan picks (with its settings), or None when the filter cannot be planned."""
    planned = _filter(connection, column, statement)
    if planned is None:
        return None
    condition, criteria = planned
    table = column.table._deannotate()
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
    except DBAPIError as exc:
        if _missing_knn_plan(exc.orig):  # pgsim's schema missing (tables made by Alembic or an async engine)
            warnings.warn(
                f"pgsim.knn_plan failed ({type(exc.orig).__name__}), so k-NN queries on {table.name} scan exactly: "
                "run `pgsim install` (or create_all on a psycopg engine) for index-served filtered search.",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            reason = (str(exc.orig).strip() or type(exc.orig).__name__).splitlines()[0]
            log.warning("pgsim.knn_plan could not plan the filter %r (%s): this query scans exactly", condition, reason)
        return None
    candidates = max(k, row[1]) if row[0] == "hnsw" and row[3] else None
    return _Plan(str(row[0]), row[1], row[2], criteria, candidates, row[4] if candidates is not None else None)


def _filter(connection: Any, column: Any, statement: Select[Any]) -> tuple[str | None, int] | None:
    """The statement's filter as literal SQL over the column's table (None: no filter) and how many conditions
    it has, or None when it cannot be planned: pgsim estimates a filter on the column's table alone, so joins,
    aliases, inheritance and subqueries that read other tables are not plannable, nor are conditions that do
    not compile to literal SQL."""
    table = getattr(column, "table", None)
    table = table._deannotate() if table is not None else None
    if not isinstance(table, Table) or _tables(statement) != {table}:
        return None
    criteria = where_criteria(statement, connection.dialect)
    if criteria is None:
        if _orm_adds_criteria(statement):
            return None  # conditions the plan would not see
        criteria = tuple(statement._where_criteria)
    try:
        condition = _literal_sql(and_(*criteria), connection.dialect) if criteria else None
    except (CompileError, ValueError, TypeError, InvalidInput):  # e.g. a bound query text, a custom type
        return None
    return condition, len(criteria)


def _missing_knn_plan(error: Any) -> bool:
    """Whether ``error`` says pgsim.knn_plan itself (or the schema it lives in) is missing or out of date,
    not that something failed inside it (a filter, say)."""
    from psycopg import errors

    if not isinstance(error, (errors.UndefinedFunction, errors.UndefinedTable, errors.InvalidSchemaName)):
        return False
    diag = getattr(error, "diag", None)
    if getattr(diag, "context", None):  # raised while knn_plan ran: its EXECUTE of the filter, say
        return False
    return "pgsim" in (getattr(diag, "message_primary", None) or str(error))
