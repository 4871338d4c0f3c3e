"""Binary-quantised storage (``add_embedding(..., dtype="bit")``): the column keeps full vectors, the HNSW index is
Hamming over ``binary_quantize(column)::bit(384)``, and every search path walks it for candidates and re-ranks them
by cosine distance on the full vectors: k rows, in true distance order, with true distances. On the real server
and model, as a non-superuser owner with separate application and worker roles."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from bit_items import Item, bit_items
from fixtures.roles import Roles, acting
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
from pgsim.knn.filtered import explain, search_with_plan
from pgsim.knn.planner import Tuning
from pgsim.psycopg import register
from pgsim.quality.hybrid import hybrid_search
from pgsim.sqlalchemy import embedding_column

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chunks"))
from chunked_docs import engine_as  # noqa: E402

K = 10
# a small table: its size alone, or a filter's share of it, would send every search to the exact scan
# (and at a low ef_search: a walk of many candidates costs PostgreSQL more than sorting 2,400 rows)
WALK = Tuning(exact_below_rows=0, min_hnsw_selectivity=0, hnsw_ef_search=40)


@pytest.fixture(scope="module")
def table(
    server_dsn: str, roles: Roles, packages: list[Package], package_vectors: np.ndarray
) -> Iterator[tuple[str, np.ndarray, list[str]]]:
    with bit_items(server_dsn, roles, packages, package_vectors, "bit_storage") as made:
        yield made


def nearest(vectors: np.ndarray, query: np.ndarray, keep: Any = lambda i: True) -> list[tuple[int, float]]:
    distance = 1 - vectors @ query / np.linalg.norm(query)
    return [(int(i), float(distance[i])) for i in np.argsort(distance, kind="stable") if keep(int(i))][:K]


def test_the_column_keeps_full_vectors_and_only_the_index_is_binary(table: tuple[str, Any, Any]) -> None:
    dsn = table[0]
    with psycopg.connect(dsn) as conn:
        column = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                              "WHERE attrelid = 'items'::regclass AND attname = 'embedding'").fetchone()  # fmt: skip
        index = conn.execute("SELECT pgsim.bit_index('items', 'embedding')").fetchone()
        definition = conn.execute("SELECT pg_get_indexdef(%s::regclass)", [index[0]]).fetchone()
        dtype = conn.execute("SELECT dtype FROM pgsim.embedding").fetchone()
    assert column == ("vector(384)",)
    assert index[0] == "items_embedding_hnsw"
    assert "binary_quantize(embedding)" in definition[0] and "bit_hamming_ops" in definition[0], definition
    assert "::bit(384)" in definition[0]
    assert dtype == ("bit",)


@pytest.mark.parametrize("filtered", [False, True])
def test_search_walks_the_bit_index_and_reranks_by_true_distance(
    table: tuple[str, np.ndarray, list[str]], roles: Roles, filtered: bool
) -> None:
    dsn, vectors, _ = table
    rng = np.random.default_rng(9)
    # half the rows (on this small table PostgreSQL sorts what a narrower filter leaves instead of walking)
    keep = (lambda i: i % 3 != 0) if filtered else (lambda i: True)
    where = sql.SQL("id % 3 <> 0") if filtered else None
    found = 0
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.app):
        register(conn)
        for number in range(5):
            query = vectors[rng.integers(len(vectors))] + rng.normal(0, 0.05, 384).astype(np.float32)
            hits, plan = search_with_plan(conn, "items", "embedding", query, k=K, where=where, tuning=WALK)
            assert (plan.path, plan.index_name, plan.fell_back) == ("hnsw", "items_embedding_hnsw", False), plan
            assert plan.candidates == max(K, plan.ef_search or 0) >= K
            expected = nearest(vectors, query, keep)
            ids = [hit.row["id"] for hit in hits]
            assert len(ids) == K == len(set(ids))
            assert all(keep(i) for i in ids)
            true = 1 - vectors[ids] @ query / np.linalg.norm(query)  # distances are cosine on the full vectors
            np.testing.assert_allclose([hit.distance for hit in hits], true, atol=1e-5)
            assert [hit.distance for hit in hits] == sorted(hit.distance for hit in hits)
            found += len(set(ids) & {i for i, _ in expected})
            # the SQL path: the same rows, in the same order
            rows = conn.execute(
                "SELECT (r.row->>'id')::int, r.distance FROM pgsim.knn('items', 'embedding', %s, %s, %s, "
                "exact_below_rows => 0, min_hnsw_selectivity => 0, hnsw_ef_search => 40) AS r",
                [query, K, "id % 3 <> 0" if filtered else None],
            ).fetchall()
            assert [r[0] for r in rows] == ids, number
    assert found / (5 * K) >= 0.9  # the candidates' re-rank recovers the cosine neighbours


def test_explain_shows_the_bit_index_scanned_and_the_candidates(table: tuple[str, np.ndarray, Any]) -> None:
    dsn, vectors, _ = table
    with psycopg.connect(dsn) as conn:
        register(conn)
        plan, text = explain(conn, "items", "embedding", vectors[3], k=K, tuning=WALK)
    assert plan.path == "hnsw" and plan.candidates is not None
    assert "items_embedding_hnsw" in text and "binary_quantize" in text, text
    assert f"rows={plan.candidates}.00" in text, text  # the walk's candidates, then the k re-ranked
    assert plan.candidates == 2 * 40  # uncalibrated, a bit walk takes twice the cosine walk's ef_search


def test_a_walk_where_costs_favour_a_sort_still_walks_the_bit_index(table: tuple[str, np.ndarray, Any]) -> None:
    """At ef_search 1,000 on 2,400 rows PostgreSQL would rather sort the table by Hamming distance than walk the
    index, and a Hamming sort's candidates, re-ranked, are not the walk's: the bit walk runs with sorting off,
    so the index serves it, in both paths."""
    dsn, vectors, _ = table
    wide = Tuning(exact_below_rows=0, min_hnsw_selectivity=0, hnsw_ef_search=500)
    with psycopg.connect(dsn) as conn:
        register(conn)
        hits, plan = search_with_plan(conn, "items", "embedding", vectors[11], k=K, tuning=wide)
        assert (plan.path, plan.candidates) == ("hnsw", 1000), plan
        _, text = explain(conn, "items", "embedding", vectors[11], k=K, tuning=wide)
        assert "Index Scan using items_embedding_hnsw" in text, text
        assert conn.execute("SHOW enable_sort").fetchone() == ("on",)  # only the walk ran without it
        sql_rows = conn.execute(
            "SELECT (r.row->>'id')::int FROM pgsim.knn('items', 'embedding', %s, %s, exact_below_rows => 0, "
            "hnsw_ef_search => 500) AS r",
            [vectors[11], K],
        ).fetchall()
        assert [r[0] for r in sql_rows] == [hit.row["id"] for hit in hits]
        assert conn.execute("SHOW enable_sort").fetchone() == ("on",)


def test_a_selective_filter_takes_the_exact_path_on_the_full_vectors(table: tuple[str, np.ndarray, list[str]]) -> None:
    dsn, vectors, sections = table
    rare = min(set(sections), key=sections.count)
    keep = lambda i: sections[i] == rare  # noqa: E731
    with psycopg.connect(dsn) as conn:
        register(conn)
        hits, plan = search_with_plan(conn, "items", "embedding", vectors[0], k=K, where={"section": rare})
    expected = nearest(vectors, vectors[0], keep)
    assert plan.path == "exact" and plan.candidates is None
    assert [hit.row["id"] for hit in hits] == [i for i, _ in expected][: len(hits)]
    assert len(hits) == min(K, sections.count(rare))


def test_the_worker_fills_new_rows_and_a_text_query_finds_them(
    table: tuple[str, np.ndarray, Any], roles: Roles
) -> None:
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
        with acting(conn, roles.app):
            hits, plan = search_with_plan(conn, "items", "embedding", "tomato soup recipe", k=K, tuning=WALK)
            assert plan.path == "hnsw" and plan.candidates is not None
            assert hits[0].row["id"] == 100000
            assert len(hits) == K
            fused = hybrid_search(conn, "items", "embedding", "tomato soup recipe", k=K, text_column="fts")
            assert len(fused) == K and fused[0].row["id"] == 100000
        conn.execute("DELETE FROM items WHERE id = 100000")


def test_calibration_measures_the_reranked_walk(table: tuple[str, np.ndarray, Any], roles: Roles) -> None:
    dsn, vectors, _ = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        result = calibrate_index(conn, "items", "embedding", seconds=20)
        assert result.stored, result
        assert result.index_name == "public.items_embedding_hnsw"
        hits, plan = search_with_plan(conn, "items", "embedding", vectors[7], k=K, tuning=WALK)
        assert plan.path == "hnsw" and plan.expected_recall is not None and plan.expected_recall >= 0.99, plan
        assert plan.candidates == max(K, plan.ef_search or 0)
        assert hits[0].row["id"] == 7
        conn.execute("DELETE FROM pgsim.calibration")


def test_bad_storage_requests_are_refused_before_anything_changes(table: tuple[str, Any, Any], roles: Roles) -> None:
    dsn = table[0]
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        conn.execute("CREATE TABLE other (id int PRIMARY KEY, body text, half halfvec(384))")
        try:
            with pytest.raises(InvalidInput, match="does not take chunks"):
                add_embedding(conn, "other", "embedding", source="body", dtype="bit", chunks=Chunks(64, 8))
            with pytest.raises(InvalidInput, match=r"exists as halfvec\(384\).*vector\(384\)"):
                add_embedding(conn, "other", "half", source="body", dtype="bit")
            with pytest.raises(InvalidInput, match="dtype must be one of"):
                add_embedding(conn, "other", "embedding", source="body", dtype="binary")
            columns = conn.execute("SELECT count(*) FROM pg_attribute WHERE attrelid = 'other'::regclass "
                                   "AND attnum > 0").fetchone()  # fmt: skip
            assert columns == (3,)
            assert conn.execute("SELECT count(*) FROM pgsim.embedding WHERE table_name = 'other'").fetchone() == (0,)
        finally:
            conn.execute("DROP TABLE other")


def test_the_orm_walks_the_bit_index_for_the_same_rows_as_pgsim_search(
    table: tuple[str, np.ndarray, Any], roles: Roles
) -> None:
    """Application code on the same table: ``.nearest()`` under a filter keeps the walk's candidates (a
    Hamming-ordered subquery the bit index serves) and orders them by cosine distance: pgsim.search's rows."""
    dsn, vectors, _ = table
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
        walked = [s for s in statements if "binary_quantize" in s and "<~>" in s]
        assert len(walked) == 2, statements  # the walk ran for each query; no exact scan followed it
        assert not any("+ %(param" in s or "+ 0" in s for s in statements if "items" in s), statements
    finally:
        engine.dispose()


