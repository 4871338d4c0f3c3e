"""Matryoshka prefix storage (``add_embedding(..., model="wordllama-l2-supercat", prefix=64)``): the column keeps
the model's full 256-dimension vectors, the HNSW index is cosine over ``subvector(column, 1, 64)::vector(64)``, and
every search path walks it for candidates and re-ranks them by cosine distance on the full vectors: k rows, in
true distance order, with true distances. On the real server and model, as a non-superuser owner with separate
application and worker roles; bad requests are refused before anything changes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.roles import Roles, acting
from prefix_items import MODEL, PREFIX, Item, prefix_items
from psycopg import sql
from sqlalchemy import String, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pgsim.columns.adding import add_embedding
from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.registry import remove_embedding
from pgsim.columns.worker import sync
from pgsim.db.calibration import calibrate_index
from pgsim.demo.corpus import Package
from pgsim.errors import InvalidInput
from pgsim.knn.caches import forget_plans
from pgsim.knn.filtered import NoIndexWarning, explain, search_with_plan
from pgsim.knn.planner import Tuning
from pgsim.psycopg import register
from pgsim.quality.hybrid import hybrid_search
from pgsim.sqlalchemy import embedding_column

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chunks"))
from chunked_docs import engine_as  # noqa: E402

K = 10
# a small table: its size alone, or a filter's share of it, would send every search to the exact scan
WALK = Tuning(exact_below_rows=0, min_hnsw_selectivity=0, hnsw_ef_search=40)


@pytest.fixture(scope="module")
def table(server_dsn: str, roles: Roles, packages: list[Package]) -> Iterator[tuple[str, np.ndarray]]:
    with prefix_items(server_dsn, roles, packages, "prefix_storage") as made:
        yield made


def nearest(vectors: np.ndarray, query: np.ndarray, keep: Any = lambda i: True) -> list[int]:
    distance = 1 - vectors @ query / np.linalg.norm(query)
    return [int(i) for i in np.argsort(distance, kind="stable") if keep(int(i))][:K]


def test_the_column_keeps_full_vectors_and_the_index_holds_their_prefix(table: tuple[str, Any]) -> None:
    with psycopg.connect(table[0]) as conn:
        column = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                              "WHERE attrelid = 'items'::regclass AND attname = 'embedding'").fetchone()  # fmt: skip
        found = conn.execute(
            "SELECT pgsim.prefix_index('items', 'embedding'), pgsim.reranked_index('items', 'embedding'), "
            "pgsim.bit_index('items', 'embedding')"
        ).fetchone()
        definition = conn.execute("SELECT pg_get_indexdef('items_embedding_hnsw'::regclass)").fetchone()
        registered = conn.execute("SELECT dtype, dimension, prefix FROM pgsim.embedding").fetchone()
    assert column == ("vector(256)",)
    assert found == ("items_embedding_hnsw", "items_embedding_hnsw", None)
    assert "subvector(embedding, 1, 64)" in definition[0] and "vector(64)" in definition[0], definition
    assert "vector_cosine_ops" in definition[0]
    assert registered == ("vector", 256, PREFIX)


@pytest.mark.parametrize("filtered", [False, True])
def test_search_walks_the_prefix_index_and_reranks_by_true_distance(
    table: tuple[str, np.ndarray], roles: Roles, filtered: bool
) -> None:
    dsn, vectors = table
    rng = np.random.default_rng(9)
    keep = (lambda i: i % 3 != 0) if filtered else (lambda i: True)
    where = sql.SQL("id % 3 <> 0") if filtered else None
    found = 0
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.app):
        register(conn)
        for number in range(5):
            query = vectors[rng.integers(len(vectors))] + rng.normal(0, 0.05, 256).astype(np.float32)
            hits, plan = search_with_plan(conn, "items", "embedding", query, k=K, where=where, tuning=WALK)
            assert (plan.path, plan.index_name, plan.fell_back) == ("hnsw", "items_embedding_hnsw", False), plan
            assert plan.candidates == max(K, plan.ef_search or 0) >= K
            ids = [hit.row["id"] for hit in hits]
            assert len(ids) == K == len(set(ids)) and all(keep(i) for i in ids)
            true = 1 - vectors[ids] @ query / np.linalg.norm(query)  # distances are cosine on the full vectors
            np.testing.assert_allclose([hit.distance for hit in hits], true, atol=1e-5)
            assert [hit.distance for hit in hits] == sorted(hit.distance for hit in hits)
            found += len(set(ids) & set(nearest(vectors, query, keep)))
            rows = conn.execute(  # the SQL path: the same rows, in the same order
                "SELECT (r.row->>'id')::int FROM pgsim.knn('items', 'embedding', %s, %s, %s, "
                "exact_below_rows => 0, min_hnsw_selectivity => 0, hnsw_ef_search => 40) AS r",
                [query, K, "id % 3 <> 0" if filtered else None],
            ).fetchall()
            assert [r[0] for r in rows] == ids, number
    assert found / (5 * K) >= 0.9  # the candidates' re-rank recovers the cosine neighbours


def test_explain_shows_the_prefix_walk_and_its_candidates(table: tuple[str, np.ndarray]) -> None:
    dsn, vectors = table
    with psycopg.connect(dsn) as conn:
        register(conn)
        plan, text = explain(conn, "items", "embedding", vectors[3], k=K, tuning=WALK)
    assert plan.path == "hnsw" and plan.candidates == 2 * 40  # uncalibrated: twice the cosine walk's ef_search
    assert "Index Scan using items_embedding_hnsw" in text and "subvector(embedding, 1, 64)" in text, text
    assert f"rows={plan.candidates}.00" in text, text  # the walk's candidates, then the k re-ranked


def test_an_index_over_another_prefix_is_not_walked(table: tuple[str, np.ndarray], roles: Roles) -> None:
    """The registered prefix is 64; an index over the first 128 values, named to sort first, is not the one
    searches order by: the planner finds none, and every path scans exactly, with the same k rows."""
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        conn.execute("ALTER INDEX items_embedding_hnsw RENAME TO items_prefix_kept")
        conn.execute("CREATE INDEX items_a ON items USING hnsw ((subvector(embedding, 1, 128)::vector(128)) "
                     "vector_cosine_ops) WITH (m = 4, ef_construction = 8)")  # fmt: skip
        conn.execute("DROP INDEX items_prefix_kept")
        try:
            assert conn.execute("SELECT pgsim.reranked_index('items', 'embedding')").fetchone() == (None,)
            with pytest.warns(NoIndexWarning) as warned:
                hits, plan = search_with_plan(conn, "items", "embedding", vectors[5], k=K, tuning=WALK)
            assert plan.path == "exact" and [hit.row["id"] for hit in hits] == nearest(vectors, vectors[5])
            assert "subvector(embedding, 1, 64)::vector(64)) vector_cosine_ops" in str(warned[0].message)
            rows = conn.execute("SELECT (r.row->>'id')::int FROM pgsim.knn('items', 'embedding', %s, %s, "
                                "exact_below_rows => 0) AS r", [vectors[5], K]).fetchall()  # fmt: skip
            assert [r[0] for r in rows] == nearest(vectors, vectors[5])
        finally:
            conn.execute("DROP INDEX items_a")
            conn.execute("CREATE INDEX items_embedding_hnsw ON items USING hnsw "
                         "((subvector(embedding, 1, 64)::vector(64)) vector_cosine_ops)")  # fmt: skip
            forget_plans()  # the exact plans cached above name no index
        assert conn.execute("SELECT pgsim.reranked_index('items', 'embedding')").fetchone() == ("items_embedding_hnsw",)


def test_the_worker_fills_new_rows_and_a_text_query_finds_them(table: tuple[str, np.ndarray], roles: Roles) -> None:
    dsn = table[0]
    with psycopg.connect(dsn, autocommit=True) as conn:
        register(conn)
        with acting(conn, roles.app):
            conn.execute(
                "INSERT INTO items (id, section, body) VALUES (100000, 'zz', 'A recipe for tomato soup with basil')"
            )
        with acting(conn, roles.worker):
            report = sync(conn, table="items", allow_superuser=True)
        assert report.embedded == 1, report
        try:
            with acting(conn, roles.app):
                hits, plan = search_with_plan(conn, "items", "embedding", "tomato soup recipe", k=K, tuning=WALK)
                assert plan.path == "hnsw" and plan.candidates is not None
                assert hits[0].row["id"] == 100000 and len(hits) == K
                fused = hybrid_search(conn, "items", "embedding", "tomato soup recipe", k=K, text_column="fts")
                assert len(fused) == K and fused[0].row["id"] == 100000
        finally:
            conn.execute("DELETE FROM items WHERE id = 100000")


def test_calibration_measures_the_reranked_prefix_walk(table: tuple[str, np.ndarray], roles: Roles) -> None:
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        result = calibrate_index(conn, "items", "embedding", seconds=20)
        try:
            assert result.stored, result
            hits, plan = search_with_plan(conn, "items", "embedding", vectors[7], k=K, tuning=WALK)
            assert plan.path in ("hnsw", "exact") and plan.expected_recall is not None, plan
            assert plan.expected_recall >= 0.99 and (plan.path == "exact") == (plan.candidates is None), plan
            assert [hit.row["id"] for hit in hits][0] == 7
        finally:
            conn.execute("DELETE FROM pgsim.calibration")


def test_the_orm_walks_the_prefix_index_for_the_same_rows_as_pgsim_search(
    table: tuple[str, np.ndarray], roles: Roles
) -> None:
    dsn, vectors = table
    engine = engine_as(dsn, roles.app)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    try:
        with Session(engine) as session, psycopg.connect(dsn) as conn, acting(conn, roles.app):
            register(conn)
            for query in (vectors[21], vectors[700]):
                orm = session.scalars(
                    select(Item)
                    .where(Item.id % 3 != 0)
                    .order_by(Item.embedding.nearest(query))
                    .limit(K)
                    .execution_options(pgsim_tuning=WALK)
                ).all()
                hits = search_with_plan(conn, "items", "embedding", query, k=K, where=sql.SQL("id % 3 <> 0"),
                                        tuning=WALK)[0]  # fmt: skip
                assert [item.id for item in orm] == [hit.row["id"] for hit in hits]
        walked = [s for s in statements if "subvector(items.embedding, 1, 64)" in s]
        assert len(walked) == 2, statements  # the walk ran for each query; no exact scan followed it
    finally:
        engine.dispose()


def test_the_orm_declares_creates_and_fills_a_prefix_column(table: tuple[str, Any], roles: Roles) -> None:
    dsn = table[0]

    class Fresh(DeclarativeBase):
        pass

    class Note(Fresh):
        __tablename__ = "notes"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str | None] = mapped_column(String, nullable=True)
        embedding = embedding_column(source="body", model=MODEL, prefix=128)

    engine = engine_as(dsn, roles.owner)
    try:
        Fresh.metadata.create_all(engine)
        with Session(engine) as session:
            session.add_all([Note(id=1, body="Sourdough bread with a crisp crust"), Note(id=2, body="TCP congestion")])
            session.commit()
            found = session.scalars(select(Note).order_by(Note.embedding.nearest("baking bread")).limit(1)).all()
            assert [note.id for note in found] == [1]
        with psycopg.connect(dsn) as conn:
            indexes = conn.execute("SELECT pg_get_indexdef(indexrelid) FROM pg_index "
                                   "WHERE indrelid = 'notes'::regclass AND NOT indisprimary").fetchall()  # fmt: skip
            assert conn.execute("SELECT pgsim.prefix_index('notes', 'embedding')").fetchone() == (
                "notes_embedding_hnsw",
            )
            assert conn.execute("SELECT count(embedding) FROM notes").fetchone() == (2,)
        assert len(indexes) == 1 and "subvector(embedding, 1, 128)" in indexes[0][0], indexes
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
            remove_embedding(conn, "notes", "embedding")
            conn.execute("DROP TABLE notes")
        engine.dispose()


@pytest.mark.parametrize(
    ("model", "prefix", "dtype", "chunks", "refused"),
    [
        (MODEL, 256, "vector", None, "not shorter than model 'wordllama-l2-supercat''s 256-dimension"),
        (MODEL, 300, "vector", None, "not shorter than"),
        (MODEL, 100, "vector", None, "was trained for prefixes of 64, 128 dimensions"),
        ("all-MiniLM-L6-v2", 64, "vector", None, "is not trained for prefixes"),
        (MODEL, 64, "halfvec", None, "keeps a vector column"),
        (MODEL, 64, "bit", None, "keeps a vector column"),
        (MODEL, 64, "vector", Chunks(64, 8), "prefix storage does not take chunks"),
        (MODEL, 0, "vector", None, "positive whole number"),
        (MODEL, True, "vector", None, "positive whole number"),
        (MODEL, "64", "vector", None, "positive whole number"),
    ],
)
def test_bad_prefix_requests_are_refused_before_anything_changes(
    table: tuple[str, Any], roles: Roles, model: str, prefix: Any, dtype: str, chunks: Any, refused: str
) -> None:
    with psycopg.connect(table[0], autocommit=True) as conn, acting(conn, roles.owner):
        conn.execute("CREATE TABLE other (id int PRIMARY KEY, body text)")
        try:
            with pytest.raises(InvalidInput, match=refused):
                add_embedding(conn, "other", "embedding", source="body", model=model, prefix=prefix, dtype=dtype,
                              chunks=chunks)  # fmt: skip
            with pytest.raises(InvalidInput, match=refused):
                embedding_column(source="body", model=model, prefix=prefix, dtype=dtype, chunks=chunks)
            columns = conn.execute("SELECT count(*) FROM pg_attribute WHERE attrelid = 'other'::regclass "
                                   "AND attnum > 0").fetchone()  # fmt: skip
            assert columns == (2,)
            assert conn.execute("SELECT count(*) FROM pgsim.embedding WHERE table_name = 'other'").fetchone() == (0,)
        finally:
            conn.execute("DROP TABLE other")
