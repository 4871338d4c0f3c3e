"""Attacks on Matryoshka prefix storage (``add_embedding(..., prefix=64)``): the k-rows contract, true cosine
order and distances on every path (pgsim.search, pgsim.knn, the ORM), the exact scan whenever the prefix index
is missing or replaced, indexes that only look like it, odd names, the registry's SECURITY DEFINER reader,
lifecycle and Alembic. On the real server and model, as a non-superuser owner."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.roles import Roles, acting
from prefix_items import MODEL, PREFIX, Item, copy_items_into_parts, create_parts, prefix_items
from psycopg import sql
from sql_walk import walk_knn
from sqlalchemy import select
from sqlalchemy.orm import Session

from pgsim.columns.adding import add_embedding
from pgsim.columns.model_change import change_embedding, change_model
from pgsim.demo.corpus import Package
from pgsim.errors import InvalidInput
from pgsim.knn.caches import forget_plans
from pgsim.knn.filtered import search_with_plan
from pgsim.knn.planner import Tuning
from pgsim.psycopg import register

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chunks"))
from chunked_docs import engine_as  # noqa: E402

K = 10
WALK = Tuning(exact_below_rows=0, min_hnsw_selectivity=0, hnsw_ef_search=40)
EXACT = Tuning(exact_below_rows=1e12)


@pytest.fixture(scope="module")
def table(server_dsn: str, roles: Roles, packages: list[Package]) -> Iterator[tuple[str, np.ndarray]]:
    with prefix_items(server_dsn, roles, packages, "prefix_attacks") as made:
        yield made


def exact_nearest(vectors: np.ndarray, query: np.ndarray, keep: Any = lambda i: True, k: int = K) -> list[float]:
    distance = 1 - vectors @ query / np.linalg.norm(query)
    return [float(distance[i]) for i in np.argsort(distance, kind="stable") if keep(int(i))][:k]


def check_true(
    hits: Any, vectors: np.ndarray, query: np.ndarray, keep: Any = lambda i: True, k: int = K, recall: float = 0.8
) -> None:
    """k rows (or all that pass), passing the filter, with their true cosine distances, in order, and near the
    true top k (the walk is approximate: recall, not exactness)."""
    check_rows([(hit.row["id"], hit.distance) for hit in hits], vectors, query, keep, k, recall)


def check_rows(
    rows: Any, vectors: np.ndarray, query: np.ndarray, keep: Any = lambda i: True, k: int = K, recall: float = 0.8
) -> None:
    ids = [int(i) for i, _ in rows]
    expected = exact_nearest(vectors, query, keep, k)
    assert len(ids) == len(expected) == len(set(ids)), (len(ids), len(expected))
    assert all(keep(i) for i in ids)
    true = 1 - vectors[ids] @ query / np.linalg.norm(query)
    np.testing.assert_allclose([d for _, d in rows], true, atol=1e-5)
    assert [d for _, d in rows] == sorted(d for _, d in rows)
    if expected:
        found = sum(1 for d in true if d <= expected[-1] + 1e-6)
        assert found / len(expected) >= recall, (found, len(expected))


def orm_rows(dsn: str, role: str, query: np.ndarray, limit: int = K, offset: int = 0, where: Any = None) -> list:
    engine = engine_as(dsn, role)
    try:
        with Session(engine) as session:
            statement = select(Item.id, Item.embedding.nearest(query)).order_by(Item.embedding.nearest(query))
            if where is not None:
                statement = statement.where(where)
            statement = statement.limit(limit).offset(offset).execution_options(pgsim_tuning=WALK)
            return [(int(i), float(d)) for i, d in session.execute(statement).all()]
    finally:
        engine.dispose()


@contextmanager
def prefixed(conn: psycopg.Connection[Any], name: str, column: str = "embedding", schema: str | None = None):
    """For the block: a registered prefix-storage copy of items' rows, ``[schema.]name`` (id, body, column)."""
    target = sql.Identifier(schema, name) if schema else sql.Identifier(name)
    if schema:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(target))
    try:
        add_embedding(conn, f"{schema}.{name}" if schema else name, column, source="body", model=MODEL,
                      prefix=PREFIX, queue_existing=False)  # fmt: skip
        conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(target))
        conn.execute(sql.SQL("INSERT INTO {} (id, body, {}) SELECT id, body, embedding FROM public.items")
                     .format(target, sql.Identifier(column)))  # fmt: skip
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(target))
        conn.execute(sql.SQL("ANALYZE {}").format(target))
        forget_plans()
        yield target.as_string(conn)
    finally:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(target))
        if schema:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        conn.execute("DELETE FROM pgsim.queue")
        forget_plans()


