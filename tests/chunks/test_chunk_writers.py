"""Every way an application writes a chunked document ends with its chunks and, as its vector, their mean:
``pgsim.ingest`` and an ORM flush leave a chunked column to the workers (they encode nothing for it), and a
vector that hand-written SQL supplies is replaced by the workers'; on one table with the worker role keeping
the chunks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from chunked_docs import chunk_rows, chunked_table, document_class, engine_as, owned_database, sync_as_worker
from fixtures.roles import Roles, acting
from sqlalchemy.orm import Session

from pgsim.columns.bulk_load import ingest
from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.chunking.splitting import model_tokenizer, split
from pgsim.columns.chunking.sync_step import digest
from pgsim.columns.chunking.tables import remove_chunks
from pgsim.encoding.encoder import Encoder
from pgsim.psycopg import register

SETTINGS = Chunks(24, 4)
LONG = (
    "The planner estimates how many rows a filter keeps from the statistics ANALYZE gathers. "
    "An index scan pays off when the filter keeps few rows; a sequential scan reads them all.\n\n"
    "Vacuum removes dead tuples and keeps the visibility map current, so index-only scans skip the heap."
)


Doc = document_class("writers", "flush", SETTINGS)


@pytest.fixture(scope="module")
def database_dsn(server_dsn: str, roles: Roles) -> Iterator[str]:
    with owned_database(server_dsn, roles, "chunk_writers") as dsn:
        yield dsn


@pytest.fixture
def admin(database_dsn: str, roles: Roles) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        chunked_table(conn, roles, "writers", SETTINGS)
        register(conn)
        yield conn


def chunk_texts(admin: psycopg.Connection[Any], encoder: Encoder) -> dict[int, tuple[bool, bool]]:
    """id -> (its chunks are those of its current body, its vector is the normalised mean of those chunks')."""
    stored = chunk_rows(admin, "writers")
    found = {}
    rows = admin.execute("SELECT id, body, embedding FROM writers ORDER BY id").fetchall()
    for id_, body, vector in rows:
        want = [(c.chunk_no, c.start, c.end, digest(c.text)) for c in split(body, SETTINGS, model_tokenizer(encoder))]
        have = [(no, start, end, d) for no, start, end, d, _ in stored.get(id_, [])]
        mean = np.mean([chunk_vector for *_, chunk_vector in stored.get(id_, [])] or [np.zeros(1)], axis=0)
        is_mean = vector is not None and np.allclose(vector.to_numpy(), mean / np.linalg.norm(mean), atol=1e-5)
        found[id_] = (bool(want) and have == want, is_mean)
    return found


def test_ingest_orm_flush_and_sql_with_a_vector_all_end_with_chunks_and_their_mean(
    admin: psycopg.Connection[Any], roles: Roles, database_dsn: str, encoder: Encoder
) -> None:
    with acting(admin, roles.app):
        report = ingest(
            admin, "writers", [{"id": 1, "section": "db", "body": LONG}, {"id": 2, "section": None, "body": "pesto"}]
        )
        assert (report.rows, report.encoded, report.queued) == (2, 0, 2)  # left to the workers
        admin.execute(  # a writer's own vector: kept until the workers write the chunks' mean
            "INSERT INTO writers VALUES (3, 'db', %s, %s)",
            ["A hand-written row.\n\n" + LONG, encoder.encode(["something else entirely"])[0]],
        )
    engine = engine_as(database_dsn, roles.app)
    try:
        with Session(engine) as session:
            session.add(Doc(id=4, section="db", body=LONG + "\n\nWritten through the ORM."))
            session.commit()
            assert session.get(Doc, 4).embedding is None  # the flush left it to the workers
    finally:
        engine.dispose()
    assert admin.execute("SELECT count(*) FROM writers WHERE embedding IS NOT NULL").fetchone() == (1,)
    assert chunk_rows(admin, "writers") == {}
    assert sync_as_worker(admin, roles, "writers").failed == 0
    assert chunk_texts(admin, encoder) == {i: (True, True) for i in (1, 2, 3, 4)}
    with acting(admin, roles.app):  # a new text with the old vector: its chunks and vector follow the new text
        admin.execute("UPDATE writers SET body = %s, embedding = embedding WHERE id = 2", ["pesto, with basil"])
    sync_as_worker(admin, roles, "writers")
    assert chunk_texts(admin, encoder)[2] == (True, True)


def test_a_registration_no_longer_chunked_queues_no_row_written_with_its_vector(
    admin: psycopg.Connection[Any], roles: Roles
) -> None:
    with acting(admin, roles.owner):
        remove_chunks(admin, "writers", "embedding")
    with acting(admin, roles.app):
        ingest(admin, "writers", [{"id": 1, "body": "first"}])
        admin.execute("INSERT INTO writers (id, body) VALUES (2, 'second')")
    queued = admin.execute("SELECT key FROM pgsim.queue ORDER BY key").fetchall()
    assert queued == [({"id": 2},)]  # only the row written without a vector