def test_the_orm_declares_creates_and_fills_a_bit_column(table: tuple[str, Any, Any], roles: Roles) -> None:
    """``embedding_column(dtype="bit")``: create_all makes a vector(384) column and pgsim builds the bit index
    (no cosine index); a flush encodes the row, which a text query then finds."""
    dsn = table[0]

    class Fresh(DeclarativeBase):
        pass

    class Note(Fresh):
        __tablename__ = "notes"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str | None] = mapped_column(String, nullable=True)
        embedding = embedding_column(source="body", dtype="bit")

    engine = engine_as(dsn, roles.owner)
    try:
        Fresh.metadata.create_all(engine)
        with Session(engine) as session:
            session.add_all([Note(id=1, body="Sourdough bread with a crisp crust"), Note(id=2, body="TCP congestion")])
            session.commit()
            found = session.scalars(select(Note).order_by(Note.embedding.nearest("baking bread")).limit(1)).all()
            assert [note.id for note in found] == [1]
        with psycopg.connect(dsn) as conn:
            indexes = conn.execute(
                "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = 'notes'::regclass "
                "AND NOT indisprimary"
            ).fetchall()
            assert conn.execute("SELECT pgsim.bit_index('notes', 'embedding')").fetchone() == ("notes_embedding_hnsw",)
            assert conn.execute("SELECT count(embedding) FROM notes").fetchone() == (2,)
        assert len(indexes) == 1 and "bit_hamming_ops" in indexes[0][0], indexes
        with pytest.raises(InvalidInput, match="does not take chunks"):
            embedding_column(source="body", dtype="bit", chunks=Chunks(64, 8))
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
            remove_embedding(conn, "notes", "embedding")
            conn.execute("DROP TABLE notes")
        engine.dispose()