# ---- a query whose prefix has no direction ----


@pytest.mark.parametrize("path", ["search", "knn", "orm"])
def test_a_query_with_an_all_zero_prefix_gives_the_true_rows(table: Any, roles: Roles, path: str) -> None:
    """Its first 64 values have no direction, so no prefix distance: the walk yields nothing (a condition on
    the query's prefix), and the exact scan gives the true rows (a walk by NaN distances gave arbitrary ones)."""
    dsn, vectors = table
    query = vectors[42].copy()
    query[:PREFIX] = 0  # a valid query (non-zero), whose prefix is the zero vector
    if path == "orm":
        check_rows(orm_rows(dsn, roles.app, query), vectors, query)
        return
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.app):
        register(conn)
        forget_plans()
        if path == "search":
            hits, plan = search_with_plan(conn, "items", "embedding", query, k=K, tuning=WALK)
            check_true(hits, vectors, query)
        else:
            check_rows(walk_knn(conn, "items", "embedding", query), vectors, query)


# ---- the k-rows contract ----


@pytest.mark.parametrize("where", ["id % 50 = 0", "id % 300 = 7", "id < 30", "id = 5", "false"])
def test_a_narrow_filter_forced_onto_the_walk_still_gives_k_true_rows(table: Any, roles: Roles, where: str) -> None:
    dsn, vectors = table
    keep = {"id % 50 = 0": lambda i: i % 50 == 0, "id % 300 = 7": lambda i: i % 300 == 7, "id < 30": lambda i: i < 30,
            "id = 5": lambda i: i == 5, "false": lambda i: False}[where]  # fmt: skip
    rng = np.random.default_rng(3)
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.app):
        register(conn)
        for _ in range(2):
            query = vectors[rng.integers(len(vectors))] + rng.normal(0, 0.05, 256).astype(np.float32)
            expected = exact_nearest(vectors, query, keep)
            hits, plan = search_with_plan(conn, "items", "embedding", query, k=K, where=sql.SQL(where), tuning=WALK)
            assert len(hits) == len(expected), plan
            check_true(hits, vectors, query, keep)
            rows = walk_knn(conn, "items", "embedding", query, where=where)
            check_rows(rows, vectors, query, keep)


@pytest.mark.parametrize("k", [41, 500, 2400, 3000])
def test_k_beyond_the_candidates_and_the_rows(table: Any, roles: Roles, k: int) -> None:
    dsn, vectors = table
    query = vectors[17] + 0.01
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.app):
        register(conn)
        hits, plan = search_with_plan(conn, "items", "embedding", query, k=k, tuning=WALK)
        assert len(hits) == min(k, len(vectors)), plan
        # k >= ef_search: the walk yields 4k candidates (2k recalled about 0.76 at k=41)
        check_true(hits, vectors, query, k=k, recall=0.9)
        rows = walk_knn(conn, "items", "embedding", query, k=k)
        assert len(rows) == min(k, len(vectors))
        check_rows(rows, vectors, query, k=k, recall=0.9)


def test_rows_with_null_embeddings_never_come_back(table: Any, roles: Roles) -> None:
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn:
        register(conn)
        with acting(conn, roles.owner):
            conn.execute("ALTER TABLE items DISABLE TRIGGER USER")
            conn.execute(
                "INSERT INTO items (id, section, body) SELECT g, 'n', 'x' FROM generate_series(90000, 90300) g"
            )
            conn.execute("ALTER TABLE items ENABLE TRIGGER USER")
            conn.execute("ANALYZE items")
        try:
            with acting(conn, roles.app):
                for where, keep in ((None, lambda i: True), ("id >= 2395", lambda i: 2395 <= i < 90000)):
                    hits, plan = search_with_plan(conn, "items", "embedding", vectors[2397], k=K,
                                                  where=sql.SQL(where) if where else None, tuning=WALK)  # fmt: skip
                    expected = exact_nearest(vectors, vectors[2397], keep)
                    assert len(hits) == len(expected), plan
                    check_true(hits, vectors, vectors[2397], keep)
                    rows = walk_knn(conn, "items", "embedding", vectors[2397], where=where)
                    assert [i for i, _ in rows] == [h.row["id"] for h in hits]
        finally:
            with acting(conn, roles.owner):
                conn.execute("DELETE FROM items WHERE id >= 90000")
                conn.execute("DELETE FROM pgsim.queue")
                conn.execute("ANALYZE items")


