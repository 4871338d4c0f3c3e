"""Attacks on pgsim.ingest with a chunked registration: chunking removed or added between the ingest's chunks,
the cache with a chunked and an unchunked column, the report's counts. Real server and model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from chunked_docs import chunk_rows, chunked_connection, document_vectors, mean_of, owned_database
from fixtures.roles import Roles, acting

from pgsim.columns.adding import add_embedding
from pgsim.columns.bulk_load import ingest
from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.chunking.tables import add_chunks, remove_chunks
from pgsim.columns.model_change import change_chunks
from pgsim.columns.worker import sync
from pgsim.encoding.encoder import Encoder

SETTINGS = Chunks(32, 8)
TEXT = (
    "PostgreSQL keeps table statistics for the planner. Autovacuum analyzes tables after enough rows change.\n\n"
    "A tomato sauce simmers slowly with garlic and basil. Italian cooks add olive oil at the end.\n\n"
    "Chess engines search game trees with alpha-beta pruning. Opening books guide the first moves of a game."
)


@pytest.fixture(scope="module")
def database_dsn(server_dsn: str, roles: Roles) -> Iterator[str]:
    with owned_database(server_dsn, roles, "ingest_chunked_attacks") as dsn:
        yield dsn


@pytest.fixture
def admin(database_dsn: str, roles: Roles) -> Iterator[psycopg.Connection[Any]]:
    with chunked_connection(database_dsn, roles, SETTINGS) as conn:
        yield conn


@pytest.fixture
def other(database_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        yield conn


def rows(n: int, start: int = 1) -> list[dict[str, Any]]:
    return [{"id": i, "section": f"section {i}", "body": f"Document {i}. " + TEXT} for i in range(start, start + n)]


def close(a: Any, b: Any) -> bool:
    return a is not None and b is not None and float(np.abs(np.asarray(a) - np.asarray(b)).max()) < 3e-3


def ingest_while(admin: Any, other: Any, roles: Roles, change: Any) -> Any:
    """Ingest 9 rows in chunks of 3 as the owner, running ``change(other)`` as the owner after the first chunk."""
    done: list[int] = []

    def progress(report: Any) -> None:
        if not done:
            with acting(other, roles.owner):
                change(other)
            done.append(report.rows)

    with acting(admin, roles.owner):
        report = ingest(admin, "docs", rows(9), chunk_size=3, progress=progress)
    assert report.rows == 9
    return report


def test_remove_chunks_between_ingest_chunks_leaves_every_row_embedded_with_its_whole_text(
    admin: Any, other: Any, roles: Roles, encoder: Encoder
) -> None:
    report = ingest_while(admin, other, roles, lambda conn: remove_chunks(conn, "docs", "embedding"))
    assert report.queued + report.encoded + report.empty == 9, report
    sync(admin, table="docs", allow_superuser=True)
    vectors = document_vectors(admin)
    missing = sorted(i for i, v in vectors.items() if v is None)
    assert missing == [], f"rows left without a vector after remove_chunks mid-ingest: {missing}"
    for i, vector in vectors.items():
        (want,) = encoder.encode([f"Document {i}. " + TEXT])
        assert close(vector, want), f"row {i} does not hold its whole text's vector"


def test_add_chunks_between_ingest_chunks_gives_every_row_its_chunk_mean(
    admin: Any, other: Any, roles: Roles, encoder: Encoder
) -> None:
    with acting(admin, roles.owner):
        remove_chunks(admin, "docs", "embedding")
    sync(admin, table="docs", allow_superuser=True)
    ingest_while(admin, other, roles, lambda conn: add_chunks(conn, "docs", "embedding", SETTINGS))
    sync(admin, table="docs", allow_superuser=True)
    stored = chunk_rows(admin, "docs")
    vectors = document_vectors(admin)
    assert set(stored) == set(range(1, 10)), f"rows without chunks: {sorted(set(range(1, 10)) - set(stored))}"
    for i, vector in vectors.items():
        want = mean_of([v for *_, v in stored[i]])
        assert close(vector, want), f"row {i} does not hold its chunks' mean"


def test_cache_with_a_chunked_and_an_unchunked_column(admin: Any, roles: Roles, encoder: Encoder) -> None:
    with acting(admin, roles.owner):
        add_embedding(admin, "docs", "sec_vec", source="section")
        first = ingest(admin, "docs", rows(4), cache=True)
        second = ingest(admin, "docs", [{**r, "id": r["id"] + 100} for r in rows(4)], cache=True)
    assert (first.encoded, first.queued, first.cached, first.empty) == (4, 4, 0, 0), first
    assert (second.encoded, second.queued, second.cached, second.empty) == (0, 4, 4, 0), second
    # the chunked column's texts are not put in the cache as if they were encoded whole
    cached = admin.execute("SELECT count(*) FROM pgsim.embedding_cache").fetchone()
    assert cached is not None and cached[0] == 4, cached
    sync(admin, table="docs", allow_superuser=True)
    vectors = document_vectors(admin)
    sections = document_vectors(admin, "sec_vec")
    stored = chunk_rows(admin, "docs")
    for i in [*range(1, 5), *range(101, 105)]:
        assert close(vectors[i], mean_of([v for *_, v in stored[i]]))
        (want,) = encoder.encode([f"section {i - 100 if i > 100 else i}"])
        assert close(sections[i], want)


def test_change_chunks_started_between_ingest_chunks_leaves_every_row_with_its_new_chunk_mean(
    admin: Any, other: Any, roles: Roles, encoder: Encoder
) -> None:
    new_settings = Chunks(48, 4)
    ingest_while(admin, other, roles, lambda conn: change_chunks(conn, "docs", "embedding", new_settings))
    for _ in range(3):
        sync(admin, table="docs", allow_superuser=True)
    stored = chunk_rows(admin, "docs")
    vectors = document_vectors(admin)
    assert set(stored) == set(range(1, 10)), sorted(set(range(1, 10)) - set(stored))
    tokens = admin.execute("SELECT tokens FROM pgsim.chunking").fetchall()
    assert tokens == [(48,)], tokens
    for i, vector in vectors.items():
        assert close(vector, mean_of([v for *_, v in stored[i]])), i
