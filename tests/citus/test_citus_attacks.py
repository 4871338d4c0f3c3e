"""Attacks on pgsim's Citus refusal (pgsim.db.citus): tables that Citus takes over after registration (a Citus
local table made explicitly, or implicitly by a foreign key to a reference table), tables distributed without a
shard key, schema-qualified and quoted names, distributed partitions, the SQL registration path the Alembic
offline migration renders. Runs against the coordinator of PGSIM_CITUS_DSN (as tests/citus/test_citus.py)."""

from __future__ import annotations

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

TEXTS = [
    (1, "Pesto: basil, garlic, pine nuts and olive oil."),
    (2, "Chess engines search game trees with alpha-beta pruning."),
]


@pytest.fixture
def coordinator() -> Iterator[tuple[psycopg.Connection[Any], str]]:
    with coordinator_schema("pgsim_atk") as found:
        yield found


def fill_and_sync(conn: psycopg.Connection[Any], table: str) -> list[tuple[int, bool]]:
    for key, text in TEXTS:
        conn.execute(sql.SQL("INSERT INTO {} (id, body) VALUES (%s, %s)").format(sql.Identifier(table)), [key, text])
    sync(conn, allow_superuser=True)
    return conn.execute(
        sql.SQL("SELECT id, embedding IS NOT NULL FROM {} ORDER BY id").format(sql.Identifier(table))
    ).fetchall()


def test_distributing_a_registered_table_is_refused_by_citus(coordinator: Any) -> None:
    conn, _ = coordinator
    conn.execute("CREATE TABLE t (tenant int, id int, body text, PRIMARY KEY (tenant, id))")
    add_embedding(conn, "t", "embedding", source="body")
    with pytest.raises(psycopg.Error, match="because it has triggers"):
        conn.execute("SELECT create_distributed_table('t', 'tenant')")
    with pytest.raises(psycopg.Error, match="because it has triggers"):
        conn.execute("SELECT create_reference_table('t')")


@pytest.mark.xfail(
    strict=True,
    reason="known, not fixed: a registered table Citus takes over later falls out of "
    "sync (Citus swaps its OID and renames its triggers; docs/search.md 'Citus')",
)
def test_a_registered_table_made_a_citus_local_table_stays_in_sync(coordinator: Any) -> None:
    """citus_add_local_table_to_metadata renames the table to its shard and makes a new shell table under the
    name: the registration (by OID) follows the shard, the triggers are copied to both, writes are queued, and
    the workers embed nothing: the rows stay NULL and search finds nothing, silently."""
    conn, _ = coordinator
    conn.execute("CREATE TABLE b (id int PRIMARY KEY, body text)")
    add_embedding(conn, "b", "embedding", source="body")
    before = conn.execute("SELECT 'b'::regclass::oid").fetchone()
    conn.execute("SELECT citus_add_local_table_to_metadata('b')")
    after = conn.execute("SELECT 'b'::regclass::oid").fetchone()
    assert before != after  # "b" is now a new shell table; the registered relation is the shard
    assert fill_and_sync(conn, "b") == [(1, True), (2, True)]
    assert get_registration(conn, "b", "embedding") is not None
    assert [hit.row["id"] for hit in search(conn, "b", "embedding", "an Italian sauce", k=1)] == [1]


@pytest.mark.xfail(
    strict=True,
    reason="known, not fixed: a registered table Citus takes over later falls out of "
    "sync (Citus swaps its OID and renames its triggers; docs/search.md 'Citus')",
)
def test_a_foreign_key_to_a_reference_table_does_not_silently_stop_sync(coordinator: Any) -> None:
    """A foreign key from a registered table to a Citus reference table makes the registered table a Citus
    local table on its own (citus.enable_local_reference_table_foreign_keys, on by default): no Citus function
    is called on it, and pgsim's sync of it stops."""
    conn, _ = coordinator
    conn.execute("CREATE TABLE kinds (k int PRIMARY KEY)")
    conn.execute("SELECT create_reference_table('kinds')")
    conn.execute("INSERT INTO kinds VALUES (1)")
    conn.execute("CREATE TABLE d (id int PRIMARY KEY, k int DEFAULT 1, body text)")
    add_embedding(conn, "d", "embedding", source="body")
    conn.execute("ALTER TABLE d ADD FOREIGN KEY (k) REFERENCES kinds (k)")
    managed = conn.execute(
        "SELECT count(*) FROM pg_catalog.pg_dist_partition WHERE logicalrelid = 'd'::regclass"
    ).fetchone()
    assert managed == (1,)  # Citus took the table over
    assert fill_and_sync(conn, "d") == [(1, True), (2, True)]


