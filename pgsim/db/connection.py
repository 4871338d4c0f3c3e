"""Which database to use: an explicit DSN, ``$PGSIM_DSN``, or the embedded server."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

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
    """A psycopg connection with pgsim's adapters registered (when pgvector is installed there). Through a
    pooler (PgBouncer) it prepares no statement (``prepare_threshold=None``)."""
    resolved = resolve_dsn(dsn, data_dir)
    try:
        conn = psycopg.connect(resolved, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise ServerError(
            f"Cannot connect to PostgreSQL ({str(exc).strip()}). Check --dsn / PGSIM_DSN, or leave both unset "
            "to use pgsim's embedded server."
        ) from None
    row = conn.execute(
        "SELECT pg_catalog.to_regtype('vector'::pg_catalog.text) IS NOT NULL, pg_catalog.pg_backend_pid()"
    ).fetchone()
    assert row is not None
    if not autocommit:
        conn.rollback()  # handed over outside a transaction
    if row[1] != conn.info.backend_pid:
        # A pooler (PgBouncer) answered for the server. In transaction mode each transaction may run on another
        # server connection, which lacks the statements psycopg prepared on this one (PgBouncer before 1.21
        # has no prepared statements there): prepare none.
        conn.prepare_threshold = None
    if register and row[0]:
        from pgsim.psycopg import register as register_types

        register_types(conn)
    return conn


def notifications_reach(
    listener: psycopg.Connection[Any], sender: psycopg.Connection[Any], timeout: float = 2.0
) -> bool:
    """Whether a NOTIFY sent on autocommit connection ``sender`` reaches ``listener`` within ``timeout``
    seconds. Not through a pooler in transaction mode (PgBouncer): LISTEN lasts one transaction there."""
    channel = sql.Identifier(f"pgsim_probe_{uuid.uuid4().hex}")
    listener.execute(sql.SQL("LISTEN {}").format(channel))
    try:
        sender.execute(sql.SQL("NOTIFY {}").format(channel))
        return any(True for _ in listener.notifies(timeout=timeout, stop_after=1))
    finally:
        listener.execute(sql.SQL("UNLISTEN {}").format(channel))
