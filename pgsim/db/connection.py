"""Which database to use: an explicit DSN, ``$PGSIM_DSN``, or the embedded server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg

from pgsim.db.server import EmbeddedServer
from pgsim.errors import ServerError


def resolve_dsn(dsn: str | None = None, data_dir: Path | str | None = None) -> str:
    """``dsn``, else ``$PGSIM_DSN``, else the embedded server's (started when it is not running)."""
    chosen = dsn or os.environ.get("PGSIM_DSN")
    if chosen:
        return chosen
    return EmbeddedServer(data_dir).dsn()


def connect(
    dsn: str | None = None, *, data_dir: Path | str | None = None, autocommit: bool = True, register: bool = True
) -> psycopg.Connection[Any]:
    """A psycopg connection with pgsim's adapters registered (when pgvector is installed there)."""
    resolved = resolve_dsn(dsn, data_dir)
    try:
        conn = psycopg.connect(resolved, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise ServerError(
            f"Cannot connect to PostgreSQL ({str(exc).strip()}). Check --dsn / PGSIM_DSN, or leave both unset "
            "to use pgsim's embedded server."
        ) from None
    if register and conn.execute("SELECT to_regtype('vector')").fetchone() != (None,):
        from pgsim.psycopg import register as register_types

        register_types(conn)
    return conn
