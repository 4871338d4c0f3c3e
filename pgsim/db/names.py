"""Table names from users, as quoted identifiers: every part is quoted, never interpolated."""

from __future__ import annotations

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
