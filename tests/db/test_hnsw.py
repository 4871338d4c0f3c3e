"""HNSW builds sized for their graph: pgvector's own notice shows the difference, and no setting leaks."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgsim.db.hnsw import HNSW, build_settings, create_hnsw_index, graph_bytes

NO_LONGER_FITS = "graph no longer fits into maintenance_work_mem"


def build_notices(conn: psycopg.Connection[Any], statement: Any) -> list[str]:
    notices: list[str] = []
    conn.add_notice_handler(lambda diagnostic: notices.append(diagnostic.message_primary or ""))
    conn.execute(statement)
    return notices


@pytest.fixture
def small_memory(db: str) -> Any:
    """Table ``bigger`` (the 400 sample vectors four times: a graph of about 3.5 MB) and a connection whose
    maintenance_work_mem (1 MB, PostgreSQL's minimum) is too small for it."""
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bigger")
        conn.execute(
            "CREATE TABLE bigger AS SELECT row_number() OVER () AS id, embedding FROM packages, generate_series(1, 4)"
        )
        conn.execute("ANALYZE bigger")
        conn.execute("SET maintenance_work_mem = '1MB'")
        yield conn


def test_the_estimate_covers_the_graph_pgvector_builds(small_memory: Any) -> None:
    settings = build_settings(small_memory, "bigger", "embedding", m=16)
    assert settings.estimated_graph_mb * 2**20 == pytest.approx(graph_bytes(1600, 384, "vector", 16))
    assert settings.maintenance_work_mem_mb >= settings.estimated_graph_mb * 1.25
    # the same build at the session's 1 MB overflows; pgsim's sizing does not
    notices = build_notices(small_memory, "CREATE INDEX unsized ON bigger USING hnsw (embedding vector_cosine_ops)")
    assert any(NO_LONGER_FITS in notice for notice in notices), notices
    notices: list[str] = []
    small_memory.add_notice_handler(lambda diagnostic: notices.append(diagnostic.message_primary or ""))
    report = create_hnsw_index(small_memory, "bigger", "embedding", "sized", HNSW())
    assert not any(NO_LONGER_FITS in notice for notice in notices), notices
    assert report.settings == settings and not report.serial_retry


@pytest.mark.parametrize("concurrently", [False, True])
def test_build_settings_do_not_outlive_the_build(small_memory: Any, concurrently: bool) -> None:
    name = "sized_concurrently" if concurrently else "sized"
    create_hnsw_index(small_memory, "bigger", "embedding", name, HNSW(8, 32), concurrently=concurrently)
    assert small_memory.execute("SHOW maintenance_work_mem").fetchone() == ("1MB",)
    definition = small_memory.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", [name]).fetchone()
    assert definition is not None and "m='8'" in definition[0] and "ef_construction='32'" in definition[0]


def test_a_concurrent_build_needs_autocommit(db: str) -> None:
    from pgsim.errors import InvalidInput

    with psycopg.connect(db) as conn, pytest.raises(InvalidInput, match="autocommit"):
        create_hnsw_index(conn, "packages", "embedding", "never", HNSW(), concurrently=True)
