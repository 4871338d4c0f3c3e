"""A registered embedding on a partitioned table (one partition per tenant, HNSW indexes per partition): every
search returns the k nearest rows that pass the filter, each once. A partitioned table's partitions number their
rows alike (the first row of each is ctid (0,1)), so a row found by its ctid alone was every partition's row at
that ctid: pgsim.knn returned four times k rows, rows of other tenants among them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.database import scratch_database

from pgsim.columns.adding import add_embedding
from pgsim.columns.worker import sync
from pgsim.db.schema import install
from pgsim.knn.filtered import search_with_plan
from pgsim.knn.planner import Tuning
from pgsim.psycopg import register
from pgsim.quality.duplicates import near_duplicates
from pgsim.quality.hybrid import hybrid_search

TENANTS, PER_TENANT, K = 4, 300, 10
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]


@pytest.fixture(scope="module")
def table(server_dsn: str) -> Iterator[tuple[str, np.ndarray]]:
    """``parts`` (id, tenant, body, fts, embedding) partitioned by tenant; vectors given, not encoded. Rows 0 and 1
    of tenant 0 are near-duplicates; every partition holds a row at each ctid."""
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((TENANTS * PER_TENANT, 384)).astype(np.float32)
    vectors[TENANTS] = vectors[0] + 0.001 * rng.standard_normal(384).astype(np.float32)  # same tenant as row 0
    with scratch_database(server_dsn, "partitioned") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        install(conn)
        register(conn)
        conn.execute(
            "CREATE TABLE parts (id int, tenant int, body text, fts tsvector GENERATED ALWAYS AS "
            "(to_tsvector('english', body)) STORED, PRIMARY KEY (id, tenant)) PARTITION BY LIST (tenant)"
        )
        for tenant in range(TENANTS - 1):
            conn.execute(f"CREATE TABLE parts_{tenant} PARTITION OF parts FOR VALUES IN ({tenant})")
        add_embedding(conn, "parts", "embedding", source="body", queue_existing=False)
        conn.execute(f"CREATE TABLE parts_{TENANTS - 1} PARTITION OF parts FOR VALUES IN ({TENANTS - 1})")  # later
        with conn.cursor() as cur:
            with cur.copy("COPY parts (id, tenant, body, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "int4", "text", "vector"])
                for i, vector in enumerate(vectors):
                    copy.write_row((i, i % TENANTS, f"{WORDS[i % len(WORDS)]} row {i}", vector))
        conn.execute("ANALYZE parts")
        yield dsn, vectors


def exact(vectors: np.ndarray, query: np.ndarray, keep: Any) -> list[int]:
    distance = 1 - (vectors @ query) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(query)
    return [int(i) for i in np.argsort(distance, kind="stable") if keep(int(i))][:K]


def test_every_search_returns_the_k_nearest_rows_of_the_filter_each_once(table: tuple[str, np.ndarray]) -> None:
    dsn, vectors = table
    rng = np.random.default_rng(8)
    with psycopg.connect(dsn, autocommit=True) as conn:
        register(conn)
        indexes = conn.execute("SELECT count(*) FROM pg_indexes WHERE indexdef LIKE '%USING hnsw%'").fetchone()[0]
        assert indexes == TENANTS + 1  # the parent's and one per partition, the one attached later too
        for _ in range(3):
            query = rng.standard_normal(384).astype(np.float32)
            for tenant in (None, 2):
                keep = (lambda i: True) if tenant is None else (lambda i, t=tenant: i % TENANTS == t)
                expected = exact(vectors, query, keep)
                where = None if tenant is None else {"tenant": tenant}
                small = Tuning(exact_below_rows=0)  # the partitions are small: their size alone would scan them
                hits, plan = search_with_plan(conn, "parts", "embedding", query, k=K, where=where, tuning=small)
                assert [hit.row["id"] for hit in hits] == expected
                # a filter on the partition key keeps all of its partition: the index path, one partition's index
                assert (plan.path, plan.selectivity, plan.fell_back) == ("hnsw", 1.0, False), plan
                filter_ = None if tenant is None else f"tenant = {tenant}"
                rows = conn.execute(
                    "SELECT row FROM pgsim.knn('parts', 'embedding', %s, %s, %s)", [query, K, filter_]
                ).fetchall()
                assert [row["id"] for (row,) in rows] == expected
                fused = hybrid_search(conn, "parts", "embedding", "gamma", k=K, where=where)
                ids = [hit.row["id"] for hit in fused]
                assert len(ids) == len(set(ids)) == K and all(keep(i) for i in ids)


def test_near_duplicates_on_a_partitioned_table_are_the_near_rows_only(table: tuple[str, np.ndarray]) -> None:
    dsn, _ = table
    with psycopg.connect(dsn, autocommit=True) as conn:
        groups = near_duplicates(conn, "parts", "embedding", threshold=0.99)
    assert [sorted((row["id"], row["tenant"]) for row in group) for group in groups] == [[(0, 0), (TENANTS, 0)]]


def test_the_worker_embeds_rows_of_every_partition_and_a_partition_without_the_column_is_refused(
    table: tuple[str, np.ndarray], encoder: Any
) -> None:
    dsn, _ = table
    texts = {
        90001: (0, "PostgreSQL backup and point-in-time recovery"),
        90002: (3, "A recipe for tomato sauce with basil"),  # the partition attached after registration
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        register(conn)
        for key, (tenant, text) in texts.items():
            conn.execute("INSERT INTO parts (id, tenant, body) VALUES (%s, %s, %s)", [key, tenant, text])
        report = sync(conn, table="parts", allow_superuser=True)
        assert (report.embedded, report.failed) == (2, 0)
        for key, (tenant, text) in texts.items():
            hits = search_with_plan(conn, "parts", "embedding", text, k=1, where={"tenant": tenant})[0]
            assert [hit.row["id"] for hit in hits] == [key]
        conn.execute("CREATE TABLE parts_9 (id int NOT NULL, tenant int NOT NULL, body text)")
        with pytest.raises(psycopg.errors.DatatypeMismatch, match="embedding|fts"):
            conn.execute("ALTER TABLE parts ATTACH PARTITION parts_9 FOR VALUES IN (9)")
        conn.execute("DELETE FROM parts WHERE id > 90000")