@pytest.mark.parametrize(("limit", "offset"), [(10, 0), (10, 75), (30, 60), (5, 2396)])
def test_orm_limit_and_offset_agree_with_pgsim_search(table: Any, roles: Roles, limit: int, offset: int) -> None:
    """The ORM's slice is pgsim.search's k = limit + offset rows, sliced: the same walk, the same re-rank."""
    dsn, vectors = table
    query = vectors[300] + 0.02
    rows = orm_rows(dsn, roles.app, query, limit=limit, offset=offset, where=Item.id % 2 == 0)
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.app):
        register(conn)
        hits, plan = search_with_plan(conn, "items", "embedding", query, k=limit + offset, where=sql.SQL("id % 2 = 0"),
                                      tuning=WALK)  # fmt: skip
    assert len(rows) == len(hits[offset:]), plan
    np.testing.assert_allclose([d for _, d in rows], [h.distance for h in hits[offset:]], atol=1e-5)
    true = 1 - vectors[[i for i, _ in rows]] @ query / np.linalg.norm(query)
    np.testing.assert_allclose([d for _, d in rows], true, atol=1e-5)


# ---- the index dropped, replaced or renamed under a cached plan; decoys ----


@pytest.mark.parametrize(
    "change",
    [
        "DROP INDEX {index}",
        "DROP INDEX {index}; CREATE INDEX {index} ON {table} USING hnsw "
        "((subvector(embedding, 1, 128)::vector(128)) vector_cosine_ops) WITH (m = 4, ef_construction = 8)",
        "DROP INDEX {index}; CREATE INDEX {index} ON {table} USING hnsw "
        "((l2_normalize(subvector(embedding, 1, 64))::vector(64)) vector_cosine_ops) WITH (m = 4, ef_construction = 8)",
        "DROP INDEX {index}; CREATE INDEX {index} ON {table} USING hnsw "
        "((subvector(embedding, 1, 64)::vector(64)) vector_cosine_ops) WITH (m = 4, ef_construction = 8) "
        "WHERE id < 100",
        "ALTER INDEX {index} RENAME TO zz_renamed",
        "UPDATE pgsim.embedding SET prefix = 128 WHERE column_name = 'embedding' AND table_name = 'stale'",
    ],
)
def test_a_cached_prefix_plan_after_the_index_changes_gives_true_rows(table: Any, roles: Roles, change: str) -> None:
    dsn, vectors = table
    query = vectors[11] + np.random.default_rng(2).normal(0, 0.05, 256).astype(np.float32)
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        with prefixed(conn, "stale") as ident:
            index = conn.execute("SELECT pgsim.prefix_index(%s, 'embedding')", [ident]).fetchone()[0]
            assert index is not None
            hits, plan = search_with_plan(conn, "stale", "embedding", query, k=K, tuning=WALK)
            assert (plan.path, plan.candidates) == ("hnsw", 80), plan  # twice the walk's ef_search
            for statement in change.format(index=index, table=ident).split("; "):
                conn.execute(statement)
            hits, plan = search_with_plan(conn, "stale", "embedding", query, k=K, tuning=WALK)  # cached plan
            check_true(hits, vectors, query)
            for where in (None, "id % 2 = 1"):  # the query's copies are odd: a filter they pass
                rows = walk_knn(conn, ident, "embedding", query, where=where)
                keep = (lambda i: True) if where is None else (lambda i: i % 2 == 1)
                check_rows(rows, vectors, query, keep)
            forget_plans()
            hits, plan = search_with_plan(conn, "stale", "embedding", query, k=K, tuning=WALK)
            check_true(hits, vectors, query)


