"""Changing prefix storage on a registered column (``change_embedding(..., prefix=N)``, ``prefix=False`` for the
whole vectors; ``pgsim change-embedding --prefix``; ``op.change_embedding(..., prefix=...)`` online and offline):
the vectors stay and nothing is queued; the index is built again beside the old one and swapped in under the
old name; every search path then walks the new index for the true k rows. As the table's non-superuser owner,
searched by the application role; bad requests change nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.roles import Roles, acting
from prefix_items import MODEL, PREFIX, Item, copy_items_into_parts, create_parts, prefix_items
from psycopg import sql
from sqlalchemy import select
from sqlalchemy.orm import Session

from pgsim.alembic.change_ops import ChangeEmbeddingOp
from pgsim.columns.model_change import change_embedding
from pgsim.columns.registry import Registration
from pgsim.demo.corpus import Package
from pgsim.errors import InvalidInput
from pgsim.knn.caches import forget_plans
from pgsim.knn.filtered import search_with_plan
from pgsim.knn.planner import Tuning
from pgsim.psycopg import register

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chunks"))
from chunked_docs import engine_as  # noqa: E402

K = 10
WALK = Tuning(exact_below_rows=0, min_hnsw_selectivity=0, hnsw_ef_search=40)  # a small table: walk it anyway


@pytest.fixture(scope="module")
def table(server_dsn: str, roles: Roles, packages: list[Package]) -> Iterator[tuple[str, np.ndarray]]:
    with prefix_items(server_dsn, roles, packages, "prefix_change") as made:
        yield made


def state(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    """The registered prefix, the definitions of the table's HNSW indexes, a digest of the vectors, queued rows."""
    prefix = conn.execute("SELECT prefix FROM pgsim.embedding WHERE table_name = 'items'").fetchone()[0]
    indexes = conn.execute(
        "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_am am ON am.oid = c.relam WHERE i.indrelid = 'items'::regclass AND am.amname = 'hnsw' ORDER BY 1"
    ).fetchall()
    digest = conn.execute("SELECT md5(string_agg(embedding::text, ',' ORDER BY id)) FROM items").fetchone()[0]
    queued = conn.execute("SELECT count(*) FROM pgsim.queue").fetchone()[0]
    return prefix, [definition for (definition,) in indexes], digest, queued


def held(definitions: list[str]) -> str:
    """What the one HNSW index of ``items`` holds: ``prefix N`` or ``whole``, checked against its name."""
    (definition,) = definitions
    assert definition.startswith("CREATE INDEX items_embedding_hnsw ON public.items USING hnsw"), definition
    if "subvector" in definition:
        size = definition.split("subvector(embedding, 1, ")[1].split(")")[0]
        assert f"::vector({size})) vector_cosine_ops" in definition, definition
        return f"prefix {size}"
    assert "(embedding vector_cosine_ops)" in definition, definition
    return "whole"


def check_searches(dsn: str, roles: Roles, vectors: np.ndarray, expected_index: str) -> None:
    """pgsim.search, SQL pgsim.knn and the ORM, as the application: the walk of ``expected_index`` for the
    k rows nearest by cosine on the full vectors (at least 9 in 10 of the true ones), in true order."""
    forget_plans()  # what a process that searched before the change knows after PLAN_SECONDS
    rng = np.random.default_rng(3)
    found = 0
    engine = engine_as(dsn, roles.app)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.app), Session(engine) as session:
            register(conn)
            for _ in range(4):
                query = vectors[rng.integers(len(vectors))] + rng.normal(0, 0.05, 256).astype(np.float32)
                hits, plan = search_with_plan(conn, "items", "embedding", query, k=K, tuning=WALK)
                assert (plan.path, plan.index_name, plan.fell_back) == ("hnsw", expected_index, False), plan
                ids = [hit.row["id"] for hit in hits]
                distances = 1 - vectors[ids] @ query / np.linalg.norm(query)
                np.testing.assert_allclose([hit.distance for hit in hits], distances, atol=1e-5)
                assert len(set(ids)) == K and list(distances) == sorted(distances)
                truth = np.argsort(1 - vectors @ query / np.linalg.norm(query), kind="stable")[:K]
                found += len(set(ids) & {int(i) for i in truth})
                rows = conn.execute(
                    "SELECT (r.row->>'id')::int FROM pgsim.knn('items', 'embedding', %s, %s, NULL, "
                    "exact_below_rows => 0, min_hnsw_selectivity => 0, hnsw_ef_search => 40) AS r",
                    [query, K],
                ).fetchall()
                assert [r[0] for r in rows] == ids
                orm = session.scalars(
                    select(Item).order_by(Item.embedding.nearest(query)).limit(K).execution_options(pgsim_tuning=WALK)
                ).all()
                assert [item.id for item in orm] == ids
    finally:
        engine.dispose()
    assert found >= 0.9 * 4 * K


