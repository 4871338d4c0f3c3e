"""Attacks on binary-quantised storage (``add_embedding(..., dtype="bit")``): the k-rows contract, true cosine
order and distances, the exact path whenever PostgreSQL would not walk the planned index, and indexes that only
look like the column's bit index. On the real server and model, as a non-superuser owner."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
import pytest
from bit_items import Item, bit_items
from fixtures.roles import Roles, acting
from psycopg import sql
from sql_walk import walk_knn

from pgsim.columns.adding import add_embedding
from pgsim.columns.model_change import change_embedding
from pgsim.columns.registry import remove_embedding
from pgsim.columns.worker import sync
from pgsim.demo.corpus import Package
from pgsim.knn.caches import forget_plans
from pgsim.knn.filtered import explain, search_with_plan
from pgsim.knn.planner import Tuning
from pgsim.psycopg import register

K = 10
WALK = Tuning(exact_below_rows=0, min_hnsw_selectivity=0, hnsw_ef_search=40)
EXACT = Tuning(exact_below_rows=1e12)


@pytest.fixture(scope="module")
def table(
    server_dsn: str, roles: Roles, packages: list[Package], package_vectors: np.ndarray
) -> Iterator[tuple[str, np.ndarray]]:
    with bit_items(server_dsn, roles, packages, package_vectors, "bit_attacks") as (dsn, vectors, _):
        yield dsn, vectors


def exact_nearest(vectors: np.ndarray, query: np.ndarray, keep: Any = lambda i: True, k: int = K) -> list[float]:
    distance = 1 - vectors @ query / np.linalg.norm(query)
    return [float(distance[i]) for i in np.argsort(distance, kind="stable") if keep(int(i))][:k]


def check_true(hits: Any, vectors: np.ndarray, query: np.ndarray) -> None:
    ids = [hit.row["id"] for hit in hits]
    true = 1 - vectors[ids] @ query / np.linalg.norm(query)
    np.testing.assert_allclose([hit.distance for hit in hits], true, atol=1e-5)
    assert [hit.distance for hit in hits] == sorted(hit.distance for hit in hits)


@contextmanager
def copied(conn: psycopg.Connection[Any], name: str) -> Iterator[None]:
    """For the block: a plain (unregistered) copy of items, ``name`` (id, section, embedding vector(384), other
    vector(384) = -embedding, half halfvec(384))."""
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, section text, embedding vector(384), "
                         "other vector(384), half halfvec(384))").format(sql.Identifier(name)))  # fmt: skip
    try:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} SELECT id, section, embedding, "
                "ARRAY(SELECT -u FROM unnest(embedding::real[]) u)::vector(384), embedding::halfvec FROM items"
            ).format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(name)))
        yield
    finally:
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))


# ---- the k-rows contract on a narrow filter forced onto the walk ----


@pytest.mark.parametrize("where", ["id % 50 = 0", "id % 300 = 7", "id < 30"])
def test_a_narrow_filter_forced_onto_the_walk_still_gives_k_true_rows(table: Any, roles: Roles, where: str) -> None:
    dsn, vectors = table
    keep = {"id % 50 = 0": lambda i: i % 50 == 0, "id % 300 = 7": lambda i: i % 300 == 7, "id < 30": lambda i: i < 30}
    rng = np.random.default_rng(3)
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.app):
        register(conn)
        for _ in range(3):
            query = vectors[rng.integers(len(vectors))] + rng.normal(0, 0.05, 384).astype(np.float32)
            expected = exact_nearest(vectors, query, keep[where])
            hits, plan = search_with_plan(conn, "items", "embedding", query, k=K, where=sql.SQL(where), tuning=WALK)
            assert len(hits) == min(K, len(expected)), plan
            assert all(keep[where](hit.row["id"]) for hit in hits)
            check_true(hits, vectors, query)
            rows = walk_knn(conn, "items", "embedding", query, where=where)
            assert len(rows) == len(hits)
            assert all(keep[where](r[0]) for r in rows)


def test_k_larger_than_the_candidates(table: Any) -> None:
    dsn, vectors = table
    query = vectors[17]
    with psycopg.connect(dsn) as conn:
        register(conn)
        for k in (500, 1500):
            hits, plan = search_with_plan(conn, "items", "embedding", query, k=k,
                                          tuning=Tuning(exact_below_rows=0, min_hnsw_selectivity=0))  # fmt: skip
            assert len(hits) == k, plan
            assert plan.candidates is None or plan.candidates >= k
            check_true(hits, vectors, query)
            rows = conn.execute(
                "SELECT (r.row->>'id')::int FROM pgsim.knn('items', 'embedding', %s, %s, exact_below_rows => 0, "
                "min_hnsw_selectivity => 0) AS r",
                [query, k],
            ).fetchall()
            assert len(rows) == k


def test_rows_with_null_embeddings_never_come_back(table: Any, roles: Roles) -> None:
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn:
        register(conn)
        with acting(conn, roles.owner):
            conn.execute("ALTER TABLE items DISABLE TRIGGER USER")
            conn.execute(
                "INSERT INTO items (id, section, body) SELECT g, 'nulls', 'x' FROM generate_series(90000, 90200) g"
            )
            conn.execute("ALTER TABLE items ENABLE TRIGGER USER")
            conn.execute("ANALYZE items")
        try:
            with acting(conn, roles.app):
                for where, keep in ((None, lambda i: True), (sql.SQL("id >= 2390"), lambda i: i >= 2390)):
                    hits, plan = search_with_plan(conn, "items", "embedding", vectors[2395], k=K, where=where,
                                                  tuning=WALK)  # fmt: skip
                    assert len(hits) == K, plan
                    assert all(hit.row["id"] < 90000 for hit in hits)
                    np.testing.assert_allclose([h.distance for h in hits],
                                               exact_nearest(vectors, vectors[2395], keep), atol=1e-5)  # fmt: skip
        finally:
            with acting(conn, roles.owner):
                conn.execute("DELETE FROM items WHERE id >= 90000")
                conn.execute("DELETE FROM pgsim.queue")
                conn.execute("ANALYZE items")


# ---- a plain connection (no pgsim.register): the query is an untyped literal ----


def test_a_plain_connection_searches_a_bit_column(table: Any) -> None:
    """pgsim.psycopg.bindable: "every search works on a plain psycopg.connect(...) connection"."""
    dsn, vectors = table
    with psycopg.connect(dsn) as conn:
        hits, plan = search_with_plan(conn, "items", "embedding", vectors[5], k=K, tuning=WALK)
    assert (plan.path, plan.candidates) == ("hnsw", 80), plan
    assert len(hits) == K and hits[0].row["id"] == 5, plan
    check_true(hits, vectors, vectors[5])


# ---- indexes that look like a bit index ----


def test_a_bit_index_of_another_column_or_partial_is_not_the_columns(table: Any, roles: Roles) -> None:
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        with copied(conn, "decoys"):
            conn.execute(
                "CREATE INDEX decoys_other ON decoys USING hnsw ((binary_quantize(other)::bit(384)) bit_hamming_ops)"
            )
            conn.execute("CREATE INDEX decoys_partial ON decoys USING hnsw ((binary_quantize(embedding)::bit(384)) "
                         "bit_hamming_ops) WHERE id < 100")  # fmt: skip
            assert conn.execute("SELECT pgsim.bit_index('decoys', 'embedding')").fetchone() == (None,)
            assert conn.execute("SELECT pgsim.bit_index('decoys', 'other')").fetchone() == ("decoys_other",)
            # the "other" column's index, walked for "other": the rows are the true nearest by other
            query = -vectors[8]
            hits, plan = search_with_plan(conn, "decoys", "other", query, k=K, tuning=WALK)
            assert (plan.path, plan.index_name) == ("hnsw", "decoys_other"), plan
            assert len(hits) == K and hits[0].row["id"] == 8
            check_true(hits, -vectors, query)
            query = vectors[8]
            hits, plan = search_with_plan(
                conn, "decoys", "embedding", query, k=K, tuning=WALK, where=sql.SQL("id < 100")
            )
            np.testing.assert_allclose([h.distance for h in hits], exact_nearest(vectors, query, lambda i: i < 100),
                                       atol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    "expression",
    [
        "binary_quantize(l2_normalize(embedding))::bit(384)",
        "binary_quantize(embedding)::bit(192)",
        "binary_quantize(embedding::halfvec)::bit(384)",
        "binary_quantize(subvector(embedding, 1, 384))::bit(384)",
    ],
)
def test_a_bit_index_over_another_expression_gives_true_rows(table: Any, roles: Roles, expression: str) -> None:
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        with copied(conn, "shapes"):
            conn.execute(f"CREATE INDEX shapes_odd ON shapes USING hnsw (({expression}) bit_hamming_ops)")
            for where, keep in ((None, lambda i: True), (sql.SQL("id % 2 = 0"), lambda i: i % 2 == 0)):
                query = vectors[123] + 0.01
                hits, plan = search_with_plan(conn, "shapes", "embedding", query, k=K, where=where, tuning=WALK)
                assert len(hits) == K
                np.testing.assert_allclose([h.distance for h in hits], exact_nearest(vectors, query, keep), atol=1e-5)
                rows = walk_knn(conn, "shapes", "embedding", query, where=where.as_string(conn) if where else None)
                np.testing.assert_allclose([d for _, d in rows], exact_nearest(vectors, query, keep), atol=1e-5)


def test_a_decoy_bit_index_does_not_mask_the_real_one(table: Any, roles: Roles) -> None:
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        with copied(conn, "masked"):
            conn.execute(
                "CREATE INDEX masked_real ON masked USING hnsw ((binary_quantize(embedding)::bit(384)) bit_hamming_ops)"
            )
            conn.execute("CREATE INDEX a_masked_decoy ON masked USING hnsw "
                         "((binary_quantize(l2_normalize(embedding))::bit(384)) bit_hamming_ops)")  # fmt: skip
            hits, plan = search_with_plan(conn, "masked", "embedding", vectors[4], k=K, tuning=WALK)
            np.testing.assert_allclose([h.distance for h in hits], exact_nearest(vectors, vectors[4]), atol=1e-5)
            assert (plan.path, plan.index_name) == ("hnsw", "masked_real"), plan


def test_a_bit_index_on_a_halfvec_column(table: Any, roles: Roles) -> None:
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        with copied(conn, "halves"):
            conn.execute(
                "CREATE INDEX halves_bits ON halves USING hnsw ((binary_quantize(half)::bit(384)) bit_hamming_ops)"
            )
            query = vectors[77]
            hits, plan = search_with_plan(conn, "halves", "half", query, k=K, tuning=WALK)
            exact, _ = search_with_plan(conn, "halves", "half", query, k=K, tuning=EXACT)
            assert plan.path == "hnsw" and plan.candidates is not None, plan
            assert [h.row["id"] for h in hits] == [h.row["id"] for h in exact]
            rows = walk_knn(conn, "halves", "half", query)
            assert [i for i, _ in rows] == [h.row["id"] for h in exact]


def test_a_cosine_index_and_a_bit_index_on_one_column(table: Any, roles: Roles) -> None:
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        with copied(conn, "dual"):
            conn.execute(
                "CREATE INDEX dual_bits ON dual USING hnsw ((binary_quantize(embedding)::bit(384)) bit_hamming_ops)"
            )
            conn.execute("CREATE INDEX dual_cos ON dual USING hnsw (embedding vector_cosine_ops)")
            hits, plan = search_with_plan(conn, "dual", "embedding", vectors[9], k=K, tuning=WALK)
            assert (plan.path, plan.index_name, plan.candidates) == ("hnsw", "dual_cos", None), plan
            assert len(hits) == K
            check_true(hits, vectors, vectors[9])


# ---- names ----


@pytest.mark.parametrize("name,column", [('we"ird; --', 'Emb"ed ding'), ("Mixed", "Vec")])
def test_odd_names_with_bit_storage(table: Any, roles: Roles, name: str, column: str) -> None:
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        ident = sql.Identifier(name).as_string(conn)
        conn.execute(f"CREATE TABLE {ident} (id int PRIMARY KEY, body text)")
        try:
            add_embedding(conn, name, column, source="body", dtype="bit", queue_existing=False)
            conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(sql.Identifier(name)))
            conn.execute(sql.SQL("INSERT INTO {} (id, body, {}) SELECT id, body, embedding FROM items")
                         .format(sql.Identifier(name), sql.Identifier(column)))  # fmt: skip
            conn.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(sql.Identifier(name)))
            conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(name)))
            assert conn.execute("SELECT pgsim.bit_index(%s::regclass, %s)", [ident, column]).fetchone()[0] is not None
            query = vectors[31]
            hits, plan = search_with_plan(conn, name, column, query, k=K, tuning=WALK)
            np.testing.assert_allclose([h.distance for h in hits], exact_nearest(vectors, query), atol=1e-5)
            rows = walk_knn(conn, ident, column, query)
            np.testing.assert_allclose([d for _, d in rows], exact_nearest(vectors, query), atol=1e-5)
        finally:
            conn.execute(f"DROP TABLE {ident}")
            conn.execute("DELETE FROM pgsim.queue")


# ---- lifecycle: change, remove, ingest ----


def test_change_embedding_keeps_bit_storage_and_its_index(table: Any, roles: Roles) -> None:
    dsn, _ = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, title text, body text)")
        try:
            conn.execute("INSERT INTO notes SELECT g, 'title ' || g, 'note number ' || g FROM generate_series(1, 12) g")
            add_embedding(conn, "notes", "embedding", source="body", dtype="bit")
            sync(conn, table="notes", allow_superuser=True)
            change_embedding(conn, "notes", "embedding", source="title")
            sync(conn, table="notes", allow_superuser=True)
            sync(conn, table="notes", allow_superuser=True)
            registered = conn.execute("SELECT column_name, dtype, source FROM pgsim.embedding e "
                                      "WHERE table_oid = 'notes'::regclass").fetchall()  # fmt: skip
            assert [(c, d) for c, d, _ in registered] == [("embedding", "bit")], registered
            index = conn.execute("SELECT pgsim.bit_index('notes', 'embedding')").fetchone()[0]
            assert index is not None
            definition = conn.execute("SELECT pg_get_indexdef(%s::regclass)", [index]).fetchone()[0]
            assert "binary_quantize(embedding)" in definition and "bit_hamming_ops" in definition, definition
            column = conn.execute(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = 'notes'::regclass AND attname = 'embedding'"
            ).fetchone()
            assert column == ("vector(384)",)
            # and from bit to vector: a cosine index again
            change_embedding(conn, "notes", "embedding", dtype="vector", source="body")
            sync(conn, table="notes", allow_superuser=True)
            sync(conn, table="notes", allow_superuser=True)
            assert conn.execute("SELECT dtype FROM pgsim.embedding WHERE table_oid = 'notes'::regclass").fetchall() == [
                ("vector",)
            ]
            assert conn.execute("SELECT pgsim.bit_index('notes', 'embedding')").fetchone() == (None,)
            opclasses = conn.execute(
                "SELECT oc.opcname FROM pg_index i JOIN pg_opclass oc ON oc.oid = i.indclass[0] "
                "WHERE i.indrelid = 'notes'::regclass AND oc.opcname LIKE '%%cosine%%'"
            ).fetchall()
            assert opclasses == [("vector_cosine_ops",)]
        finally:
            conn.execute("DROP TABLE notes")
            conn.execute("DELETE FROM pgsim.queue")


def test_remove_embedding_on_bit_storage(table: Any, roles: Roles) -> None:
    dsn, _ = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        conn.execute("CREATE TABLE gone (id int PRIMARY KEY, body text)")
        try:
            add_embedding(conn, "gone", "embedding", source="body", dtype="bit", queue_existing=False)
            remove_embedding(conn, "gone", "embedding")
            assert conn.execute("SELECT count(*) FROM pgsim.embedding WHERE table_name = 'gone'").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM pg_index WHERE indrelid = 'gone'::regclass "
                                "AND NOT indisprimary").fetchone() == (0,)  # fmt: skip
            add_embedding(conn, "gone", "embedding", source="body", dtype="bit", queue_existing=False)
            assert conn.execute("SELECT pgsim.bit_index('gone', 'embedding')").fetchone()[0] is not None
        finally:
            conn.execute("DROP TABLE gone")


def test_ingest_into_bit_storage(table: Any, roles: Roles) -> None:
    from pgsim.columns.bulk_load import ingest

    dsn, _ = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        conn.execute("CREATE TABLE fed (id int PRIMARY KEY, body text)")
        try:
            add_embedding(conn, "fed", "embedding", source="body", dtype="bit", queue_existing=False)
            texts = ["tomato soup with basil", "a parser for xml", "kernel scheduler", "soup recipes"]
            report = ingest(conn, "fed", [{"id": i, "body": t} for i, t in enumerate(texts)])
            assert conn.execute("SELECT count(*) FROM fed WHERE embedding IS NOT NULL").fetchone() == (4,), report
            hits, _ = search_with_plan(conn, "fed", "embedding", "tomato soup", k=2)
            assert [h.row["id"] for h in hits][0] == 0
        finally:
            conn.execute("DROP TABLE fed")
            conn.execute("DELETE FROM pgsim.queue")


@pytest.mark.parametrize("dtype", ["bit", "vector"])
def test_a_quoted_index_name_is_walked(table: Any, roles: Roles, dtype: str) -> None:
    dsn, vectors = table
    name, column = 'q"uoted', "embedding"
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        ident = sql.Identifier(name).as_string(conn)
        conn.execute(f"CREATE TABLE {ident} (id int PRIMARY KEY, body text)")
        try:
            add_embedding(conn, name, column, source="body", dtype=dtype, queue_existing=False)
            conn.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(sql.Identifier(name)))
            conn.execute(sql.SQL("INSERT INTO {} (id, body, embedding) SELECT id, body, embedding FROM items")
                         .format(sql.Identifier(name)))  # fmt: skip
            conn.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(sql.Identifier(name)))
            conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(name)))
            forget_plans()  # the table name was another table's a moment ago
            hits, plan = search_with_plan(conn, name, column, vectors[31], k=K, tuning=WALK)
            assert len(hits) == K
            assert plan.path == "hnsw", plan
        finally:
            conn.execute(f"DROP TABLE {ident}")
            conn.execute("DELETE FROM pgsim.queue")


def test_a_cached_bit_plan_after_the_bit_index_is_dropped_scans_exactly(table: Any, roles: Roles) -> None:
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.owner):
        register(conn)
        with copied(conn, "stale"):
            conn.execute(
                "CREATE INDEX stale_bits ON stale USING hnsw ((binary_quantize(embedding)::bit(384)) bit_hamming_ops)"
            )
            query = _missing_query(conn, "stale", vectors, 80)
            hits, plan = search_with_plan(conn, "stale", "embedding", query, k=K, tuning=WALK)
            assert (plan.path, plan.candidates) == ("hnsw", 80), plan
            conn.execute("DROP INDEX stale_bits")  # the table has no index for the walk any more
            hits, plan = search_with_plan(conn, "stale", "embedding", query, k=K, tuning=WALK)
            np.testing.assert_allclose([h.distance for h in hits], exact_nearest(vectors, query), atol=1e-5,
                                       err_msg=str(plan))  # fmt: skip


def _missing_query(conn: psycopg.Connection[Any], table: str, vectors: np.ndarray, candidates: int) -> np.ndarray:
    """A query whose Hamming-nearest ``candidates`` rows, re-ranked, are not the cosine-nearest K."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        query = rng.normal(0, 1, 384).astype(np.float32)
        by_hamming = conn.execute(
            sql.SQL("SELECT id FROM {} ORDER BY (binary_quantize(embedding)::bit(384) <~> "
                    "binary_quantize(%s::vector)::bit(384)) + 0, id LIMIT %s").format(sql.Identifier(table)),
            [query, candidates],
        ).fetchall()  # fmt: skip
        ids = [i for (i,) in by_hamming]
        reranked = sorted(1 - vectors[ids] @ query / np.linalg.norm(query))[:K]
        if not np.allclose(reranked, exact_nearest(vectors, query), atol=1e-5):
            return query
    raise AssertionError("no query whose Hamming candidates miss")