def test_a_single_shard_distributed_table_is_not_called_a_citus_local_table(coordinator: Any) -> None:
    """create_distributed_table(t, NULL) (and every table of a distributed schema) is a single-shard
    distributed table, whose shard is on a worker: partmethod 'n', repmodel 's', like a Citus local table."""
    conn, _ = coordinator
    conn.execute("CREATE TABLE single (id int PRIMARY KEY, body text)")
    conn.execute("SELECT create_distributed_table('single', NULL)")
    with pytest.raises(InvalidInput) as raised:
        add_embedding(conn, "single", "embedding", source="body")
    assert "is a single-shard Citus distributed table" in str(raised.value), str(raised.value)


def test_a_quoted_schema_qualified_distributed_table_is_refused(coordinator: Any) -> None:
    conn, schema = coordinator
    conn.execute('CREATE TABLE "Mixed Docs" (tenant int, id int, body text, PRIMARY KEY (tenant, id))')
    conn.execute("""SELECT create_distributed_table('"Mixed Docs"', 'tenant')""")
    name = f"{schema}.Mixed Docs"  # pgsim's schema.table form (names.table_parts)
    conn.execute("SET search_path = public")
    with pytest.raises(InvalidInput, match="is a Citus distributed table"):
        add_embedding(conn, name, "embedding", source="body")
    columns = conn.execute(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
        [sql.Identifier(schema, "Mixed Docs").as_string(conn)],
    ).fetchone()
    assert columns == (3,)


def test_a_partition_of_a_distributed_table_is_refused(coordinator: Any) -> None:
    conn, _ = coordinator
    conn.execute("CREATE TABLE parts (tenant int, id int, body text, PRIMARY KEY (tenant, id)) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE parts_low PARTITION OF parts FOR VALUES FROM (0) TO (1000)")
    conn.execute("SELECT create_distributed_table('parts', 'tenant')")
    for table in ("parts", "parts_low"):
        with pytest.raises(InvalidInput, match="Citus distributed table"):
            add_embedding(conn, table, "embedding", source="body")


def test_sql_registration_with_unsafe_triggers_on_a_distributed_table(coordinator: Any) -> None:
    """The Alembic offline path renders pgsim.register_embedding(...) itself, without pgsim.db.citus's check:
    even with citus.enable_unsafe_triggers it fails (on the temp probe view Citus handles), and nothing stays."""
    conn, _ = coordinator
    conn.execute("CREATE TABLE dist (tenant int, id int, body text, embedding public.vector(384), "
                 "PRIMARY KEY (tenant, id))")  # fmt: skip
    conn.execute("SELECT create_distributed_table('dist', 'tenant')")
    conn.execute("SET citus.enable_unsafe_triggers = on")
    from pgsim.encoding.models import DEFAULT_MODEL, model_revision

    with pytest.raises(psycopg.Error):
        conn.execute(
            "SELECT pgsim.register_embedding(target => 'dist'::regclass, column_name => 'embedding', "
            "source => 'body', model => %s, model_revision => %s, dimension => 384)",
            [DEFAULT_MODEL, model_revision(DEFAULT_MODEL)],
        )
    assert get_registration(conn, "dist", "embedding") is None
    triggers = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'dist'::regclass AND tgname LIKE 'pgsim%'"
    ).fetchone()
    assert triggers == (0,)


@pytest.mark.xfail(
    strict=True,
    reason="known, not fixed: a registered table Citus takes over later falls out of "
    "sync (Citus swaps its OID and renames its triggers; docs/search.md 'Citus')",
)
def test_a_registered_table_made_a_citus_local_table_stays_writable_after_a_sync(coordinator: Any) -> None:
    """Citus renames the shard's triggers (pgsim_<id>_insert_<shardid>) and moves the name to a new shell table:
    pgsim.forget_dropped, run by the first sync, finds no pgsim_<id>_insert on the registered OID and forgets the
    registration and its queue, while the triggers stay: every later write then fails in pgsim.enqueue."""
    conn, _ = coordinator
    conn.execute("CREATE TABLE w (id int PRIMARY KEY, body text)")
    add_embedding(conn, "w", "embedding", source="body")
    conn.execute("SELECT citus_add_local_table_to_metadata('w')")
    conn.execute("INSERT INTO w (id, body) VALUES (1, 'first')")
    sync(conn, allow_superuser=True)
    conn.execute("INSERT INTO w (id, body) VALUES (2, 'second')")  # raises: "... holds no registration ..."


def test_distributing_the_schema_of_a_registered_table_is_refused_by_citus(coordinator: Any) -> None:
    conn, schema = coordinator
    conn.execute("CREATE TABLE s (id int PRIMARY KEY, body text)")
    add_embedding(conn, "s", "embedding", source="body")
    with pytest.raises(psycopg.Error, match="trigger"):
        conn.execute("SELECT citus_schema_distribute(%s)", [schema])
    conn.execute("INSERT INTO s (id, body) VALUES (1, 'still a local table')")
    sync(conn, allow_superuser=True)
    assert conn.execute("SELECT embedding IS NOT NULL FROM s").fetchone() == (True,)