def test_decoys_named_first_do_not_mask_the_real_prefix_index(table: Any, roles: Roles) -> None:
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        with prefixed(conn, "masked") as ident:
            conn.execute(f"CREATE INDEX a1 ON {ident} USING hnsw ((l2_normalize(subvector(embedding, 1, 64))"
                         "::vector(64)) vector_cosine_ops) WITH (m = 4, ef_construction = 8)")  # fmt: skip
            conn.execute(f"CREATE INDEX a2 ON {ident} USING hnsw ((subvector(embedding, 1, 64)::vector(64)) "
                         "vector_l2_ops) WITH (m = 4, ef_construction = 8)")  # fmt: skip
            conn.execute(f"CREATE INDEX a3 ON {ident} USING hnsw ((subvector(embedding, 2, 64)::vector(64)) "
                         "vector_cosine_ops) WITH (m = 4, ef_construction = 8)")  # fmt: skip
            assert conn.execute("SELECT pgsim.prefix_index(%s, 'embedding')", [ident]).fetchone() == (
                "masked_embedding_hnsw",
            )
            query = vectors[4] + 0.01
            hits, plan = search_with_plan(conn, "masked", "embedding", query, k=K, tuning=WALK)
            assert (plan.path, plan.index_name) == ("hnsw", "masked_embedding_hnsw"), plan
            check_true(hits, vectors, query)
            check_rows(walk_knn(conn, ident, "embedding", query), vectors, query)


def test_a_partial_plain_cosine_index_does_not_break_the_prefix_column(table: Any, roles: Roles) -> None:
    """A partial cosine index on the full column: rows true whichever index the plan picks."""
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        with prefixed(conn, "part") as ident:
            conn.execute(f"CREATE INDEX part_small ON {ident} USING hnsw (embedding vector_cosine_ops) WHERE id < 500")
            query = vectors[7] + 0.01
            for where, keep in ((None, lambda i: True), ("id < 300", lambda i: i < 300)):
                hits, plan = search_with_plan(conn, "part", "embedding", query, k=K,
                                              where=sql.SQL(where) if where else None, tuning=WALK)  # fmt: skip
                check_true(hits, vectors, query, keep)
                rows = walk_knn(conn, ident, "embedding", query, where=where)
                check_rows(rows, vectors, query, keep)


def test_a_partial_plain_cosine_index_does_not_hide_the_prefix_index(table: Any, roles: Roles) -> None:
    """A partial cosine index (as index-advise suggests) serves the filters that imply its predicate; every
    other search walks the prefix index (it scanned exactly, warning that the prefix index was missing)."""
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        with prefixed(conn, "hidden_by") as ident:
            conn.execute(f"CREATE INDEX hidden_by_small ON {ident} USING hnsw (embedding vector_cosine_ops) "
                         "WHERE id < 500")  # fmt: skip
            hits, plan = search_with_plan(conn, "hidden_by", "embedding", vectors[7] + 0.01, k=K, tuning=WALK)
            check_true(hits, vectors, vectors[7] + 0.01)
            assert (plan.path, plan.index_name, plan.candidates) == ("hnsw", "hidden_by_embedding_hnsw", 80), plan
            # a filter that implies the partial index's predicate walks it, a plain cosine index: no re-rank
            hits, plan = search_with_plan(conn, "hidden_by", "embedding", vectors[7] + 0.01, k=K, tuning=WALK,
                                          where=sql.SQL("id < 500 AND id % 2 = 1"))  # fmt: skip
            check_true(hits, vectors, vectors[7] + 0.01, lambda i: i < 500 and i % 2 == 1)
            assert (plan.path, plan.index_name, plan.candidates) == ("hnsw", "hidden_by_small", None), plan


# ---- names and schemas ----


