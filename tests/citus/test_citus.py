"""pgsim on a Citus cluster: installed on the coordinator, a table there that Citus does not manage is kept in
sync and searched as anywhere, and a table Citus distributes or replicates is refused before anything changes
(pgsim.db.citus says why).

Runs when ``PGSIM_CITUS_DSN`` reaches a Citus coordinator (a superuser DSN of a database with the ``citus``
extension and its worker nodes added; docs/development.md says how one was built here from Citus's source
against the embedded server); without it there is nothing to run against, and the module is skipped."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgsim.columns.adding import add_embedding
from pgsim.columns.registry import get_registration
from pgsim.columns.worker import sync
from pgsim.db.schema import install
from pgsim.errors import InvalidInput
from pgsim.knn.filtered import search
from pgsim.psycopg import register

CITUS_DSN = os.environ.get("PGSIM_CITUS_DSN")
if not CITUS_DSN:
    pytest.skip("PGSIM_CITUS_DSN is not set: no Citus coordinator to test against", allow_module_level=True)


@pytest.fixture(scope="module")
def coordinator() -> Iterator[psycopg.Connection[Any]]:
    """The coordinator, pgsim installed, with a schema of this module's own (dropped at the end)."""
    assert CITUS_DSN is not None
    with psycopg.connect(CITUS_DSN, autocommit=True) as conn:
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'citus'").fetchone()
        assert version is not None, "PGSIM_CITUS_DSN reaches a database without the citus extension"
        workers = conn.execute("SELECT count(*) FROM pg_catalog.citus_get_active_worker_nodes()").fetchone()
        assert workers is not None and workers[0] >= 1, "the Citus coordinator has no worker nodes"
        install(conn)
        register(conn)
        schema = f"pgsim_citus_{uuid.uuid4().hex[:8]}"
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path = {}, public").format(sql.Identifier(schema)))
        try:
            yield conn
        finally:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def columns_of(conn: psycopg.Connection[Any], table: str) -> list[str]:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
        "ORDER BY attnum",
        [table],
    ).fetchall()
    return [name for (name,) in rows]


def test_a_table_on_the_coordinator_is_kept_in_sync_and_searched(coordinator: Any) -> None:
    coordinator.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    add_embedding(coordinator, "notes", "embedding", source="body")
    coordinator.execute(
        "INSERT INTO notes VALUES (1, 'Pesto: basil, garlic, pine nuts and olive oil.'), "
        "(2, 'Chess engines search game trees with alpha-beta pruning.'), (3, 'Rowing on a cold river at dawn.')"
    )
    assert sync(coordinator, table="notes", allow_superuser=True).embedded == 3
    hits = search(coordinator, "notes", "embedding", "an Italian sauce", k=2)
    assert [hit.row["id"] for hit in hits][0] == 1 and len(hits) == 2


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        ("SELECT create_distributed_table('{table}', 'tenant')", "Citus distributed table"),
        ("SELECT create_reference_table('{table}')", "Citus reference table"),
    ],
)
def test_a_table_citus_manages_is_refused_before_anything_changes(coordinator: Any, make: str, kind: str) -> None:
    table = f"docs_{uuid.uuid4().hex[:6]}"
    coordinator.execute(
        sql.SQL("CREATE TABLE {} (tenant int, id int, body text, PRIMARY KEY (tenant, id))").format(
            sql.Identifier(table)
        )
    )
    coordinator.execute(make.format(table=table))
    with pytest.raises(InvalidInput, match=f"is a {kind}: pgsim cannot keep its embeddings in sync"):
        add_embedding(coordinator, table, "embedding", source="body")
    assert columns_of(coordinator, table) == ["tenant", "id", "body"]
    assert get_registration(coordinator, table, "embedding") is None
    coordinator.execute(sql.SQL("INSERT INTO {} VALUES (1, 1, 'still writable')").format(sql.Identifier(table)))