def test_a_prefix_change_rebuilds_the_index_only_and_every_path_walks_it(
    table: tuple[str, np.ndarray], roles: Roles
) -> None:
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        prefix, indexes, digest, queued = state(conn)
        assert (prefix, held(indexes), queued) == (PREFIX, "prefix 64", 0)
        steps: list[tuple[int | bool, int | None, str]] = [(128, 128, "prefix 128"), (False, None, "whole"),
                                                           (PREFIX, PREFIX, "prefix 64")]  # fmt: skip
        for asked, registered, holds in steps:
            changed = change_embedding(conn, "items", "embedding", prefix=asked)
            assert isinstance(changed, Registration)
            assert (changed.column, changed.prefix, changed.index_name) == ("embedding", registered,
                                                                            "items_embedding_hnsw")  # fmt: skip
            now = state(conn)
            # the vectors are the same, nothing was queued, and one index (the old name) holds the new prefix
            assert (now[0], held(now[1]), now[2], now[3]) == (registered, holds, digest, 0), asked
            check_searches(dsn, roles, vectors, "items_embedding_hnsw")


def test_the_command_line_changes_the_prefix(table: tuple[str, np.ndarray], roles: Roles) -> None:
    dsn, _ = table
    owner_dsn = psycopg.conninfo.make_conninfo(dsn, options=f"-c role={roles.owner}")  # the owner, from the start
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def pgsim(*arguments: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "pgsim.cli", "--dsn", owner_dsn, "change-embedding", "items", "embedding"]
        return subprocess.run([*command, *arguments], capture_output=True, text=True, env=environment, timeout=300)

    done = pgsim("--prefix", "128")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "the index of public.items.embedding now holds the first 128 of each vector's 256 values; nothing was "
        "re-embedded\n"
    )
    refused = pgsim("--prefix", "100")
    assert refused.returncode != 0 and "was trained for prefixes of 64, 128" in refused.stderr
    done = pgsim("--prefix", "none")
    assert done.returncode == 0 and "now holds the whole vectors; nothing" in done.stdout, done.stdout + done.stderr
    done = pgsim("--prefix", "64")
    assert done.returncode == 0, done.stderr
    with psycopg.connect(dsn) as conn:
        assert held(state(conn)[1]) == "prefix 64"


def test_alembic_changes_the_prefix_online_and_offline(table: tuple[str, np.ndarray], roles: Roles) -> None:
    """The offline DO block (as --sql renders it) and the online apply make the same change; each does
    nothing when the prefix is as asked already."""
    from pgsim.alembic.change_ops import apply_change

    dsn, vectors = table
    offline = ChangeEmbeddingOp("items", "embedding", model=MODEL, prefix=128).offline_statement().as_string(None)
    whole = ChangeEmbeddingOp("items", "embedding", prefix=False).offline_statement().as_string(None)
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        digest = state(conn)[2]
        for statement, holds in ((offline, "prefix 128"), (offline, "prefix 128"), (whole, "whole")):
            conn.execute(statement)
            now = state(conn)
            assert (held(now[1]), now[2], now[3]) == (holds, digest, 0)
        assert state(conn)[0] is None
    with psycopg.connect(dsn) as conn, acting(conn, roles.owner):  # as a migration runs: in its transaction
        for _ in range(2):  # the second time, the prefix is as asked already: nothing
            apply_change(conn, ChangeEmbeddingOp("items", "embedding", prefix=PREFIX))
            conn.commit()
            assert (state(conn)[0], held(state(conn)[1])) == (PREFIX, "prefix 64")
    check_searches(dsn, roles, vectors, "items_embedding_hnsw")
    with pytest.raises(InvalidInput, match="was trained for prefixes"):
        ChangeEmbeddingOp("items", "embedding", model=MODEL, prefix=100).offline_statement()
    with pytest.raises(InvalidInput, match="needs model="):  # SQL cannot read the model's trained sizes
        ChangeEmbeddingOp("items", "embedding", prefix=100).offline_statement()