def test_a_cached_bit_plan_run_where_costs_favour_a_sort_still_walks_the_index(table: Any, roles: Roles) -> None:
    """A plan cached (process-wide) by one connection, run by another whose costs would make PostgreSQL sort
    the table by Hamming distance instead of walking the index (whose candidates, re-ranked, are not the
    nearest): the bit walk runs with sorting off, so the index serves it there too."""
    dsn, vectors = table
    with psycopg.connect(dsn, autocommit=True) as conn, acting(conn, roles.app):
        register(conn)
        query = _missing_query(conn, "items", vectors, 80)
        with psycopg.connect(dsn, autocommit=True) as other, acting(other, roles.app):
            register(other)
            other.execute("SET random_page_cost = 1000000")
            forget_plans()
            hits, plan = search_with_plan(conn, "items", "embedding", query, k=K, tuning=WALK)
            assert (plan.path, plan.candidates) == ("hnsw", 80), plan
            cached, plan = search_with_plan(other, "items", "embedding", query, k=K, tuning=WALK)
            assert (plan.path, plan.candidates) == ("hnsw", 80), plan
            assert [h.row["id"] for h in cached] == [h.row["id"] for h in hits]  # the same walk
            _, text = explain(other, "items", "embedding", query, k=K, tuning=WALK)
            assert "Index Scan using items_embedding_hnsw" in text, text


