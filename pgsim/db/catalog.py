"""Catalog look-ups every layer shares: the table a name denotes, its columns and primary key, whether a
relation or a part of pgsim's schema exists, and whether the server runs on this machine."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgsim.db.names import table_identifier
from pgsim.errors import InvalidInput, SchemaMissing

LOCAL_HOSTS = ("", "localhost", "127.0.0.1", "::1")

# How pgsim's Python side reads the catalog without running another role's code. PostgreSQL resolves an
# operator or function over every schema on the session's search_path: among candidates with identical
# argument types only the earliest schema's counts, but candidates with other argument types compete on an
# equal footing, and an exact match on the arguments' types beats one that needs an implicit cast (or a
# polymorphic one: anyarray, "any", anynonarray). pg_catalog is searched first only when search_path does
# not name it; a session with ``search_path = app, pg_catalog`` puts app's ``=(oid, oid)`` before pg_catalog's.
# So casting parameters alone is not enough (it defeats ``=(oid, bigint)`` planted for psycopg's untyped int,
# not an ``=(oid, oid)`` on a path that lists pg_catalog later). The rule: a statement that must resolve a
# caller's name on the caller's path (``resolve_table``, ``get_registration``) names only pg_catalog's objects,
# qualified: tables and functions ``pg_catalog.``, every operator ``OPERATOR(pg_catalog.=)``, every parameter
# cast to a pg_catalog type (``%s::pg_catalog.oid``, ``::pg_catalog.name``, ``::pg_catalog.text``); any other
# catalog read runs under :func:`pinned_path` (search_path ``pg_catalog, pg_temp`` for the block, in a
# transaction), where nothing from the caller's path resolves at all, and still casts its parameters.


@dataclass(frozen=True)
class Table:
    oid: int
    schema: str
    name: str
    kind: str  # pg_class.relkind: r (table), p (partitioned), v (view), ...

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


def resolve_table(conn: psycopg.Connection[Any], table: str) -> Table:
    """The relation ``table`` names (search_path applies), with a clear error when there is none."""
    row = conn.execute(
        "SELECT c.oid, n.nspname, c.relname, c.relkind FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
        "ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
        "WHERE c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(%s::pg_catalog.text)::pg_catalog.oid",
        [table_identifier(table).as_string(conn)],
    ).fetchone()
    if row is None:
        raise InvalidInput(f"Table {table!r} does not exist (or is not on the search_path).")
    return Table(int(row[0]), str(row[1]), str(row[2]), str(row[3]))


def table_columns(conn: psycopg.Connection[Any], oid: int) -> dict[str, str]:
    """The table's columns in order: name -> type as ``format_type`` writes it (``vector(384)``)."""
    rows = conn.execute(
        "SELECT attname, pg_catalog.format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute "
        "WHERE attrelid OPERATOR(pg_catalog.=) %s::pg_catalog.oid AND attnum OPERATOR(pg_catalog.>) 0 "
        "AND NOT attisdropped ORDER BY attnum",
        [oid],
    ).fetchall()
    return {str(name): str(type_name) for name, type_name in rows}


def primary_key(conn: psycopg.Connection[Any], oid: int) -> tuple[str, ...]:
    """The table's primary key columns in key order; empty when it has none."""
    rows = conn.execute(
        """
        SELECT a.attname FROM pg_catalog.pg_index i
        CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
        JOIN pg_catalog.pg_attribute a
          ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid AND a.attnum OPERATOR(pg_catalog.=) k.attnum
        WHERE i.indrelid OPERATOR(pg_catalog.=) %s::pg_catalog.oid AND i.indisprimary ORDER BY k.position
        """,
        [oid],
    ).fetchall()
    return tuple(str(name) for (name,) in rows)


def relation_exists(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    name_sql = sql.Identifier(schema, name).as_string(conn)
    return conn.execute("SELECT pg_catalog.to_regclass(%s::pg_catalog.text)", [name_sql]).fetchone() != (None,)


def has_schema_table(conn: psycopg.Connection[Any], name: str) -> bool:
    """Whether pgsim's schema has relation ``name`` (``embedding``, ``migration``, ...) in this database."""
    return relation_exists(conn, "pgsim", name)


def require_schema(conn: psycopg.Connection[Any], name: str, needed_for: str = "this") -> None:
    """:class:`SchemaMissing` unless pgsim's schema has relation ``name``."""
    if not has_schema_table(conn, name):
        raise SchemaMissing(
            f"This database has no pgsim.{name}, which {needed_for} needs (pgsim's schema is missing or older "
            "than this package): run `pgsim install` (or `alembic upgrade heads`)."
        )


def pin_search_path(conn: psycopg.Connection[Any]) -> None:
    """Until the transaction ends, names resolve in pg_catalog and pg_temp only: a source expression, and
    what pgsim's statements call, never bind to an object another role put in a schema on the session's path.
    pgvector's types are then named with :func:`vector_schema`."""
    conn.execute("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true)")


@contextmanager
def pinned_path(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """search_path ``pg_catalog, pg_temp`` for the block, in a transaction of its own (a savepoint inside the
    caller's, so it works on autocommit connections too, where a local setting would last one statement);
    the caller's path is back afterwards. For catalog reads by OID, never for resolving a caller's name."""
    with conn.transaction():
        row = conn.execute(
            "SELECT pg_catalog.current_setting('search_path'), "
            "pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true)"
        ).fetchone()
        yield
        # (after an error, the savepoint's or transaction's rollback restores the setting itself)
        conn.execute("SELECT pg_catalog.set_config('search_path', %s::pg_catalog.text, true)", [row[0] if row else ""])


def vector_schema(conn: psycopg.Connection[Any]) -> str:
    """The schema pgvector's types live in (``CREATE EXTENSION vector`` chose it), to qualify them with."""
    row = conn.execute(
        "SELECT n.nspname FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n "
        "ON n.oid OPERATOR(pg_catalog.=) e.extnamespace "
        "WHERE e.extname OPERATOR(pg_catalog.=) 'vector'::pg_catalog.name"
    ).fetchone()
    if row is None:
        raise SchemaMissing("This database has no pgvector extension: run `pgsim install`.")
    return str(row[0])


def is_local_host(host: str | None) -> bool:
    """Whether a connection's host is this machine: a Unix socket directory (or abstract socket), or loopback."""
    host = host or ""
    return host.startswith("/") or host.startswith("@") or host in LOCAL_HOSTS
