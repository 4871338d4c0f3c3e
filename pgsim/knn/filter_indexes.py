"""The btree or GIN index a filter column lacks, when the exact path must read the whole table to filter.

The exact path (``pgsim.knn_plan``'s choice for a selective filter) runs the filter first and computes
distances for the matching rows only: fast when an index finds those rows, a read of the whole table when
none does. :func:`missing_filter_indexes` asks PostgreSQL's planner how the exact-path statement would
find its rows (``EXPLAIN`` of the statement, never run) and, when that is a sequential scan of the table
with the filter applied row by row, names each filter column that no index leads with, and the
``CREATE INDEX`` that serves it: btree for scalar equality and ranges, GIN for arrays, ``jsonb`` and
``tsvector`` (containment and full text).

Without a filter, :func:`likely_filters` takes from the planner's statistics (``pg_stats``) the filters
searches plausibly use: equality on each column that repeats its values, containment on array columns;
:func:`missing_indexes_for_likely_filters` checks each.

What it leaves to the user: a filter that keeps a large share of the rows (above ``max_share``, where
PostgreSQL reads the whole table even with an index), tables of at most ``min_rows`` rows (a scan costs
next to nothing), patterns (``LIKE``, regular expressions) and ``jsonb`` paths (``data ->> 'k'``), which
need an operator class or an expression index a plain index does not give, and columns whose type has no
default btree or GIN operator class. Names are quoted (``psycopg.sql.Identifier``) wherever they go; the
filter, SQL text from the caller as for ``pgsim.knn``, is explained in one statement, never executed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgsim.db.catalog import pinned_path, resolve_table, table_columns, vector_schema
from pgsim.errors import InvalidInput
from pgsim.knn.planner import clear_errors
from pgsim.knn.statements import Condition, Where, filter_sql

MIN_ROWS = 1000  # a whole-table scan of fewer rows is cheap: nothing to advise
MAX_SHARE = 0.2  # a filter that keeps more of the rows is read by a scan of the table, index or not
SEQ_SCANS = {"Seq Scan", "Parallel Seq Scan"}
OPERATOR = re.compile(r"\s*([~!@#%^&|`?+\-*/<>=]+)")
CALL = re.compile(r'[\w"]\(\s*$')  # what a mention follows when it is a function's first argument
# what each kind of index serves; "" is a column with no operator after it (IS NULL, a boolean column). Not
# served: LIKE and regular expressions (~~, ~), jsonb paths (->>), <>: a plain index does not help them
SERVED = {
    "btree": {"=", "<", "<=", ">", ">=", ""},
    "gin": {"@>", "<@", "&&", "?", "?|", "?&", "@@", "@@@", "@?"},
}
SERVING_METHODS = {"btree": ("btree", "hash"), "gin": ("gin", "gist")}


@dataclass(frozen=True)
class IndexAdvice:
    """An index a filter column lacks: ``statement`` builds it (``CREATE INDEX CONCURRENTLY IF NOT EXISTS``)."""

    table: str  # schema.table
    column: str
    column_type: str
    method: str  # btree or gin
    index_name: str
    statement: sql.Composed
    estimated_rows: float  # passing the filter, of the table's rows with an embedding
    table_rows: float
    reason: str


@dataclass(frozen=True)
class _Column:
    name: str
    quoted: str  # as PostgreSQL prints it in a plan (quote_ident)
    type_name: str
    method: str | None  # the index that serves it: btree, gin, or None when neither has a default opclass
    indexed: bool  # a valid, non-partial index of that kind leads with it


def missing_filter_indexes(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    where: Where | str,
    *,
    min_rows: float = MIN_ROWS,
    max_share: float = MAX_SHARE,
) -> list[IndexAdvice]:
    """The indexes the filter ``where`` lacks on ``table`` for a search of vector column ``column`` that takes
    the exact path: empty when PostgreSQL finds the matching rows by an index already, or when an index would
    not help (see the module's docstring). ``where`` is a search's filter (a dict, or ``psycopg.sql``), or
    SQL text over the table's columns, as ``pgsim.knn`` takes it."""
    found = resolve_table(conn, table)
    declared = table_columns(conn, found.oid).get(column, "")
    if not declared.startswith(("vector(", "halfvec(")):
        raise InvalidInput(f"{table}.{column} is not a pgvector vector(n) or halfvec(n) column ({declared or 'none'}).")
    condition = filter_sql(sql.SQL(where) if isinstance(where, str) else where)  # noqa: S608 - never formatted
    vector = sql.Identifier(column)
    passing = sql.SQL("{} IS NOT NULL AND ({})").format(vector, condition.condition)
    with clear_errors(), conn.cursor() as cur:
        table_rows = estimated_rows(conn, found.identifier, sql.SQL("{} IS NOT NULL").format(vector))
        rows = estimated_rows(conn, found.identifier, passing)
        # the exact path's statement: the filter, then every matching row's distance (ordered by an
        # expression no index serves, as pgsim's exact statement is); a parameter keeps it one statement
        exact = sql.SQL(
            "EXPLAIN (FORMAT JSON, VERBOSE) SELECT {col} FROM {table} WHERE {passing} "
            "ORDER BY ({col} OPERATOR({vector_schema}.<=>) {col}) + 0 LIMIT %s"
        ).format(
            col=vector,
            table=found.identifier,
            passing=Condition(passing),
            vector_schema=sql.Identifier(vector_schema(conn)),
        )
        ((plan,),) = cur.execute(exact, [10], prepare=False).fetchall()
    if table_rows <= min_rows or rows > max_share * table_rows:
        return []
    filters = [node.get("Filter", "") for node in _nodes(_loaded(plan)) if _scans_whole(node, found.schema, found.name)]
    if not filters:
        return []  # an index finds the rows (or the filter needs no table scan at all)
    advice = []
    qualified = f"{found.schema}.{found.name}"
    for candidate in _columns(conn, found.oid, column):
        if candidate.indexed or candidate.method is None:
            continue
        operators = [op for text in filters for op in _operators_after(text, candidate.quoted)]
        if not operators:
            continue  # not in the filter
        if not any(op in SERVED[candidate.method] for op in operators):
            continue  # a pattern, a jsonb path, <>: not what this index serves
        name = index_name(found.name, candidate.name, candidate.method)
        statement = sql.SQL("CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} USING {} ({})").format(
            sql.Identifier(name), found.identifier, sql.SQL(candidate.method), sql.Identifier(candidate.name)
        )
        reason = (
            f"no {candidate.method} index on {candidate.name}: the exact path reads all {table_rows:.0f} rows "
            f"(Seq Scan with a Filter) to find the {rows:.0f} that pass"
        )
        advice.append(
            IndexAdvice(
                qualified, candidate.name, candidate.type_name, candidate.method, name, statement, rows, table_rows,
                reason,
            )
        )  # fmt: skip
    return advice


def index_name(table: str, column: str, method: str) -> str:
    """``items_section_btree``; names with other characters get a digest, so two never share a name."""
    readable = re.sub(r"[^a-z0-9]+", "_", f"{table}_{column}".lower()).strip("_")
    if readable != f"{table}_{column}":
        readable += "_" + hashlib.sha256(repr((table, column)).encode()).hexdigest()[:8]
    return f"{readable[-(63 - len(method) - 1) :].lstrip('_')}_{method}"


def estimated_rows(conn: psycopg.Connection[Any], table: sql.Identifier, condition: sql.Composable) -> float:
    """The planner's estimate of ``table``'s rows that pass ``condition`` (as pgsim.estimate_rows, without
    needing pgsim's schema; a parameter keeps the statement one statement)."""
    statement = sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {} WHERE {} LIMIT %s").format(table, Condition(condition))
    ((plan,),) = conn.execute(statement, [None], prepare=False).fetchall()  # LIMIT NULL: no limit
    return float(_loaded(plan)[0]["Plan"]["Plan Rows"])


def _loaded(plan: Any) -> Any:
    return json.loads(plan) if isinstance(plan, str) else plan


def _nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, list):
        for item in node:
            yield from _nodes(item)
    elif isinstance(node, dict):
        if "Node Type" in node:
            yield node
        for value in node.values():
            if isinstance(value, (list, dict)):
                yield from _nodes(value)