@pytest.mark.parametrize(
    ("name", "column", "schema"),
    [('we"ird; --', 'Emb"ed ding', None), ("Mixed", "Vec", None), ("hidden", "embedding", "Other s")],
)
def test_odd_names_and_schemas_with_prefix_storage(
    table: Any, roles: Roles, name: str, column: str, schema: str | None
) -> None:
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        with prefixed(conn, name, column, schema) as ident:
            assert conn.execute("SELECT pgsim.prefix_index(%s, %s)", [ident, column]).fetchone()[0] is not None
            query = vectors[31] + 0.01
            hits, plan = search_with_plan(conn, f"{schema}.{name}" if schema else name, column, query, k=K, tuning=WALK)
            assert plan.path == "hnsw" and plan.candidates == 80, plan
            check_true(hits, vectors, query)
            rows = walk_knn(conn, ident, column, query, where="id % 2 = 1")
            check_rows(rows, vectors, query, lambda i: i % 2 == 1)


def test_prefix_storage_on_a_partitioned_table(table: Any, roles: Roles) -> None:
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        create_parts(conn)
        try:
            try:
                add_embedding(conn, "parts", "embedding", source="body", model=MODEL, prefix=PREFIX,
                              queue_existing=False)  # fmt: skip
            except InvalidInput:
                return  # refused clearly: fine
            copy_items_into_parts(conn)
            conn.execute("ANALYZE parts")
            forget_plans()
            query = vectors[900] + 0.01
            for where, keep in ((None, lambda i: True), ("id >= 1200", lambda i: i >= 1200)):
                hits, plan = search_with_plan(conn, "parts", "embedding", query, k=K,
                                              where=sql.SQL(where) if where else None, tuning=WALK)  # fmt: skip
                check_true(hits, vectors, query, keep)
                rows = walk_knn(conn, "parts", "embedding", query, where=where)
                check_rows(rows, vectors, query, keep)
        finally:
            conn.execute("DROP TABLE parts")
            conn.execute("DELETE FROM pgsim.queue")


# ---- privileges and the SECURITY DEFINER reader ----


def test_roles_cannot_change_the_registered_prefix(table: Any, roles: Roles) -> None:
    dsn, _ = table
    with psycopg.connect(dsn, autocommit=True) as conn:
        for role in (roles.app, roles.tenant, roles.worker):
            with acting(conn, role):
                try:
                    changed = conn.execute("UPDATE pgsim.embedding SET prefix = 128").rowcount
                except psycopg.errors.InsufficientPrivilege:
                    changed = 0
                assert changed == 0, role
        assert conn.execute("SELECT prefix FROM pgsim.embedding WHERE table_name = 'items'").fetchone() == (PREFIX,)


def test_index_prefix_tells_a_role_without_privileges_no_more_than_the_catalog(table: Any, roles: Roles) -> None:
    """SECURITY DEFINER: one integer per registered (table, column), or NULL, which pg_get_indexdef shows anyone
    anyway; a role with no privilege on the table cannot search it, and its search_path cannot redirect the
    function's read of the registry; a role without USAGE on pgsim cannot call it at all."""
    dsn, _ = table
    with psycopg.connect(dsn, autocommit=True) as conn:
        with acting(conn, roles.owner), prefixed(conn, "secret") as ident:
            with acting(conn, roles.app):
                conn.execute("CREATE TEMP TABLE embedding (table_oid oid, column_name name, prefix int)")
                conn.execute("INSERT INTO embedding VALUES ('public.secret'::regclass, 'embedding', 7)")
                conn.execute("SET search_path = pg_temp, public")
                try:
                    assert conn.execute("SELECT pgsim.index_prefix(%s, 'embedding')", [ident]).fetchone() == (PREFIX,)
                    assert conn.execute("SELECT pgsim.index_prefix(%s, 'body')", [ident]).fetchone() == (None,)
                    definition = conn.execute("SELECT pg_get_indexdef('public.secret_embedding_hnsw'::regclass)")
                    assert "subvector(embedding, 1, 64)" in definition.fetchone()[0]
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        conn.execute("SELECT count(*) FROM public.secret")
                    with pytest.raises((psycopg.Error, InvalidInput)):
                        search_with_plan(conn, "public.secret", "embedding", np.ones(256, dtype=np.float32), k=K,
                                         tuning=WALK)  # fmt: skip
                    with pytest.raises(psycopg.Error):
                        conn.execute("SELECT * FROM pgsim.knn('public.secret', 'embedding', %s, 3)",
                                     [np.ones(256, dtype=np.float32)])  # fmt: skip
                finally:
                    conn.execute("DROP TABLE pg_temp.embedding")
                    conn.execute("RESET search_path")
        with acting(conn, roles.tenant), pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pgsim.index_prefix('public.items', 'embedding')")


