"""What a calibration measures with (pgsim.db.calibration): the column and its index, query vectors from the
table's own rows, and filters of each selectivity of the grid from its own columns."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from pgsim.db.names import table_identifier
from pgsim.errors import InvalidInput

SELECTIVITY_GRID = (1.0, 0.7, 0.4, 0.2, 0.1, 0.05, 0.02, 0.01)
EXACT_BELOW_ROWS = 1000  # pgsim.knn_plan's default: fewer matching rows always take the exact path
HASH_BUCKETS = 65536


@dataclass(frozen=True)
class Target:
    oid: int
    qualified: sql.Composable
    column: sql.Identifier
    name: str
    attnum: int
    type_name: str
    dimension: int
    index_oid: int | None
    index_name: str | None
    # bit or prefix storage: the walk yields candidates, re-ranked on the full vectors
    reranked: bool = False
    prefix: int | None = None  # prefix storage: the length of the vectors' prefix the index holds


def table_oid(conn: psycopg.Connection[Any], table: str | int) -> int:
    """The table a name means to the caller (its search_path), as an OID; nothing but the lookup runs."""
    if isinstance(table, bool) or not isinstance(table, (int, str)):
        raise InvalidInput(f"The table is a name ('schema.table' or 'table') or an OID; got {table!r}.")
    if isinstance(table, int):
        return table
    quoted = table_identifier(table).as_string(conn)  # 'schema.table' or 'table', each part quoted
    found = conn.execute("SELECT pg_catalog.to_regclass(%s::pg_catalog.text)::pg_catalog.oid", [quoted]).fetchone()
    if not found or found[0] is None:
        raise InvalidInput(f"Table {table!r} does not exist (or is not on the search_path).")
    return int(found[0])


def calibration_target(conn: psycopg.Connection[Any], oid: int, column: str) -> Target:
    """The column, the index a calibration measures (the one pgsim.knn_plan takes: the column's valid full
    cosine HNSW index, first by name), and the checks that come before any statement reads the table: a
    table, that column, that index, and the owner calibrating. Run with search_path pinned."""
    row = conn.execute(
        f"""
        SELECT pg_catalog.format('%%I.%%I', n.nspname, c.relname), c.relkind, a.attnum, t.typname::text,
               a.atttypmod, pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE'),
               c.relowner = r.oid OR NOT (r.rolsuper OR r.rolbypassrls),
               ({FULL_COSINE_INDEX}),
               pgsim.reranked_index(c.oid::pg_catalog.regclass, %s::pg_catalog.name)
                   ::pg_catalog.regclass::pg_catalog.oid,
               pgsim.index_prefix(c.oid::pg_catalog.regclass, %s::pg_catalog.name)
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_catalog.pg_roles r ON r.rolname = CURRENT_USER
        LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = %s::pg_catalog.name
             AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
        WHERE c.oid = %s::pg_catalog.oid
        """,  # noqa: S608 (FULL_COSINE_INDEX is a constant)
        [column, column, column, oid],
    ).fetchone()
    if row is None:
        raise InvalidInput(f"No table with OID {oid} here.")
    name, kind, attnum, type_name, typmod, owns, own_code, cosine_index, reranked_index, prefix = row
    index_oid = cosine_index or reranked_index  # the one pgsim.knn_plan takes
    if kind not in ("r", "p", "m"):
        raise InvalidInput(f"{name} is not a table: only a table's HNSW index can be calibrated.")
    if attnum is None:
        raise InvalidInput(f"Table {name} has no column {column!r}.")
    if type_name not in ("vector", "halfvec") or typmod < 1:
        raise InvalidInput(f"Column {name}.{column} is not a pgvector vector(n) or halfvec(n) column.")
    if not owns:
        raise InvalidInput(
            f"Only the owner of {name} (or a member of its owning role) may calibrate it: every role's searches "
            "trust the curve."
        )
    if not own_code:  # ANALYZE runs the table's index expressions, with this session's rights
        raise InvalidInput(
            f"A superuser or BYPASSRLS session does not calibrate {name}, owned by another role, whose code it "
            "would run: SET ROLE to its owner first."
        )
    if index_oid is None:
        raise InvalidInput(
            f"{name}.{column} has no valid HNSW index for cosine distance to calibrate; create one: CREATE INDEX "
            f"ON {name} USING hnsw ({sql.Identifier(column).as_string(conn)} {type_name}_cosine_ops)"
        )
    index_name = conn.execute("SELECT %s::pg_catalog.oid::pg_catalog.regclass::pg_catalog.text", [index_oid]).fetchone()
    return Target(oid, sql.SQL(name), sql.Identifier(column), column, attnum, type_name, typmod, index_oid,
                  index_name[0] if index_name else None, cosine_index is None,
                  prefix if cosine_index is None else None)  # fmt: skip


# The index pgsim.knn_plan takes for a column (its valid full cosine HNSW index, first by name in bytes)
# and the one a calibration measures; c is the table, a the column.
FULL_COSINE_INDEX = """
SELECT i.indexrelid FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
JOIN pg_catalog.pg_am am ON am.oid = ic.relam
JOIN pg_catalog.pg_opclass oc ON oc.oid = i.indclass[0]
WHERE i.indrelid = c.oid AND am.amname = 'hnsw' AND i.indkey[0] = a.attnum AND i.indisvalid
  AND i.indpred IS NULL AND oc.opcname LIKE '%%cosine%%'
