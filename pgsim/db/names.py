"""Table names from users, as quoted identifiers: every part is quoted, never interpolated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgsim.errors import InvalidInput

# PostgreSQL cuts identifiers at 63 bytes (NAMEDATALEN - 1).
MAX_IDENTIFIER_BYTES = 63


def table_parts(name: str) -> tuple[str, ...]:
    """``("schema", "table")`` or ``("table",)`` for ``schema.table`` or ``table``."""
    parts = tuple(name.split(".")) if isinstance(name, str) else ()
    if not 1 <= len(parts) <= 2 or not all(parts):
        raise InvalidInput(f"Table name {name!r} must be 'table' or 'schema.table'.")
    return parts


def table_identifier(name: str) -> sql.Identifier:
    """``schema.table`` or ``table`` as a quoted identifier."""
    return sql.Identifier(*table_parts(name))


def derived_name(*parts: str, suffix: str) -> str:
    """A name for an object pgsim creates (``docs_embedding_hnsw``), cut to fit PostgreSQL's limit."""
    stem = "_".join(parts)
    room = MAX_IDENTIFIER_BYTES - len(suffix.encode()) - 1
    return stem.encode()[:room].decode(errors="ignore") + "_" + suffix


@dataclass(frozen=True)
class ExistingTable:
    oid: int
    schema: str
    name: str


def existing_table(conn: psycopg.Connection[Any], table: str) -> ExistingTable:
    """The table ``table`` names (search_path applies), with a clear error when there is none."""
    row = conn.execute(
        "SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = to_regclass(%s)",
        [table_identifier(table).as_string(conn)],
    ).fetchone()
    if row is None:
        raise InvalidInput(f"Table {table!r} does not exist (or is not on the search_path).")
    return ExistingTable(int(row[0]), str(row[1]), str(row[2]))
