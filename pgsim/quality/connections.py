"""The psycopg connection under what a caller hands pgsim's quality functions: a psycopg connection, or a
SQLAlchemy ``Session``, ``Connection`` or pooled connection on the ``postgresql+psycopg`` driver (their
statements then run in the session's transaction). Duck-typed: nothing here imports SQLAlchemy."""

from __future__ import annotations

from typing import Any

import psycopg

from pgsim.errors import InvalidInput


def psycopg_connection(conn: Any) -> psycopg.Connection[Any]:
    """The synchronous psycopg connection ``conn`` is or wraps, or :class:`InvalidInput` saying what to pass."""
    if isinstance(conn, psycopg.Connection):
        return conn
    if hasattr(conn, "sync_session") or hasattr(conn, "sync_connection") or isinstance(conn, psycopg.AsyncConnection):
        raise InvalidInput(
            "pgsim's searches run on a synchronous connection; an async one (AsyncSession, AsyncConnection) cannot "
            "run them. Use a Session of a postgresql+psycopg engine, or a psycopg.Connection."
        )
    raw = conn
    if not hasattr(raw, "driver_connection"):
        if callable(getattr(raw, "connection", None)):  # an ORM Session: the connection of its transaction
            raw = raw.connection()
        raw = getattr(raw, "connection", raw)  # a Core Connection: its pooled DBAPI connection
    raw = getattr(raw, "driver_connection", raw)  # a pooled connection: the driver's own
    if isinstance(raw, psycopg.Connection):
        return raw
    if isinstance(raw, psycopg.AsyncConnection):  # a sync Session of an async engine (AsyncSession.run_sync)
        return psycopg_connection(raw)
    raise InvalidInput(
        f"Expected a psycopg.Connection, or a SQLAlchemy Session or Connection on the psycopg driver "
        f"(postgresql+psycopg://); got {type(conn).__name__}"
        + (f" on {type(raw).__module__}.{type(raw).__name__}" if raw is not conn else "")
        + "."
    )