ORDER BY ic.relname COLLATE "C" LIMIT 1
"""


def query_vectors(
    conn: psycopg.Connection[Any], target: Target, queries: int | Any, rows: int
) -> np.ndarray[Any, np.dtype[np.float32]]:
    if isinstance(queries, bool) or (isinstance(queries, int) and not 1 <= queries <= 1000):
        raise InvalidInput(f"queries must be from 1 to 1000 sampled queries, or query vectors; got {queries!r}.")
    if not isinstance(queries, int):
        given = np.asarray(queries, dtype=np.float32)
        if given.ndim != 2 or not len(given) or given.shape[1] != target.dimension or not np.isfinite(given).all():
            raise InvalidInput(
                f"Query vectors must be a non-empty list of finite vectors of {target.dimension} dimensions."
            )
        return np.asarray(given[np.linalg.norm(given, axis=1) > 0], dtype=np.float32)
    banked = banked_queries(conn, target)
    if len(banked):  # real queries are the better measure than rows moved towards rows (bench/sweep.py)
        return banked[:: -(-len(banked) // queries)]  # at most `queries` of them, evenly
    percent = min(100.0, 100.0 * 8 * queries / rows)
    sampled = conn.execute(
        sql.SQL(
            "SELECT {col}::text FROM {table} TABLESAMPLE BERNOULLI ({percent}) REPEATABLE (7) WHERE {col} IS NOT NULL "
            "ORDER BY pg_catalog.hashtext(ctid::text || 'query') LIMIT {limit}"
        ).format(
            col=target.column, table=target.qualified, percent=sql.Literal(percent), limit=sql.Literal(2 * queries)
        )
    ).fetchall()
    matrix = np.array([json.loads(text) for (text,) in sampled], dtype=np.float32)
    if len(matrix) < 2:
        return matrix[:0]
    matrix = matrix[np.linalg.norm(matrix, axis=1) > 0]
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    half = len(matrix) // 2
    # A row moved half-way towards another, so that no query is a row of the table, as a query in words is
    # not; on the Debian corpus its recall by ef_search follows that of held-out text queries, a little
    # below it (bench/sweep.py runs both).
    moved = matrix[:half] + 0.5 * matrix[half : 2 * half]
    return np.asarray(moved / np.linalg.norm(moved, axis=1, keepdims=True), dtype=np.float32)


def banked_queries(conn: psycopg.Connection[Any], target: Target) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The column's query bank (pgsim.set_query_bank: typical queries, encoded as queries), unit length; none
    when it has no bank or this role may not read banks. Run with search_path pinned."""
    readable = conn.execute(
        "SELECT pg_catalog.has_table_privilege(pg_catalog.to_regclass('pgsim.query_bank'), 'SELECT')"
    ).fetchone()
    if not (readable and readable[0]):
        return np.zeros((0, target.dimension), dtype=np.float32)
    rows = conn.execute(
        """
        SELECT b.embedding::text FROM pgsim.query_bank b, pg_catalog.pg_class c, pg_catalog.pg_namespace n
        WHERE c.oid = %s::pg_catalog.oid AND n.oid = c.relnamespace AND b.table_schema = n.nspname
          AND b.table_name = c.relname AND b.column_name = %s::pg_catalog.name
        """,
        [target.oid, target.name],
    ).fetchall()
    parsed = [json.loads(text) for (text,) in rows]  # a bank left from another model may not fit: left out
    matrix = np.array([v for v in parsed if len(v) == target.dimension], dtype=np.float32).reshape(-1, target.dimension)
    matrix = matrix[np.linalg.norm(matrix, axis=1) > 0]
    return np.asarray(matrix / np.linalg.norm(matrix, axis=1, keepdims=True), dtype=np.float32)