def _scans_whole(node: dict[str, Any], schema: str, name: str) -> bool:
    return (
        node.get("Node Type") in SEQ_SCANS
        and node.get("Relation Name") == name
        and node.get("Schema", schema) == schema
        and "Filter" in node
    )


def _operators_after(filter_text: str, quoted: str) -> list[str]:
    """The operator after each mention of a column in an EXPLAIN VERBOSE filter (``items.section = ...``);
    an empty string where none follows (``items.flag``, ``items.x IS NULL``)."""
    mention = re.compile(r'(?<![\w"$])(?:[\w$]+|"(?:[^"]|"")+")\.' + re.escape(quoted) + r'(?![\w"$])')
    operators = []
    for found in mention.finditer(filter_text):
        if CALL.search(filter_text, 0, found.start()):
            operators.append("(call)")  # an argument of a function (lower(section) = ...): no plain index serves it
            continue
        follows = OPERATOR.match(filter_text, found.end())
        operators.append(follows.group(1) if follows else "")
    return operators


def _columns(conn: psycopg.Connection[Any], oid: int, vector_column: str) -> list[_Column]:
    with pinned_path(conn):  # catalog reads by OID: pg_catalog's operators only (the rule in pgsim.db.catalog)
        return _columns_pinned(conn, oid, vector_column)


