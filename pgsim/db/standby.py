"""Hot standbys (read replicas): searches run there, writes must run on the primary.

A streaming standby replays the primary's WAL and refuses every write, temporary tables included. pgsim's
read paths write nothing, so they run on a standby as they run on the primary. The calls that write
(registering or removing a column, a model change, calibration, ingest, query banks, labels) ask
:func:`require_primary` first, so they fail at once with :class:`~pgsim.errors.ReadOnlyStandby` instead of
halfway through with PostgreSQL's "cannot execute ... in a read-only transaction".
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgsim.errors import ReadOnlyStandby


def is_standby(conn: psycopg.Connection[Any]) -> bool:
    """Whether ``conn``'s server is a hot standby (in recovery)."""
    row = conn.execute("SELECT pg_catalog.pg_is_in_recovery()").fetchone()
    return bool(row and row[0])


def standby_error(what: str) -> ReadOnlyStandby:
    return ReadOnlyStandby(
        f"{what} writes to the database, and this server is a read-only standby; run it on the primary "
        "(searches run on either)."
    )


def require_primary(conn: psycopg.Connection[Any], what: str) -> None:
    """Raise :class:`ReadOnlyStandby`, naming ``what``, when ``conn`` reaches a hot standby."""
    if is_standby(conn):
        raise standby_error(what)