@pytest.mark.parametrize(
    ("prefix", "refused"),
    [
        (64, "nothing to change"),
        (100, "was trained for prefixes of 64, 128 dimensions"),
        (256, "not shorter than"),
        (0, "positive number of dimensions"),
        (True, "positive number of dimensions"),
        ("128", "positive number of dimensions"),
        (128.0, "positive number of dimensions"),
    ],
)
def test_bad_prefix_changes_change_nothing(
    table: tuple[str, np.ndarray], roles: Roles, prefix: Any, refused: str
) -> None:
    dsn, _ = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        before = state(conn)
        with pytest.raises(InvalidInput, match=refused):
            change_embedding(conn, "items", "embedding", prefix=prefix)
        assert state(conn) == before


def test_only_the_tables_owner_changes_the_prefix(table: tuple[str, np.ndarray], roles: Roles) -> None:
    dsn, _ = table
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = state(conn)
        for role in (roles.app, roles.worker):
            with acting(conn, role), pytest.raises((psycopg.Error, InvalidInput)):
                change_embedding(conn, "items", "embedding", prefix=128)
        assert state(conn) == before


def test_a_change_in_progress_or_a_wrong_kind_of_column_is_refused(table: tuple[str, np.ndarray], roles: Roles) -> None:
    """While a re-embedding fills ``embedding_next``, the prefix waits (a change of the model and the prefix
    together is one re-embedding instead); a halfvec column takes no prefix; a staging index left by an
    interrupted change is replaced."""
    dsn, _ = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        try:
            conn.execute("INSERT INTO notes SELECT g, 'note number ' || g FROM generate_series(1, 12) g")
            change_embedding_on_notes(conn)
        finally:
            conn.execute("DROP TABLE notes")
            conn.execute("DELETE FROM pgsim.queue")


def change_embedding_on_notes(conn: psycopg.Connection[Any]) -> None:
    from pgsim.columns.adding import add_embedding
    from pgsim.columns.registry import remove_embedding
    from pgsim.columns.worker import sync

    add_embedding(conn, "notes", "embedding", source="body", model=MODEL, prefix=PREFIX)
    sync(conn, table="notes", allow_superuser=True)
    change_embedding(conn, "notes", "embedding", source=sql.SQL("upper(body)"))  # a re-embedding under way
    with pytest.raises(InvalidInput, match="under way .*embedding_next"):
        change_embedding(conn, "notes", "embedding", prefix=128)
    remove_embedding(conn, "notes", "embedding_next")  # cancelled
    # a change of model (or source) and prefix together: the new column is registered with the new prefix
    new = change_embedding(conn, "notes", "embedding", source=sql.SQL("upper(body)"), prefix=128)
    assert (new.column, new.prefix) == ("embedding_next", 128)
    sync(conn, table="notes", allow_superuser=True)
    sync(conn, table="notes", allow_superuser=True)
    assert conn.execute("SELECT column_name, prefix FROM pgsim.embedding WHERE table_name = 'notes'").fetchall() == [
        ("embedding", 128)
    ]
    assert conn.execute("SELECT pgsim.prefix_index('notes', 'embedding')").fetchone() == ("notes_embedding_hnsw",)
    # an interrupted change left its staging index: the next change replaces it
    conn.execute("CREATE INDEX notes_embedding_hnsw_prefix ON notes (id)")
    change_embedding(conn, "notes", "embedding", prefix=False)
    names = conn.execute("SELECT relname FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
                         "WHERE i.indrelid = 'notes'::regclass ORDER BY 1").fetchall()  # fmt: skip
    assert names == [("notes_embedding_hnsw",), ("notes_pkey",)]
    assert conn.execute("SELECT pgsim.prefix_index('notes', 'embedding')").fetchone() == (None,)
    hits, plan = search_with_plan(conn, "notes", "embedding", "note number 3", k=3, tuning=WALK)
    assert len(hits) == 3 and plan.index_name == "notes_embedding_hnsw"
    remove_embedding(conn, "notes", "embedding")
    add_embedding(conn, "notes", "embedding", source="body", dtype="halfvec")
    with pytest.raises(InvalidInput, match="keeps a vector column"):
        change_embedding(conn, "notes", "embedding", prefix=64)


