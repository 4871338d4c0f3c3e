"""pgsim on a Citus cluster: installed on the coordinator, a table there that Citus does not manage is kept in
sync and searched as anywhere, and a table Citus distributes or replicates is refused before anything changes
(pgsim.db.citus says why).

Runs when ``PGSIM_CITUS_DSN`` reaches a Citus coordinator (a superuser DSN of a database with the ``citus``
extension and its worker nodes added; docs/development.md says how one was built here from Citus's source
against the embedded server); without it there is nothing to run against, and the module is skipped."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from citus_cluster import CITUS_DSN, SKIP_REASON, coordinator_schema
from psycopg import sql

from pgsim.columns.adding import add_embedding
from pgsim.columns.registry import get_registration
from pgsim.columns.worker import sync
from pgsim.errors import InvalidInput
from pgsim.knn.filtered import search

if not CITUS_DSN:
    pytest.skip(SKIP_REASON, allow_module_level=True)


@pytest.fixture(scope="module")
def coordinator() -> Iterator[psycopg.Connection[Any]]:
    with coordinator_schema("pgsim_citus") as (conn, _):
        yield conn


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