def _columns_pinned(conn: psycopg.Connection[Any], oid: int, vector_column: str) -> list[_Column]:
    rows = conn.execute(
        """
        SELECT a.attname, pg_catalog.quote_ident(a.attname), pg_catalog.format_type(a.atttypid, a.atttypmod),
               CASE WHEN base.typcategory = 'A' OR base.typname IN ('jsonb', 'tsvector', 'hstore') THEN 'gin'
                    WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_opclass oc
                        JOIN pg_catalog.pg_am am ON am.oid = oc.opcmethod
                        WHERE am.amname = 'btree' AND oc.opcdefault AND (oc.opcintype = base.oid
                            OR (base.typtype = 'e' AND oc.opcintype = 'pg_catalog.anyenum'::pg_catalog.regtype)
                            OR EXISTS (SELECT 1 FROM pg_catalog.pg_cast c WHERE c.castsource = base.oid
                                       AND c.casttarget = oc.opcintype AND c.castmethod = 'b'))) THEN 'btree'
                    WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_opclass oc
                        JOIN pg_catalog.pg_am am ON am.oid = oc.opcmethod
                        WHERE am.amname = 'gin' AND oc.opcdefault AND oc.opcintype = base.oid) THEN 'gin'
               END AS method
        FROM pg_catalog.pg_attribute a
        JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
        JOIN pg_catalog.pg_type base ON base.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
        WHERE a.attrelid = %s::pg_catalog.oid AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attname <> %s::pg_catalog.name
        ORDER BY a.attnum
        """,
        [oid, vector_column],
    ).fetchall()
    indexed = conn.execute(
        "SELECT a.attname, am.amname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_catalog.pg_am am ON am.oid = c.relam "
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
        "WHERE i.indrelid = %s::pg_catalog.oid AND i.indisvalid AND i.indpred IS NULL",
        [oid],
    ).fetchall()
    leading = {(str(name), str(method)) for name, method in indexed}
    return [
        _Column(
            str(name),
            str(quoted),
            str(type_name),
            method,
            method is not None and any((name, m) in leading for m in SERVING_METHODS[method]),
        )
        for name, quoted, type_name, method in rows
    ]


def likely_filters(conn: psycopg.Connection[Any], table: str, column: str) -> list[tuple[str, sql.Composable]]:
    """Filters an application plausibly puts on ``table``'s other columns, from the planner's statistics
    (``pg_stats``, after ``ANALYZE``): per column that repeats its values (not mostly distinct, as free
    text and timestamps are, nor one value), equality to its most common value that keeps at most
    ``MAX_SHARE`` of the rows (else a value from the middle of its histogram); per array column, containment
    of its most common element. Columns ``pg_stats`` shows the current role nothing of are left out."""
    found = resolve_table(conn, table)
    with pinned_path(conn):  # a catalog read by OID (the rule in pgsim.db.catalog)
        rows = _statistics(conn, found.oid, found.schema, found.name, column)
    filters: list[tuple[str, sql.Composable]] = []
    for name, type_name, is_array, distinct, values, freqs, bounds, elems, elem_freqs in rows:
        if distinct is None or -1 <= distinct < -0.5 or 0 <= distinct <= 1:
            continue  # mostly distinct (text, timestamps, keys), or one value: not what searches filter on
        target = sql.Identifier(name)
        if is_array:
            rare = [e for e, f in zip(elems or (), elem_freqs or (), strict=False) if f <= MAX_SHARE]
            if rare:
                contains = sql.SQL("{} @> ARRAY[{}]::{}").format(target, sql.Literal(rare[0]), sql.SQL(type_name))
                filters.append((str(name), contains))
            continue
        rare = [v for v, f in zip(values or (), freqs or (), strict=False) if f <= MAX_SHARE][:1]  # by frequency
        value = rare[0] if rare else (bounds[len(bounds) // 2] if bounds else None)
        if value is not None:
            filters.append((str(name), sql.SQL("{} = {}").format(target, sql.Literal(value))))
    return filters


def missing_indexes_for_likely_filters(conn: psycopg.Connection[Any], table: str, column: str) -> list[IndexAdvice]:
    """:func:`missing_filter_indexes` for each of :func:`likely_filters`: the columns searches would filter
    on, by the statistics, that the exact path could only filter by reading the whole table."""
    advice = []
    for name, condition in likely_filters(conn, table, column):
        advice += [a for a in missing_filter_indexes(conn, table, column, condition) if a.column == name]
    return advice


def _statistics(conn: psycopg.Connection[Any], oid: int, schema: str, name: str, column: str) -> list[Any]:
    return conn.execute(
        """
        SELECT s.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), t.typcategory = 'A', s.n_distinct,
               CASE WHEN t.typcategory <> 'A' THEN s.most_common_vals::text::text[] END, s.most_common_freqs,
               CASE WHEN t.typcategory <> 'A' THEN s.histogram_bounds::text::text[] END,
               s.most_common_elems::text::text[], s.most_common_elem_freqs
        FROM pg_catalog.pg_stats s
        JOIN pg_catalog.pg_attribute a ON a.attrelid = %s::pg_catalog.oid AND a.attname = s.attname
        JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
        WHERE s.schemaname = %s::pg_catalog.name AND s.tablename = %s::pg_catalog.name AND NOT s.inherited
          AND s.attname <> %s::pg_catalog.name
        ORDER BY a.attnum
        """,
        [oid, schema, name, column],
    ).fetchall()
