"""Filtered k-nearest-neighbour search that returns k rows when k rows match.

1. ``pgsim.knn_plan`` (sql/0002) estimates how many rows pass the filter and picks a path: ``exact``
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
import re
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgsim.columns.registry import Registration, get_registration
from pgsim.db.names import table_identifier
from pgsim.encoding.encoder import DEFAULT_MODEL, check_vector
from pgsim.errors import InvalidInput
from pgsim.psycopg import Text, encoder_for

log = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")

MAX_K = 10_000
DISTANCE = "_pgsim_distance"
QUERY_LITERAL = re.compile(r"'\[[^\]]*\]'::(?:vector|halfvec)")


@dataclass(frozen=True)
class Between:
    """A range filter value: ``low <= column < high``; either end may be left open."""

    low: Any = None
    high: Any = None


@dataclass(frozen=True)
class Hit:
    row: dict[str, Any]
    distance: float


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
    fell_back: bool = False


@dataclass(frozen=True)
class Tuning:
    """The planner's thresholds (defaults measured by bench/filtered.py; see README)."""

    exact_below_rows: float = 1000  # fewer estimated matching rows: exact scan
    hnsw_ef_search: int = 200  # recall@10 0.994 unfiltered on 63k Debian descriptions (bench/filtered.py)
    min_hnsw_selectivity: float = 0.5  # below: exact scan, unless a partial index makes the filter ~1


DEFAULT_TUNING = Tuning()
Where = Mapping[str, Any] | sql.Composable | None


@dataclass(frozen=True)
class VectorColumn:
    table: str
    column: str
    type_name: str  # vector or halfvec
    dimension: int
    other_columns: tuple[str, ...]
    registration: Registration | None = None  # set when pgsim keeps this column in sync (pgsim.add_embedding)


class _ModelChanged(Exception):
    """The registry names another model for the column than the one the query was encoded with."""


class _TtlCache(Generic[K, V]):
    """A small map whose entries expire: a plan follows the table's statistics, which change slowly."""

    def __init__(self, seconds: float, size: int = 1024) -> None:
        self.seconds = seconds
        self.size = size
        self.entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None or time.monotonic() - entry[0] > self.seconds:
                self.entries.pop(key, None)
                return None
            return entry[1]

    def put(self, key: K, value: V) -> V:
        with self.lock:
            self.entries[key] = (time.monotonic(), value)
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


# Plans are reused for PLAN_SECONDS per (database, table, column, k, filter, tuning): the planner's estimate
# for a given filter changes only with the statistics, and a stale plan costs speed, never rows (the hnsw
# path falls back to an exact scan when short). Column shapes are reused as long.
PLAN_SECONDS = 30.0
_plans: _TtlCache[tuple[Any, ...], Plan] = _TtlCache(PLAN_SECONDS)
_columns: _TtlCache[tuple[Any, ...], VectorColumn] = _TtlCache(PLAN_SECONDS)
_statements: _TtlCache[tuple[Any, ...], tuple[bytes, ...]] = _TtlCache(PLAN_SECONDS)


def forget_plans() -> None:
    """Drop cached plans and column shapes (after ANALYZE, a new index, or ALTER TABLE)."""
    _plans.clear()
    _columns.clear()
    _statements.clear()


