"""The Citus coordinator of ``PGSIM_CITUS_DSN`` for tests/citus: pgsim installed, a schema of the caller's own."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from pgsim.db.schema import install
from pgsim.psycopg import register

CITUS_DSN = os.environ.get("PGSIM_CITUS_DSN")
SKIP_REASON = "PGSIM_CITUS_DSN is not set: no Citus coordinator to test against"


@contextmanager
def coordinator_schema(prefix: str) -> Iterator[tuple[psycopg.Connection[Any], str]]:
    """A connection to the coordinator, pgsim installed, its search_path on a new schema (dropped after)."""
    assert CITUS_DSN is not None
    with psycopg.connect(CITUS_DSN, autocommit=True) as conn:
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'citus'").fetchone()
        assert version is not None, "PGSIM_CITUS_DSN reaches a database without the citus extension"
        workers = conn.execute("SELECT count(*) FROM pg_catalog.citus_get_active_worker_nodes()").fetchone()
        assert workers is not None and workers[0] >= 1, "the Citus coordinator has no worker nodes"
        install(conn)
        register(conn)
        schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path = {}, public").format(sql.Identifier(schema)))
        try:
            yield conn, schema
        finally:
            conn.execute("RESET citus.enable_unsafe_triggers")
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
