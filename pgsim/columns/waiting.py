"""Waiting until a table is in sync: for tests and scripts, while workers run elsewhere."""

from __future__ import annotations

import time
from typing import Any

import psycopg

from pgsim.columns.registry import registrations
from pgsim.errors import InvalidInput


def wait_for_sync(conn: psycopg.Connection[Any], table: str, timeout: float = 60.0, *, poll: float = 0.1) -> None:
    """Wait until no row of ``table`` waits for a worker: every embedding column of the table has an empty
    queue. For tests and scripts, with workers running elsewhere (``pgsim worker``). A dead letter will not
    clear on its own, so it is an error at once; so is ``timeout`` seconds passing (:class:`TimeoutError`
    says how many rows were left). A model or source change still to be switched over is not waited for."""
    found = [r.id for r in registrations(conn) if table in (r.table, r.table_name)]
    if not found:
        raise InvalidInput(f"Table {table!r} has no registered embedding column (pgsim add-embedding).")
    deadline = time.monotonic() + timeout
    while True:
        queued, dead = conn.execute(
            "SELECT (SELECT count(*) FROM pgsim.queue WHERE embedding_id = ANY(%(ids)s)), "
            "(SELECT count(*) FROM pgsim.dead_letter WHERE embedding_id = ANY(%(ids)s))",
            {"ids": found},
        ).fetchone() or (0, 0)
        if dead:
            raise InvalidInput(
                f"{dead} rows of {table} are in pgsim.dead_letter and will not be embedded until their cause is "
                "fixed: see their last_error, then SELECT pgsim.requeue_dead_letters()."
            )
        if not queued:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{queued} rows of {table} still wait for a worker after {timeout:g}s; is one running?")
        time.sleep(poll)