def _database_key(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    return (conn.info.host, conn.info.port, conn.info.dbname, conn.info.user)


def _settings_statement(chosen: Plan) -> sql.Composed:
    """The settings pgsim.prepare_knn applies on the hnsw path."""
    return sql.SQL(
        "SELECT set_config('enable_indexscan', 'on', true), set_config('hnsw.iterative_scan', 'relaxed_order', true), "
        "set_config('hnsw.ef_search', {}, true), set_config('hnsw.max_scan_tuples', {}, true)"
    ).format(sql.Literal(str(chosen.ef_search)), sql.Literal(str(chosen.max_scan_tuples)))


def vector_column(conn: psycopg.Connection[Any], table: str, column: str) -> VectorColumn:
    """The vector column's dimension and the table's other columns, with a clear error when missing."""
    key = (_database_key(conn), table, column)
    known = _columns.get(key)
    if known is None:
        known = _columns.put(key, read_vector_column(conn, table, column))
    return known


def read_vector_column(conn: psycopg.Connection[Any], table: str, column: str) -> VectorColumn:
    ident = table_identifier(table).as_string(conn)
    rows = conn.execute(
        """
        SELECT a.attname, a.atttypmod, format_type(a.atttypid, NULL)
        FROM pg_attribute a
        WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        [ident],
    ).fetchall()
    if not rows:
        raise InvalidInput(f"Table {table!r} does not exist (or is not on the search_path).")
    found = {name: (typmod, type_name) for name, typmod, type_name in rows}
    if column not in found:
        raise InvalidInput(f"Table {table!r} has no column {column!r}; its columns are {', '.join(found)}.")
    typmod, type_name = found[column]
    if type_name not in ("vector", "halfvec"):
        raise InvalidInput(f"Column {table}.{column} is {type_name}, not a pgvector vector column.")
    if typmod < 1:
        raise InvalidInput(f"Column {table}.{column} has no declared dimension; declare it as vector(n).")
    return VectorColumn(
        table,
        column,
        type_name,
        int(typmod),
        tuple(name for name in found if name != column),
        get_registration(conn, table, column),
    )


def filter_sql(where: Where) -> sql.Composable:
    """A WHERE condition with its values as literals (psycopg quotes them); identifiers always quoted."""
    if where is None:
        return sql.SQL("TRUE")
    if isinstance(where, sql.Composable):
        return where
    clauses: list[sql.Composable] = []
    for name, value in where.items():
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


def plan(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    *,
    k: int = 10,
    where: Where = None,
    tuning: Tuning = DEFAULT_TUNING,
) -> Plan:
    """What ``pgsim.knn_plan`` decides for such a search, without running it. (A search also checks that
    PostgreSQL would scan the planned index; :func:`explain` shows the plan after that check.)"""
    _check_k(k)
    target = vector_column(conn, table, column)
    with _clear_errors(), conn.transaction() as tx:
        chosen = _run_plan(conn, _prepare_params(conn, target, k, filter_sql(where), tuning), apply=False)
        raise psycopg.Rollback(tx)
    return chosen


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
) -> list[Hit]:
    """The k rows of ``table`` nearest to ``query`` that pass ``where``, nearest first. ``query`` is a vector,
    or text encoded with the column's registered model (``model`` may name it; another model is an error),
    else with ``model`` or all-MiniLM-L6-v2. ``where`` is a ``psycopg.sql.Composable`` condition, or a dict:
    {column: value} for equality, {column: [values]} for IN, {column: Between(low, high)} for a range."""
    return search_with_plan(conn, table, column, query, k=k, where=where, columns=columns, model=model, tuning=tuning)[
        0
    ]


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
) -> tuple[list[Hit], Plan]:
    """:func:`search`, and the plan it followed."""
    _check_k(k)
    try:
        return _search(conn, table, column, query, k, where, columns, model, tuning)
    except _ModelChanged as exc:  # a model change completed since this column's registration was cached
        forget_plans()
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            raise InvalidInput(f"{exc} Roll back the transaction and search again.") from None
        log.info("the model of %s.%s changed; searching again", table, column)
    try:
        return _search(conn, table, column, query, k, where, columns, model, tuning)
    except _ModelChanged as exc:
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
) -> tuple[list[Hit], Plan]:
    target, params = _target_and_params(conn, table, column, query, model)
    params["k"] = k
    condition = filter_sql(where)
    plan_params = _prepare_params(conn, target, k, condition, tuning)
    plan_key = (_database_key(conn), *plan_params)
    # database, table, column, filter, selected columns, guarded by the registry
    statement_key = (*plan_key[:3], plan_key[4], tuple(columns or ()), target.registration is not None)
    statements = _statements.get(statement_key)
    if statements is None:
        statements = _statements.put(
            statement_key, tuple(_statement(target, condition, columns, path).as_bytes(conn) for path in PATHS)
        )
    exact, hnsw = statements
    chosen = _plans.get(plan_key)
    with _clear_errors(), conn.cursor(row_factory=dict_row) as cur:
        if chosen is None:
            chosen = _plans.put(plan_key, _checked_plan(conn, _run_plan(conn, plan_params, apply=False), hnsw, params))
        rows = [] if chosen.path == "exact" else _under_hnsw_settings(conn, cur, chosen, hnsw, params)
        if chosen.path == "hnsw" and len(rows) < k:
            log.info("hnsw path gave %d of %d rows; exact scan instead", len(rows), k)
            chosen = replace(chosen, fell_back=True)
        if chosen.path == "exact" or chosen.fell_back:
            # no setting needed: the statement orders by an expression no index serves; one round trip
            rows = cur.execute(exact, params, prepare=False).fetchall()
    if chosen.index_name is None:
        warnings.warn(
            f"{table}.{column} has no HNSW index for cosine distance, so every search scans the table. Create one: "
            f"CREATE INDEX ON {table} USING hnsw ({column} {target.type_name}_cosine_ops)",
            NoIndexWarning,
            stacklevel=4,
        )
    return [Hit(row=row, distance=float(row.pop(DISTANCE))) for row in rows], chosen


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
) -> tuple[Plan, str]:
    """The plan a search takes and PostgreSQL's EXPLAIN ANALYZE of the statement it runs, as it runs it."""
    _check_k(k)
    target, params = _target_and_params(conn, table, column, query, model)
    params["k"] = k
    condition = filter_sql(where)
    exact, hnsw = (_statement(target, condition, None, path).as_bytes(conn) for path in PATHS)
    with _model_change_as_input_error(), _clear_errors(), conn.cursor() as cur:
        chosen = _run_plan(conn, _prepare_params(conn, target, k, condition, tuning), apply=False)
        chosen = _checked_plan(conn, chosen, hnsw, params)
        analyze = b"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) "
        if chosen.path == "hnsw":
            lines = _under_hnsw_settings(conn, cur, chosen, analyze + hnsw, params)
        else:
            lines = cur.execute(analyze + exact, params, prepare=False).fetchall()
    return chosen, "\n".join(QUERY_LITERAL.sub("<query vector>", str(line)) for (line,) in lines)


class NoIndexWarning(UserWarning):
    """A search ran as an exact scan because its column has no usable HNSW index."""


PATHS = ("exact", "hnsw")


def _statement(
    target: VectorColumn, condition: sql.Composable, columns: Sequence[str] | None, path: str, limit: str = "k"
) -> sql.Composed:
    """The search on one path. Exact: ordered by the distance plus zero, an expression no index can serve,
    so no setting is needed to keep the HNSW index out. HNSW: ordered by the indexed operator, and re-sorted
    afterwards, since an iterative scan yields rows in relaxed order."""
    query = sql.SQL("%(q)s::halfvec") if target.type_name == "halfvec" else sql.SQL("%(q)s")
    order = sql.SQL("({} <=> {}) + 0" if path == "exact" else "{} <=> {}").format(sql.Identifier(target.column), query)
    if path == "exact":  # a row not embedded yet has no distance: the HNSW index holds no such row, a scan skips it
        condition = sql.SQL("{} IS NOT NULL AND ({})").format(sql.Identifier(target.column), condition)
    nearest = sql.SQL(
        "SELECT {selected}, {col} <=> {q} AS {distance} FROM {table} WHERE {condition} ORDER BY {order} LIMIT {limit}"
    ).format(
        limit=sql.Placeholder(limit),
        selected=sql.SQL(", ").join(sql.Identifier(c) for c in (columns or target.other_columns)),
        col=sql.Identifier(target.column),
        q=query,
        distance=sql.Identifier(DISTANCE),
        table=table_identifier(target.table),
        condition=_guarded(target, condition),
        order=order,
    )
    if path == "exact":
        return nearest
    return sql.SQL("WITH relaxed AS MATERIALIZED ({}) SELECT * FROM relaxed ORDER BY {}").format(
        nearest, sql.Identifier(DISTANCE)
    )


def _guarded(target: VectorColumn, condition: sql.Composable) -> sql.Composable:
    """For a registered column, the filter behind a check that the query's model is the column's: a constant
    condition, which PostgreSQL evaluates once, before the scan."""
    if target.registration is None:
        return condition
    return sql.SQL(
        "pgsim.expect_model(%(g_schema)s, %(g_table)s, %(g_column)s, %(g_model)s, %(g_revision)s) AND ({})"
    ).format(condition)


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidInput(f"k must be a whole number from 1 to {MAX_K}; got {k!r}.")


def _under_hnsw_settings(
    conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any], chosen: Plan, statement: bytes, params: dict[str, Any]
) -> list[Any]:
    """``statement``'s rows under the hnsw path's settings, in a transaction that is rolled back (a savepoint
    inside the caller's), so the settings never outlive it."""
    with conn.transaction() as tx:
        conn.execute(_settings_statement(chosen))
        rows = cur.execute(statement, params, prepare=False).fetchall()
        raise psycopg.Rollback(tx)
    return rows


def _checked_plan(conn: psycopg.Connection[Any], chosen: Plan, hnsw: bytes, params: dict[str, Any]) -> Plan:
    """``chosen``, or the exact path if PostgreSQL would scan a different HNSW index than the one planned for.

    knn_plan's selectivity is relative to the index it expects (a partial one, say), but the planner picks
    the index when the search runs, and pgvector's costs move with ef_search: a higher ef_search can make
    it prefer the full index, where the same filter is narrow and the walk loses recall. So the search
    statement itself is explained once, under the hnsw settings, before the plan is cached."""
    if chosen.path != "hnsw" or chosen.index_name is None:
        return chosen
    with conn.cursor() as cur:
        ((explained,),) = _under_hnsw_settings(conn, cur, chosen, b"EXPLAIN (FORMAT JSON) " + hnsw, params)
    ordering = set(_ordering_indexes(explained))
    if not ordering or chosen.index_name.split(".")[-1].strip('"') in ordering:
        return chosen  # the planned index, or no index ordering at all (then the rows are exact anyway)
    return replace(
        chosen,
        path="exact",
        ef_search=None,
        max_scan_tuples=None,
        reason=f"planned for index {chosen.index_name}, but at these settings PostgreSQL would scan "
        f"{', '.join(sorted(ordering))} instead: an exact scan keeps the recall",
    )


def _ordering_indexes(node: Any) -> Iterator[str]:
    """Names of the indexes that produce an ORDER BY (HNSW scans) anywhere in an EXPLAIN (FORMAT JSON) tree."""
    if isinstance(node, list):
        for item in node:
            yield from _ordering_indexes(item)
    elif isinstance(node, dict):
        if "Order By" in node and "Index Name" in node:
            yield str(node["Index Name"])
        for value in node.values():
            if isinstance(value, (list, dict)):
                yield from _ordering_indexes(value)


def _target_and_params(
    conn: psycopg.Connection[Any], table: str, column: str, query: Any, model: str | None
) -> tuple[VectorColumn, dict[str, Any]]:
    """The column searched, and the statement's parameters: the query as a vector of the column's dimension
    (text is encoded with the column's registered model) and, for a registered column, what
    ``pgsim.expect_model`` checks in the statement itself."""
    target = vector_column(conn, table, column)
    registration = target.registration
    revision = None
    if isinstance(query, str):
        if registration is not None and model not in (None, registration.model):
            raise InvalidInput(
                f"{table}.{column} holds embeddings of model {registration.model!r}; a query encoded with "
                f"{model!r} cannot be compared with them. Leave out the model to use the column's."
            )
        model = registration.model if registration else (model or DEFAULT_MODEL)
        vector = Text(query).vector(model)
        if registration is not None:
            revision = encoder_for(model).revision
            if revision != registration.model_revision:
                raise InvalidInput(
                    f"Model {model!r} here (revision {revision}) is not the one {table}.{column} holds (revision "
                    f"{registration.model_revision}); install that model, or re-embed: pgsim change-model."
                )
    else:
        vector, model = check_vector(query, target.dimension), None
    if vector.shape[0] != target.dimension:
        raise InvalidInput(
            f"Model {model!r} gives {vector.shape[0]} dimensions; {table}.{column} holds {target.dimension}."
        )
    params: dict[str, Any] = {"q": vector}
    if registration is not None:
        params.update(
            g_schema=registration.schema,
            g_table=registration.table_name,
            g_column=registration.column,
            g_model=model,
            g_revision=revision,
        )
    return target, params


def _run_plan(conn: psycopg.Connection[Any], params: list[Any], *, apply: bool) -> Plan:
    """pgsim.prepare_knn (which also applies the settings) or pgsim.knn_plan (which only tells)."""
    function = sql.SQL("pgsim.prepare_knn" if apply else "pgsim.knn_plan")
    statement = sql.SQL("SELECT (p).* FROM (SELECT {}(%s::regclass, %s, %s, %s, %s, %s, %s) AS p) AS planned")
    row = conn.execute(statement.format(function), params).fetchone()
    assert row is not None
    return Plan(*row)


def _prepare_params(
    conn: psycopg.Connection[Any], target: VectorColumn, k: int, condition: sql.Composable, tuning: Tuning
) -> list[Any]:
    return [
        table_identifier(target.table).as_string(conn),
        target.column,
        k,
        condition.as_string(conn),
        tuning.exact_below_rows,
        tuning.hnsw_ef_search,
        tuning.min_hnsw_selectivity,
    ]


@contextmanager
def _model_change_as_input_error() -> Iterator[None]:
    try:
        yield
    except _ModelChanged as exc:
        forget_plans()
        raise InvalidInput(f"{exc} Run it again.") from None


@contextmanager
def _clear_errors() -> Iterator[None]:
    """The database's complaints about a search, as InvalidInput that says what to do."""
    try:
        yield
    except psycopg.errors.DataException as exc:
        if (exc.diag.message_primary or "").startswith("pgsim:"):
            raise _ModelChanged(exc.diag.message_primary) from None
        raise
    except (psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName):
        raise InvalidInput("Schema pgsim is missing or out of date here: run `pgsim install` first.") from None
    except (psycopg.errors.UndefinedColumn, psycopg.errors.SyntaxError) as exc:
        raise InvalidInput(
            f"The filter is not valid here: {exc.diag.message_primary}; check its column names."
        ) from None
