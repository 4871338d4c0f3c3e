"""Citus: a table that Citus distributes (or replicates to every node) cannot be registered.

pgsim keeps a column in sync with row triggers that queue the row in ``pgsim.queue``. On a Citus table those
triggers would run on the worker nodes, inside each shard's statement, where pgsim's queue and registry (tables
on the coordinator) are not: Citus refuses such triggers, and with ``citus.enable_unsafe_triggers`` every
write to the table would fail instead. A Citus local table stays on the coordinator, but Citus moved its rows
into a shard under another name and OID. So registration refuses such a table first, with what to do
instead (docs/search.md, "Citus"). Tables on the coordinator that Citus does not manage are registered as
anywhere; one that Citus takes over later (a foreign key to a reference table makes it a Citus local table)
falls out of sync (docs/search.md says to remove its embedding first).
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgsim.errors import InvalidInput

# pg_dist_partition: partmethod 'h' hash-distributed ('a'/'r': the old append/range); 'n' with repmodel 't' a
# reference table (replicated to every node); 'n' with a colocation group a single-shard distributed table (as
# in a distributed schema); 'n' without one a Citus local table (kept on the coordinator, in Citus's metadata).
CITUS_TABLE = """
SELECT p.partmethod::pg_catalog.text, p.repmodel::pg_catalog.text, p.colocationid OPERATOR(pg_catalog.<>) 0
FROM pg_catalog.pg_dist_partition AS p
WHERE p.logicalrelid OPERATOR(pg_catalog.=) %s::pg_catalog.oid
"""
ON_WORKERS = "its row triggers would run on the Citus worker nodes, where pgsim's queue (on the coordinator) is not"
MOVED = (
    "Citus keeps its rows in a shard under another name and OID, which pgsim's registration (by OID) and "
    "triggers do not follow"
)


def kind_of(method: str, replication: str, colocated: bool) -> tuple[str, str]:
    """What Citus made of a table (from its pg_dist_partition row), and why pgsim cannot keep it in sync."""
    if method == "h":
        return "a Citus distributed table", ON_WORKERS
    if method in ("a", "r"):
        return f"a Citus {'append' if method == 'a' else 'range'}-distributed table", ON_WORKERS
    if replication == "t":
        return "a Citus reference table", ON_WORKERS
    if colocated:
        return "a single-shard Citus distributed table", ON_WORKERS
    return "a Citus local table", MOVED


def require_not_citus_table(conn: psycopg.Connection[Any], oid: int, name: str) -> None:
    """Raise :class:`InvalidInput` when the table ``oid`` (called ``name``) is one Citus manages."""
    found = conn.execute("SELECT pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL").fetchone()
    if not found or not found[0]:
        return  # no Citus here
    row = conn.execute(CITUS_TABLE, [oid]).fetchone()
    if row is None:
        return
    kind, reason = kind_of(*row)
    raise InvalidInput(
        f"{name} is {kind}: pgsim cannot keep its embeddings in sync, because {reason}. Register a table on "
        "the coordinator that Citus does not manage, or fill a vector column of this table yourself and search "
        "it with pgvector (see pgsim's docs, search.md, 'Citus')."
    )