# ---- lifecycle: change, Alembic, models ----


def test_change_embedding_keeps_prefix_storage_and_a_model_untrained_for_it_is_refused(
    table: Any, roles: Roles
) -> None:
    from pgsim.columns.worker import sync

    dsn, _ = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, title text, body text)")
        try:
            conn.execute("INSERT INTO notes SELECT g, 'title ' || g, 'note number ' || g FROM generate_series(1, 12) g")
            add_embedding(conn, "notes", "embedding", source="body", model=MODEL, prefix=PREFIX)
            sync(conn, table="notes", allow_superuser=True)
            with pytest.raises(InvalidInput, match="prefix"):
                change_model(conn, "notes", "embedding", "all-MiniLM-L6-v2")
            with pytest.raises(InvalidInput, match="prefix"):
                change_embedding(conn, "notes", "embedding", dtype="halfvec")
            assert conn.execute("SELECT count(*) FROM pgsim.embedding WHERE table_name = 'notes'").fetchone() == (1,)
            change_embedding(conn, "notes", "embedding", source="title")
            sync(conn, table="notes", allow_superuser=True)
            sync(conn, table="notes", allow_superuser=True)
            registered = conn.execute("SELECT column_name, prefix FROM pgsim.embedding "
                                      "WHERE table_oid = 'notes'::regclass").fetchall()  # fmt: skip
            assert registered == [("embedding", PREFIX)]
            assert conn.execute("SELECT pgsim.prefix_index('notes', 'embedding')").fetchone()[0] is not None
            hits, plan = search_with_plan(conn, "notes", "embedding", "title 3", k=3)
            assert len(hits) == 3
        finally:
            conn.execute("DROP TABLE notes")
            conn.execute("DELETE FROM pgsim.queue")


def test_alembic_offline_sql_builds_the_prefix_index_searches_find(table: Any, roles: Roles) -> None:
    from pgsim.alembic.embedding_ops import CreateEmbeddingOp

    dsn, vectors = table
    statements = CreateEmbeddingOp("offline", "embedding", source="body", model=MODEL, prefix=PREFIX)
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        conn.execute("CREATE TABLE offline (id int PRIMARY KEY, body text, embedding vector(256))")
        try:
            for statement in statements.offline_statements():
                conn.execute(statement)
            assert conn.execute("SELECT prefix FROM pgsim.embedding WHERE table_name = 'offline'").fetchone() == (
                PREFIX,
            )
            assert conn.execute("SELECT pgsim.prefix_index('offline', 'embedding')").fetchone()[0] is not None
        finally:
            conn.execute("SELECT pgsim.remove_embedding('offline'::regclass, 'embedding')")
            conn.execute("DROP TABLE offline")
            conn.execute("DELETE FROM pgsim.queue")
    with pytest.raises(InvalidInput, match="was trained for prefixes"):
        CreateEmbeddingOp("offline", "embedding", source="body", model=MODEL, prefix=100).offline_statements()


@pytest.mark.parametrize(
    ("declared", "dims"),
    [
        ([64, "128", 128.0, True, -64, 0, 1000, 64], (64,)),
        ("64", ()),
        ({"64": 1}, ()),
        (None, ()),
        ([], ()),
    ],
)
def test_bogus_matryoshka_dims_are_ignored(tmp_path: Path, monkeypatch: Any, declared: Any, dims: tuple) -> None:
    import pgsim.encoding.models as models

    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps({"matryoshka_dims": declared}))
    monkeypatch.setattr(models, "model_directory", lambda name: tmp_path)
    monkeypatch.setattr(models, "model_dimension", lambda name: 256)
    assert models.matryoshka_dims("bogus") == dims


def test_an_unreadable_model_config_declares_no_dims(tmp_path: Path, monkeypatch: Any) -> None:
    import pgsim.encoding.models as models

    (tmp_path / "config_sentence_transformers.json").write_text("{not json")
    monkeypatch.setattr(models, "model_directory", lambda name: tmp_path)
    monkeypatch.setattr(models, "model_dimension", lambda name: 256)
    assert models.matryoshka_dims("bogus") == ()