def test_orm_walk_uses_the_bit_index_where_costs_favour_a_sort(table: Any) -> None:
    """The ORM's bit walk (``IN (SELECT ... ORDER BY Hamming LIMIT candidates)``) runs with sorting off: in a
    session whose costs would sort the table by Hamming distance, the statement it executes is still
    served by the bit index (explained on the same cursor, under the settings it runs with)."""
    from sqlalchemy import create_engine, event, select
    from sqlalchemy.orm import Session

    dsn, vectors = table
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    plans: list[str] = []

    def explain_walk(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if "binary_quantize" in statement and not statement.startswith("EXPLAIN"):
            cursor.execute("EXPLAIN " + statement, parameters)
            plans.append("\n".join(str(row[0]) for row in cursor.fetchall()))

    event.listen(engine, "before_cursor_execute", explain_walk)
    try:
        with Session(engine) as session:
            session.connection().exec_driver_sql("SET random_page_cost = 1000000")
            statement = (
                select(Item.id, Item.embedding.nearest(vectors[5]))
                .order_by(Item.embedding.nearest(vectors[5]))
                .limit(K)
                .execution_options(pgsim_tuning=WALK)
            )
            rows = session.execute(statement).all()
            sort = session.connection().exec_driver_sql("SHOW enable_sort").scalar()
        assert len(rows) == K and rows[0][0] == 5
        assert len(plans) == 1 and "items_embedding_hnsw" in plans[0], plans
        assert sort == "on"  # set back after the walk
    finally:
        engine.dispose()


def test_orm_nearest_on_bit_storage_gives_true_rows_or_a_clear_error(table: Any) -> None:
    """The ORM on a table registered with dtype 'bit': k rows with true distances, in order."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    dsn, vectors = table
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    rng = np.random.default_rng(11)
    try:
        with Session(engine) as session:
            for where, keep in ((Item.id % 3 != 0, lambda i: i % 3 != 0), (Item.id < 2400, lambda i: True)):
                query = vectors[rng.integers(len(vectors))] + rng.normal(0, 0.05, 384).astype(np.float32)
                statement = (
                    select(Item.id, Item.embedding.nearest(query))
                    .where(where)
                    .order_by(Item.embedding.nearest(query))
                    .limit(K)
                    .execution_options(pgsim_tuning=WALK)
                )
                rows = session.execute(statement).all()
                assert len(rows) == K
                ids = [r[0] for r in rows]
                true = 1 - vectors[ids] @ query / np.linalg.norm(query)
                np.testing.assert_allclose([r[1] for r in rows], true, atol=1e-5)
                assert list(true) == sorted(true)
                assert all(keep(i) for i in ids)
                best = exact_nearest(vectors, query, keep)
                assert true[-1] <= best[-1] + 0.02, (list(true), best)  # the re-ranked walk: near the true k
    finally:
        engine.dispose()