def level_filters(conn: psycopg.Connection[Any], target: Target, rows: int) -> list[tuple[float, tuple[str, ...], int]]:
    """Per selectivity of the grid: the filters that stand for it and how many embedded rows pass the
    strictest of them."""
    common = common_values(conn, target)
    levels: list[tuple[float, tuple[str, ...], int]] = []
    for selectivity in SELECTIVITY_GRID:
        if selectivity == 1.0:
            levels.append((1.0, (), rows))
            continue
        if selectivity * rows < EXACT_BELOW_ROWS:
            continue
        bucket = max(1, round(selectivity * HASH_BUCKETS))
        filters = [f"(pg_catalog.hashtext(ctid::text) & {HASH_BUCKETS - 1}) < {bucket}"]
        near = [(abs(math.log(share / selectivity)), condition) for condition, share in common]
        if near and min(near)[0] < math.log(1.6):
            filters.append(min(near)[1])
        counts = [count_rows(conn, target, condition) for condition in filters]
        levels.append((selectivity, tuple(filters), min(counts)))
    return levels


def common_values(conn: psycopg.Connection[Any], target: Target) -> list[tuple[str, float]]:
    """``column = value`` conditions for the most common values of the table's scalar columns, with the
    share of rows each passes (the planner's statistics, fresh from the ANALYZE that starts a calibration)."""
    found = conn.execute(
        """
        SELECT s.attname, s.most_common_vals::text::text[], s.most_common_freqs
        FROM pg_catalog.pg_stats s
        JOIN pg_catalog.pg_class c ON c.relname = s.tablename
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace AND n.nspname = s.schemaname
        JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = s.attname
        JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
        WHERE c.oid = %s AND s.attname <> %s AND s.most_common_vals IS NOT NULL
          AND t.typcategory IN ('S', 'N', 'B', 'D') AND t.typnamespace = 'pg_catalog'::regnamespace
        """,
        [target.oid, target.name],
    ).fetchall()
    conditions: list[tuple[str, float]] = []
    for name, values, shares in found:
        for value, share in zip(values, shares, strict=False):
            condition = sql.SQL("{} = {}").format(sql.Identifier(name), sql.Literal(value)).as_string(conn)
            conditions.append((condition, float(share)))
    return conditions


def count_rows(conn: psycopg.Connection[Any], target: Target, condition: str) -> int:
    rows = one_statement(
        conn,
        sql.SQL("SELECT count(*) FROM {table} WHERE {col} IS NOT NULL AND ({condition})").format(
            table=target.qualified,
            col=target.column,
            condition=sql.SQL(condition),
        ),
    )
    return int(rows[0][0]) if rows else 0


def one_statement(conn: psycopg.Connection[Any], statement: sql.Composable) -> list[Any]:
    """The rows of ``statement``, sent with a parameter, so that the server parses it as one statement: a
    filter that tries to close it and start another (``true); DROP ...``) is an error, never run."""
    text = statement.as_string(conn).replace("%", "%%")  # a literal's % is no placeholder
    return conn.execute(text + " OFFSET %s", [0], prepare=False).fetchall()


def workload_levels(
    conn: psycopg.Connection[Any], target: Target, filters: tuple[str, ...], rows: int
) -> list[tuple[float, tuple[str, ...], int]]:
    """A level for each filter of a workload, at the share of rows it passes. Each is SQL over the table's
    columns, run under search_path pg_catalog, pg_temp (qualify your own functions), as pgsim.knn's filter."""
    levels: list[tuple[float, tuple[str, ...], int]] = []
    for condition in filters:
        if not isinstance(condition, str) or not condition.strip() or "\x00" in condition:
            raise InvalidInput(f"A workload filter is one SQL condition over the table's columns; got {condition!r}.")
        try:
            with conn.transaction():
                matching = count_rows(conn, target, condition)
        except psycopg.errors.Error as exc:
            raise InvalidInput(
                f"The workload filter {condition!r} is not valid here: {exc.diag.message_primary}"
            ) from None
        levels.append((matching / max(rows, 1), (condition,), matching))
    return levels
