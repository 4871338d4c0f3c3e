"""Citus: a table that Citus distributes (or replicates to every node) cannot be registered.

pgsim keeps a column in sync with row triggers that queue the row in ``pgsim.queue``. On a Citus table those
triggers would run on the worker nodes, inside each shard's statement, where pgsim's queue and registry (tables
on the coordinator) are not: Citus refuses such triggers, and with ``citus.enable_unsafe_triggers`` every
write to the table would fail instead. So registration refuses the table first, with what to do instead
(docs/search.md, "Citus"). Tables on the coordinator that Citus does not manage are registered as anywhere.
"""

from __future__ import annotations

from typing import Any

import psycopg

from pgsim.errors import InvalidInput

# pg_dist_partition.partmethod: 'h' hash-distributed; 'n' a reference table (replicated to every node, repmodel
# 't') or a Citus local table (kept on the coordinator but in Citus's metadata); 'a'/'r' the old append/range.
KINDS = {
    "h": "a Citus distributed table",
    "a": "a Citus append-distributed table",
    "r": "a Citus range-distributed table",
}
CITUS_TABLE = """
SELECT p.partmethod::pg_catalog.text, p.repmodel::pg_catalog.text
FROM pg_catalog.pg_dist_partition AS p
WHERE p.logicalrelid OPERATOR(pg_catalog.=) %s::pg_catalog.oid
"""


def require_not_citus_table(conn: psycopg.Connection[Any], oid: int, name: str) -> None:
    """Raise :class:`InvalidInput` when the table ``oid`` (called ``name``) is one Citus manages."""
    found = conn.execute("SELECT pg_catalog.to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL").fetchone()
    if not found or not found[0]:
        return  # no Citus here
    row = conn.execute(CITUS_TABLE, [oid]).fetchone()
    if row is None:
        return
    method, replication = row
    kind = KINDS.get(method) or ("a Citus reference table" if replication == "t" else "a Citus local table")
    raise InvalidInput(
        f"{name} is {kind}: pgsim cannot keep its embeddings in sync, because its row triggers would run on the "
        "Citus worker nodes, where pgsim's queue (on the coordinator) is not. Register a table on the coordinator "
        "that Citus does not manage, or fill a vector column of this table yourself and search it with pgvector "
        "(see pgsim's docs, search.md, 'Citus')."
    )
