"""HNSW index builds sized for the data: enough ``maintenance_work_mem`` for the whole graph, parallel workers.

pgvector builds an HNSW graph in memory and falls back to much slower on-disk inserts once the graph
outgrows ``maintenance_work_mem`` (64 MB by default: a few tens of thousands of 384-d vectors). pgsim
estimates the graph's size from the row count, dimension and ``m``, and raises the setting (never lowers
it) for its own builds only: ``SET LOCAL`` in the build's transaction, or ``SET`` then ``RESET`` around a
``CONCURRENTLY`` build, which cannot run in a transaction. A parallel build keeps the graph in dynamic
shared memory; where that is too small (a container's 64 MB /dev/shm) the build is retried serially.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgsim.db.catalog import is_local_host, pinned_path, vector_schema
from pgsim.db.names import table_identifier
from pgsim.encoding.backends.auto import say
from pgsim.errors import InvalidInput

log = logging.getLogger(__name__)

DEFAULT_M = 16  # pgvector's defaults for an HNSW index
DEFAULT_EF_CONSTRUCTION = 64
MIB = 1 << 20
# Per graph element besides its vector: element header and tuple bookkeeping (a build's memory use per
# row, rounded up; bench/ingest.py builds the index on the whole corpus).
ELEMENT_OVERHEAD_BYTES = 160
NEIGHBOR_BYTES = 16  # one candidate: element pointer, distance, flags
HEADROOM = 1.25
DEFAULT_MAX_BUILD_MEMORY = 2048 * MIB
# A sized build's pace on 2 cores for 384 dimensions (bench/scale.py); only for saying how long a large
# build usually takes. About half of a row's cost is the graph's, whatever the vectors' length (BUILD_FIXED_SHARE).
BUILD_ROWS_PER_SECOND = 4000
BUILD_FIXED_SHARE = 0.5
ANNOUNCE_ABOVE_SECONDS = 5


@dataclass(frozen=True)
class HNSW:
    """HNSW build parameters (pgvector's defaults unless given)."""

    m: int = DEFAULT_M
    ef_construction: int = DEFAULT_EF_CONSTRUCTION

    def __post_init__(self) -> None:
        if isinstance(self.m, bool) or not isinstance(self.m, int) or not 2 <= self.m <= 100:
            raise InvalidInput(f"HNSW m must be a whole number from 2 to 100; got {self.m!r}.")
        if (
            isinstance(self.ef_construction, bool)
            or not isinstance(self.ef_construction, int)
            or not 2 * self.m <= self.ef_construction <= 1000
        ):
            raise InvalidInput(
                f"HNSW ef_construction must be a whole number from 2 * m ({2 * self.m}) to 1000; "
                f"got {self.ef_construction!r}."
            )


@dataclass(frozen=True)
class BuildSettings:
    maintenance_work_mem_mb: int
    parallel_workers: int
    estimated_graph_mb: float
    rows: float = 0


@dataclass(frozen=True)
class BuildReport:
    index_name: str
    seconds: float
    settings: BuildSettings
    serial_retry: bool  # the parallel build ran out of shared memory and ran again without workers


def graph_bytes(rows: float, dimension: int, dtype: str, m: int) -> float:
    """Estimated in-memory size of pgvector's HNSW graph during a build (``dtype`` bit: of binary vectors)."""
    vector_bytes = 8 + (-(-dimension // 8) if dtype == "bit" else dimension * (2 if dtype == "halfvec" else 4))
    expected_levels = 1 + 1 / max(m - 1, 1)  # level 0 has 2m neighbours, each higher level m
    neighbors = 2 * m + (expected_levels - 1) * m
    return rows * (ELEMENT_OVERHEAD_BYTES + vector_bytes + neighbors * NEIGHBOR_BYTES)


def build_settings(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    m: int,
    *,
    max_memory: int = DEFAULT_MAX_BUILD_MEMORY,
    bits: bool = False,
    prefix: int | None = None,
) -> BuildSettings:
    """What pgsim sets for building an HNSW index on ``table.column``: memory for the whole graph (with
    headroom, capped at ``max_memory``, never below the session's setting) and parallel workers. ``bits``:
    the index holds binary vectors; ``prefix``: the vectors' first ``prefix`` values."""
    found = conn.execute(  # the name on the caller's path; the rest by OID, pinned (the rule in pgsim.db.catalog)
        "SELECT pg_catalog.to_regclass(%s::pg_catalog.text)::pg_catalog.oid", [table_identifier(table).as_string(conn)]
    ).fetchone()
    with pinned_path(conn):
        row = conn.execute(
            """
            SELECT greatest(c.reltuples, 0) * (1 - coalesce(s.null_frac, 0)),
                   c.reltuples < 0,
                   a.atttypmod,
                   t.typname::text,
                   pg_size_bytes(current_setting('maintenance_work_mem')),
                   current_setting('max_parallel_maintenance_workers')::int,
                   current_setting('max_parallel_workers')::int
            FROM pg_class c
            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = %s::name
            JOIN pg_type t ON t.oid = a.atttypid
            LEFT JOIN pg_stats s ON s.schemaname = c.relnamespace::regnamespace::name AND s.tablename = c.relname
                AND s.attname = a.attname
            WHERE c.oid = %s::oid
            """,
            [column, found[0] if found else None],
        ).fetchone()
    if row is None:
        raise InvalidInput(f"Table {table!r} has no column {column!r} to index.")
    rows, never_analyzed, dimension, type_name, current_memory, workers, pool = row
    if never_analyzed:  # no statistics yet: count what the build will read
        counted = conn.execute(
            sql.SQL("SELECT pg_catalog.count(*) FROM {} WHERE {} IS NOT NULL").format(
                table_identifier(table), sql.Identifier(column)
            )
        ).fetchone()
        rows = counted[0] if counted else 0
    estimate = graph_bytes(float(rows), max(int(prefix or dimension), 1), "bit" if bits else type_name, m)
    memory = max(int(current_memory), min(int(estimate * HEADROOM), max_memory))
    # On a server on this machine, the leader and its workers use every core and no more (more workers
    # than cores made bench/ingest.py's builds slower); PostgreSQL still picks fewer for a small table. A
    # remote server's cores are unknown: its own setting stands.
    cores = os.cpu_count() or 1
    wanted = min(int(pool), cores - 1) if is_local_host(conn.info.host) else int(workers)
    return BuildSettings(
        maintenance_work_mem_mb=-(-memory // MIB),
        parallel_workers=wanted,
        estimated_graph_mb=estimate / MIB,
        rows=float(rows),
    )


def create_hnsw_index(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    index_name: str,
    hnsw: HNSW,
    *,
    opclass: str = "vector_cosine_ops",
    concurrently: bool = False,
    max_memory: int = DEFAULT_MAX_BUILD_MEMORY,
    prefix: int | None = None,
) -> BuildReport:
    """``CREATE INDEX [CONCURRENTLY] index_name ON table USING hnsw (column opclass) WITH (m, ef_construction)``
    under settings sized by :func:`build_settings`. ``bit_hamming_ops``: the index of binary-quantised storage,
    over ``binary_quantize(column)::bit(n)`` (what pgsim.bit_index finds and the searches order by).
    ``prefix`` (with ``vector_cosine_ops``): the index of prefix storage, over
    ``subvector(column, 1, prefix)::vector(prefix)`` (pgsim.prefix_index)."""
    if opclass not in ("vector_cosine_ops", "halfvec_cosine_ops", "bit_hamming_ops"):
        raise InvalidInput(f"Unsupported operator class {opclass!r}.")
    if prefix is not None and opclass != "vector_cosine_ops":
        raise InvalidInput(f"A prefix index is a vector_cosine_ops index, not {opclass}.")
    if concurrently and not conn.autocommit:
        raise InvalidInput("CREATE INDEX CONCURRENTLY needs an autocommit connection (psycopg: autocommit=True).")
    if concurrently and _partitioned(conn, table):  # PostgreSQL builds a partitioned table's indexes at once only
        log.info("%s is partitioned: building %s without CONCURRENTLY (writes wait for it)", table, index_name)
        concurrently = False
    bits = opclass == "bit_hamming_ops"
    settings = build_settings(conn, table, column, hnsw.m, max_memory=max_memory, bits=bits, prefix=prefix)
    schema = table.split(".")[:-1]
    extension = vector_schema(conn)  # nothing on the session's path stands in for pgvector's objects
    key: sql.Composable = sql.Identifier(column)
    if bits:
        key = sql.SQL("(({}.binary_quantize({}))::bit({}))").format(
            sql.Identifier(extension), key, sql.Literal(dimension_of(conn, table, column))
        )
    elif prefix is not None:
        key = sql.SQL("(({schema}.subvector({column}, 1, {prefix}))::{schema}.vector({prefix}))").format(
            schema=sql.Identifier(extension), column=key, prefix=sql.Literal(prefix)
        )
    statement = sql.SQL(
        "CREATE INDEX {concurrently} {index} ON {table} USING hnsw ({column} {opclass}) "
        "WITH (m = {m}, ef_construction = {ef_construction})"
    ).format(
        concurrently=sql.SQL("CONCURRENTLY" if concurrently else ""),
        index=sql.Identifier(index_name),
        table=table_identifier(table),
        column=key,
        opclass=sql.Identifier(extension, opclass),
        m=sql.Literal(hnsw.m),
        ef_construction=sql.Literal(hnsw.ef_construction),
    )
    dimensions = max(int(prefix or dimension_of(conn, table, column)), 1)
    usual = settings.rows / BUILD_ROWS_PER_SECOND * (BUILD_FIXED_SHARE + (1 - BUILD_FIXED_SHARE) * dimensions / 384)
    if usual > ANNOUNCE_ABOVE_SECONDS:  # a long pause says why, once: the index is built once
        say(f"building HNSW index {index_name} on {settings.rows:,.0f} rows (usually about {usual:.0f} s on 2 cores)")
    started = time.perf_counter()
    serial_retry = False
    try:
        _build(conn, statement, settings, concurrently)
    except psycopg.errors.DiskFull as exc:  # "could not resize shared memory segment": /dev/shm too small
        log.warning("parallel HNSW build ran out of shared memory (%s); building without workers", exc)
        if concurrently:  # a failed CONCURRENTLY build leaves an invalid index behind
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(*schema, index_name)))
        serial_retry = True
        settings = BuildSettings(settings.maintenance_work_mem_mb, 0, settings.estimated_graph_mb)
        _build(conn, statement, settings, concurrently)
    return BuildReport(index_name, time.perf_counter() - started, settings, serial_retry)


def dimension_of(conn: psycopg.Connection[Any], table: str, column: str) -> int:
    row = conn.execute(
        "SELECT atttypmod FROM pg_catalog.pg_attribute WHERE attrelid OPERATOR(pg_catalog.=) "
        "pg_catalog.to_regclass(%s::pg_catalog.text)::pg_catalog.oid "
        "AND attname OPERATOR(pg_catalog.=) %s::pg_catalog.name",
        [table_identifier(table).as_string(conn), column],
    ).fetchone()
    return int(row[0]) if row else 384


def _partitioned(conn: psycopg.Connection[Any], table: str) -> bool:
    # on the caller's path, as CREATE INDEX resolves the name: every operator and function qualified
    row = conn.execute(
        "SELECT c.relkind OPERATOR(pg_catalog.=) 'p' FROM pg_catalog.pg_class c "
        "WHERE c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(%s::pg_catalog.text)",
        [table_identifier(table).as_string(conn)],
    ).fetchone()
    return bool(row and row[0])


def _build(conn: psycopg.Connection[Any], statement: sql.Composed, settings: BuildSettings, concurrently: bool) -> None:
    with _build_settings(conn, settings, local=not concurrently):
        conn.execute(statement)


SET_BUILD = (
    "SELECT set_config('maintenance_work_mem', %s, {local}), "
    "set_config('max_parallel_maintenance_workers', %s, {local})"
)


@contextmanager
def _build_settings(conn: psycopg.Connection[Any], settings: BuildSettings, *, local: bool) -> Iterator[None]:
    values = [f"{settings.maintenance_work_mem_mb}MB", str(settings.parallel_workers)]
    if local:
        with conn.transaction():
            conn.execute(SET_BUILD.format(local="true"), values)
            yield
        return
    saved = conn.execute(
        "SELECT current_setting('maintenance_work_mem'), current_setting('max_parallel_maintenance_workers')"
    ).fetchone()
    conn.execute(SET_BUILD.format(local="false"), values)
    try:
        yield
    finally:
        if not conn.closed and saved is not None:
            conn.execute(SET_BUILD.format(local="false"), list(saved))