def test_the_staging_name_never_takes_another_tables_object_or_the_live_index(
    table: tuple[str, np.ndarray], roles: Roles
) -> None:
    """An index of another table holds the first staging name, and the column's registered index holds the
    second: online and offline, both stay, and the change builds under a third name."""
    from pgsim.alembic.change_ops import apply_change

    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        conn.execute("CREATE TABLE other (id int)")
        conn.execute("CREATE INDEX items_embedding_hnsw_prefix ON other (id)")
        conn.execute("ALTER INDEX items_embedding_hnsw RENAME TO items_embedding_hnsw_prefix1")
        conn.execute(
            "UPDATE pgsim.embedding SET index_name = 'items_embedding_hnsw_prefix1' WHERE table_name = 'items'"
        )
        try:
            change_embedding(conn, "items", "embedding", prefix=128)
            offline = ChangeEmbeddingOp("items", "embedding", model=MODEL, prefix=PREFIX).offline_statement()
            conn.execute(offline.as_string(None))
            apply_change(conn, ChangeEmbeddingOp("items", "embedding", prefix=128))
            indexes = conn.execute(
                "SELECT indrelid::regclass::text, indexrelid::regclass::text FROM pg_index "
                "WHERE indrelid IN ('items'::regclass, 'other'::regclass) AND NOT indisprimary ORDER BY 2"
            ).fetchall()
            assert indexes == [("other", "items_embedding_hnsw_prefix"), ("items", "items_embedding_hnsw_prefix1")]
            assert conn.execute("SELECT pgsim.prefix_index('items', 'embedding')").fetchone() == (
                "items_embedding_hnsw_prefix1",
            )
        finally:
            conn.execute("DROP TABLE other")
            conn.execute("ALTER INDEX items_embedding_hnsw_prefix1 RENAME TO items_embedding_hnsw")
            conn.execute("UPDATE pgsim.embedding SET index_name = 'items_embedding_hnsw' WHERE table_name = 'items'")
            change_embedding(conn, "items", "embedding", prefix=PREFIX)
    with psycopg.connect(dsn) as conn:
        assert (state(conn)[0], held(state(conn)[1])) == (PREFIX, "prefix 64")


def test_a_reader_that_keeps_the_table_locked_leaves_everything_as_it_was(
    table: tuple[str, np.ndarray], roles: Roles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropping the old index waits for a transaction that read the table: each try waits a bounded time, and
    when every try has, the change says so and changes nothing (its new index, which the reader's lock keeps
    from being dropped too, is named; the next change replaces it)."""
    from pgsim.columns import prefix_change

    monkeypatch.setattr(prefix_change, "SWAP_TRIES", 2)
    monkeypatch.setattr(prefix_change, "SWAP_LOCK_TIMEOUT", "200ms")
    dsn, _ = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner), psycopg.connect(dsn) as reader:
        before = state(conn)
        with acting(reader, roles.app):
            reader.execute("SELECT count(*) FROM items").fetchone()  # its transaction stays open
            with pytest.raises(InvalidInput, match="could not be swapped: queries kept the table locked") as refused:
                change_embedding(conn, "items", "embedding", prefix=128)
            reader.rollback()
        assert "the new index items_embedding_hnsw_prefix, left behind" in str(refused.value)
        prefix, indexes, digest, queued = state(conn)
        assert (prefix, indexes[0], digest, queued) == (before[0], before[1][0], before[2], before[3])
        change_embedding(conn, "items", "embedding", prefix=128)  # the table is free: it goes through
        change_embedding(conn, "items", "embedding", prefix=PREFIX)
        assert state(conn) == before


def test_a_partitioned_tables_prefix_changes_on_every_partition(table: tuple[str, np.ndarray], roles: Roles) -> None:
    from pgsim.columns.adding import add_embedding

    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        create_parts(conn)
        try:
            add_embedding(conn, "parts", "embedding", source="body", model=MODEL, prefix=PREFIX, queue_existing=False)
            copy_items_into_parts(conn)
            change_embedding(conn, "parts", "embedding", prefix=128)  # autocommit: built without CONCURRENTLY
            definitions = conn.execute(
                "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid IN "
                "('parts'::regclass, 'parts_a'::regclass, 'parts_b'::regclass) AND NOT indisprimary"
            ).fetchall()
            assert len(definitions) == 3 and all("subvector(embedding, 1, 128)" in d for (d,) in definitions)
            forget_plans()
            query = vectors[900] + 0.01
            hits, plan = search_with_plan(conn, "parts", "embedding", query, k=K, tuning=WALK)
            truth = np.argsort(1 - vectors @ query / np.linalg.norm(query), kind="stable")[:K]
            assert plan.index_name == "parts_embedding_hnsw" and not plan.fell_back
            assert len({hit.row["id"] for hit in hits} & {int(i) for i in truth}) >= 9
        finally:
            conn.execute("DROP TABLE parts")
            conn.execute("DELETE FROM pgsim.queue")
