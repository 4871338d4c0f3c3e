"""Chunks kept in sync by the queue worker, on the real server and model: insert, update (unchanged chunks keep
their vectors and are not encoded again), delete, a document changed while its chunks encode, a worker lost
mid-write (its backend terminated, or its process killed), grants, and removal."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from chunked_docs import chunk_rows, chunked_table, owned_database, sync_as_worker
from fixtures.roles import Roles, acting

from pgsim.columns.batches import checked_encoder, claim_and_encode
from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.chunking.splitting import model_tokenizer, split
from pgsim.columns.chunking.sync_step import digest
from pgsim.columns.chunking.tables import add_chunks, chunk_table_name, remove_chunks
from pgsim.columns.registry import remove_embedding, require_registration
from pgsim.columns.worker import WORKER_APPLICATION_NAME
from pgsim.encoding.encoder import Encoder, encoder_for
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.errors import InvalidInput
from pgsim.knn.documents import search_documents
from pgsim.psycopg import register

SETTINGS = Chunks(32, 8)
PARAGRAPHS = [
    "PostgreSQL keeps table statistics for the planner. Autovacuum analyzes tables after enough rows change.",
    "A tomato sauce simmers slowly with garlic and basil. Italian cooks add olive oil at the end.",
    "Chess engines search game trees with alpha-beta pruning. Opening books guide the first moves of a game.",
]


@pytest.fixture(scope="module")
def database_dsn(server_dsn: str, roles: Roles) -> Iterator[str]:
    with owned_database(server_dsn, roles, "chunk_sync") as dsn:
        yield dsn


@pytest.fixture
def admin(database_dsn: str, roles: Roles) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        chunked_table(conn, roles, "docs", SETTINGS)
        register(conn)
        yield conn


def write_as_app(admin: psycopg.Connection[Any], roles: Roles, statement: str, params: Any = None) -> None:
    with acting(admin, roles.app):
        admin.execute(statement, params)


def expected_chunks(encoder: Encoder, text: str) -> list[Any]:
    return split(text, SETTINGS, model_tokenizer(encoder))


def assert_chunks_of(admin: Any, encoder: Encoder, doc_id: int, text: str, *, vectors: bool = True) -> None:
    """The document's chunks are exactly those of ``text``: spans, digests and (``vectors``) the encoder's vectors."""
    stored = chunk_rows(admin, "docs").get(doc_id, [])
    expected = expected_chunks(encoder, text)
    assert [(no, start, end, d) for no, start, end, d, _ in stored] == [
        (c.chunk_no, c.start, c.end, digest(c.text)) for c in expected
    ]
    if vectors and expected:
        encoded = encoder.encode([c.text for c in expected])
        for (*_, vector), want in zip(stored, encoded, strict=True):
            assert float(np.abs(vector - want).max()) < 1e-5


def test_inserted_documents_get_their_chunks_and_their_mean_as_their_vector(
    admin: Any, roles: Roles, encoder: Encoder
) -> None:
    long_text = "\n\n".join(PARAGRAPHS * 3)
    insert = "INSERT INTO docs VALUES (1, 'db', %s), (2, 'food', 'pesto'), (3, 'x', NULL), (4, 'x', '')"
    write_as_app(admin, roles, insert, [long_text])
    report = sync_as_worker(admin, roles, "docs")
    assert (report.embedded, report.emptied, report.failed) == (2, 2, 0)
    assert len(expected_chunks(encoder, long_text)) >= 6
    assert_chunks_of(admin, encoder, 1, long_text)
    assert_chunks_of(admin, encoder, 2, "pesto")
    assert set(chunk_rows(admin, "docs")) == {1, 2}  # NULL and empty text: no chunk
    own = admin.execute("SELECT embedding FROM docs WHERE id = 1").fetchone()[0]  # the mean of its chunks
    mean = np.mean([vector for *_, vector in chunk_rows(admin, "docs")[1]], axis=0)
    assert float(np.abs(np.asarray(own.to_list()) - mean / np.linalg.norm(mean)).max()) < 1e-5
    with acting(admin, roles.app):  # the application reads the chunks, but cannot write them
        assert (
            admin.execute("SELECT count(*) FROM docs__embedding_chunks").fetchone()[0]
            == len(expected_chunks(encoder, long_text)) + 1
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            admin.execute("DELETE FROM docs__embedding_chunks")


def test_an_update_rechunks_and_encodes_only_the_chunks_that_changed(
    admin: Any, roles: Roles, encoder: Encoder
) -> None:
    before = "\n\n".join(PARAGRAPHS)
    write_as_app(admin, roles, "INSERT INTO docs VALUES (1, 'db', %s)", [before])
    sync_as_worker(admin, roles, "docs")
    old = {d: (no, vector) for no, _, _, d, vector in chunk_rows(admin, "docs")[1]}
    after = "\n\n".join([*PARAGRAPHS[:2], "Knitting patterns use purl and knit stitches in rows."])
    write_as_app(admin, roles, "UPDATE docs SET body = %s WHERE id = 1", [after])
    worker_encoder = encoder_for(DEFAULT_MODEL)
    encoded_before = worker_encoder.stats.encoded
    assert sync_as_worker(admin, roles, "docs").embedded == 1
    new = chunk_rows(admin, "docs")[1]
    changed = [no for no, _, _, d, _ in new if d not in old]
    assert changed and len(changed) < len(new)
    # the changed chunks only (the document's vector is their mean): the others kept the very vectors they had
    assert worker_encoder.stats.encoded - encoded_before == len(changed)
    for _, _, _, d, vector in new:
        if d in old:
            assert np.array_equal(vector, old[d][1])
    assert_chunks_of(admin, encoder, 1, after)


def test_two_lanes_write_each_batchs_chunks_in_its_own_transaction(
    admin: Any, roles: Roles, database_dsn: str, encoder: Encoder
) -> None:
    texts = {i: "\n\n".join(PARAGRAPHS[i % 3 :] + PARAGRAPHS[: i % 3]) + f" Document {i}." for i in range(1, 9)}
    for doc_id, text in texts.items():
        write_as_app(admin, roles, "INSERT INTO docs VALUES (%s, 'x', %s)", [doc_id, text])
    with psycopg.connect(database_dsn, autocommit=True) as second, acting(second, roles.worker):
        report = sync_as_worker(admin, roles, "docs", batch_size=2, overlap_with=second)
    assert (report.embedded, report.batches) == (8, 4)
    for doc_id, text in texts.items():
        assert_chunks_of(admin, encoder, doc_id, text)


def test_with_the_cache_rechunked_documents_are_looked_up_not_encoded(
    admin: Any, roles: Roles, encoder: Encoder
) -> None:
    text = "\n\n".join(PARAGRAPHS) + " Cached."
    write_as_app(admin, roles, "INSERT INTO docs VALUES (1, 'x', %s)", [text])
    assert sync_as_worker(admin, roles, "docs", cache=True).cached == 0
    with acting(admin, roles.owner):  # a new chunk table, every row queued; its grants follow the column's
        remove_chunks(admin, "docs", "embedding")
        add_chunks(admin, "docs", "embedding", SETTINGS)
    worker_encoder = encoder_for(DEFAULT_MODEL)
    encoded_before = worker_encoder.stats.encoded
    assert sync_as_worker(admin, roles, "docs", cache=True).cached == len(expected_chunks(encoder, text)) > 1
    assert worker_encoder.stats.encoded == encoded_before  # no chunk was encoded again
    assert_chunks_of(admin, encoder, 1, text)


def test_a_deleted_document_takes_its_chunks(admin: Any, roles: Roles) -> None:
    write_as_app(admin, roles, "INSERT INTO docs VALUES (1, 'a', 'first document'), (2, 'b', 'second document')")
    sync_as_worker(admin, roles, "docs")
    write_as_app(admin, roles, "DELETE FROM docs WHERE id = 1")  # the app has no privilege on the chunk table
    assert set(chunk_rows(admin, "docs")) == {2}


def test_a_document_changed_while_its_chunks_encode_ends_with_its_new_texts_chunks(
    admin: Any, roles: Roles, database_dsn: str, encoder: Encoder
) -> None:
    old_text, new_text = "\n\n".join(PARAGRAPHS), "\n\n".join(reversed(PARAGRAPHS)) + "\n\nA closing remark."
    write_as_app(admin, roles, "INSERT INTO docs VALUES (1, 'db', %s)", [old_text])
    sync_as_worker(admin, roles, "docs")
    write_as_app(admin, roles, "UPDATE docs SET body = body || ' More words.' WHERE id = 1")
    in_between = old_text + " More words."
    with psycopg.connect(database_dsn, autocommit=True) as writer:

        @contextlib.contextmanager
        def encoding_while_a_writer_commits() -> Iterator[None]:  # the batch's encode step, as the worker runs it
            with acting(writer, roles.app):
                writer.execute("UPDATE docs SET body = %s WHERE id = 1", [new_text])  # commits, without waiting
            yield

        with acting(admin, roles.worker):
            registration = require_registration(admin, "docs", "embedding")
            report = claim_and_encode(admin, registration, checked_encoder(registration), 10, retried=False,
                                      max_attempts=5, retry_delay=1.0, cache=False,
                                      encoding=encoding_while_a_writer_commits())  # fmt: skip
    assert report is not None and (report.stale, report.embedded) == (1, 0)
    assert_chunks_of(admin, encoder, 1, old_text, vectors=False)  # not a mix: the old set, whole
    assert sync_as_worker(admin, roles, "docs").embedded == 1  # the entry stayed queued for the new text
    assert_chunks_of(admin, encoder, 1, new_text)
    assert in_between not in [c.text for c in expected_chunks(encoder, new_text)]


def test_a_document_deleted_while_its_chunks_encode_ends_without_chunks(
    admin: Any, roles: Roles, database_dsn: str
) -> None:
    write_as_app(admin, roles, "INSERT INTO docs VALUES (1, 'a', %s), (2, 'b', 'kept')", ["\n\n".join(PARAGRAPHS)])
    with psycopg.connect(database_dsn, autocommit=True) as writer:

        @contextlib.contextmanager
        def encoding_while_a_writer_deletes() -> Iterator[None]:
            with acting(writer, roles.app):
                writer.execute("DELETE FROM docs WHERE id = 1")
            yield

        with acting(admin, roles.worker):
            registration = require_registration(admin, "docs", "embedding")
            report = claim_and_encode(admin, registration, checked_encoder(registration), 10, retried=False,
                                      max_attempts=5, retry_delay=1.0, cache=False,
                                      encoding=encoding_while_a_writer_deletes())  # fmt: skip
    assert report is not None and (report.embedded, report.failed) == (1, 0)
    assert set(chunk_rows(admin, "docs")) == {2}
    assert sync_as_worker(admin, roles, "docs").missing == 1  # its entry ends as a deleted row's
    assert admin.execute("SELECT count(*) FROM pgsim.queue").fetchone()[0] == 0


def test_halfvec_embeddings_chunk_and_search(database_dsn: str, roles: Roles, encoder: Encoder) -> None:
    with psycopg.connect(database_dsn, autocommit=True) as admin:
        chunked_table(admin, roles, "half", SETTINGS, dtype="halfvec")
        write_as_app(admin, roles, "INSERT INTO half VALUES (1, 'a', %s), (2, 'b', 'pesto')", ["\n\n".join(PARAGRAPHS)])
        assert sync_as_worker(admin, roles, "half").embedded == 2
        stored = chunk_rows(admin, "half")
        assert len(stored[1]) == len(expected_chunks(encoder, "\n\n".join(PARAGRAPHS)))
        want = encoder.encode([expected_chunks(encoder, "\n\n".join(PARAGRAPHS))[0].text])[0]
        assert float(np.abs(stored[1][0][4] - want).max()) < 1e-2  # half precision
        with acting(admin, roles.app):
            hits = search_documents(admin, "half", "embedding", "alpha-beta pruning in chess engines", k=2)
        assert [hit.row["id"] for hit in hits] == [1, 2] and hits[0].chunk_no == len(stored[1]) - 1


def wait_for(condition: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)
    return found


@contextlib.contextmanager
def slow_chunk_writes(admin: Any, roles: Roles, seconds: float) -> Iterator[None]:
    """Every insert into the chunk table sleeps ``seconds`` first: a worker can be lost inside one."""
    with acting(admin, roles.owner):
        admin.execute("CREATE FUNCTION public.slow_chunks() RETURNS trigger LANGUAGE plpgsql AS "
                      f"$$ BEGIN PERFORM pg_catalog.pg_sleep({seconds}); RETURN NULL; END $$")  # fmt: skip
        admin.execute(
            "CREATE TRIGGER slow AFTER INSERT ON docs__embedding_chunks EXECUTE FUNCTION public.slow_chunks()"
        )
    try:
        yield
    finally:
        with acting(admin, roles.owner):
            admin.execute("DROP TRIGGER slow ON docs__embedding_chunks")
            admin.execute("DROP FUNCTION public.slow_chunks()")


def sleeping_backend(admin: Any, application_name: str) -> Any:
    return admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND wait_event = 'PgSleep' "
        "AND datname = pg_catalog.current_database()",
        [application_name],
    ).fetchone()


def test_a_worker_lost_while_writing_chunks_leaves_the_old_chunk_set(
    admin: Any, roles: Roles, database_dsn: str, encoder: Encoder
) -> None:
    old_text = "\n\n".join(PARAGRAPHS)
    write_as_app(admin, roles, "INSERT INTO docs VALUES (1, 'db', %s)", [old_text])
    sync_as_worker(admin, roles, "docs")
    new_text = "A different text altogether.\n\n" + PARAGRAPHS[0]
    write_as_app(admin, roles, "UPDATE docs SET body = %s WHERE id = 1", [new_text])
    failures: list[BaseException] = []
    with (
        slow_chunk_writes(admin, roles, 30),
        psycopg.connect(database_dsn, autocommit=True, application_name="doomed worker") as doomed,
    ):

        def drain() -> None:
            try:
                sync_as_worker(doomed, roles, "docs")
            except BaseException as exc:  # the connection is terminated under it
                failures.append(exc)

        thread = threading.Thread(target=drain)
        thread.start()
        pid = wait_for(lambda: sleeping_backend(admin, "doomed worker"))
        admin.execute("SELECT pg_terminate_backend(%s)", [pid[0]])
        thread.join(timeout=60)
    assert failures and isinstance(failures[0], psycopg.OperationalError)
    assert_chunks_of(admin, encoder, 1, old_text, vectors=False)  # rolled back: the old chunks, whole
    assert admin.execute("SELECT count(*) FROM pgsim.queue").fetchone()[0] == 1  # still queued
    assert sync_as_worker(admin, roles, "docs").embedded == 1
    assert_chunks_of(admin, encoder, 1, new_text)


def test_a_worker_process_killed_mid_document_leaves_nothing_half_written(
    admin: Any, roles: Roles, database_dsn: str, encoder: Encoder
) -> None:
    """``pgsim worker`` SIGKILLed while its backend writes a document's chunks: while that backend runs on and
    after it is gone, searches see the old chunks and the old vector, whole; the row stays queued."""
    old_text = "\n\n".join(PARAGRAPHS)
    write_as_app(admin, roles, "INSERT INTO docs VALUES (1, 'db', %s)", [old_text])
    sync_as_worker(admin, roles, "docs")
    own_vector = "SELECT embedding::text FROM docs WHERE id = 1"
    before = admin.execute(own_vector).fetchone()
    new_text = "A different text altogether.\n\n" + PARAGRAPHS[0]
    write_as_app(admin, roles, "UPDATE docs SET body = %s WHERE id = 1", [new_text])
    command = [sys.executable, "-m", "pgsim.cli", "--dsn", database_dsn, "worker", "docs", "embedding",
               "--once", "--allow-superuser"]  # fmt: skip
    with slow_chunk_writes(admin, roles, 4):
        worker = subprocess.Popen(command, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            wait_for(lambda: sleeping_backend(admin, WORKER_APPLICATION_NAME), timeout=120)
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=30)
        finally:
            worker.kill()
        assert_chunks_of(admin, encoder, 1, old_text)  # its backend still inserting: nothing of it shows
        wait_for(lambda: not admin.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
                                           "AND datname = pg_catalog.current_database()",
                                           [WORKER_APPLICATION_NAME]).fetchone(), timeout=60)  # fmt: skip
    assert_chunks_of(admin, encoder, 1, old_text)
    assert admin.execute(own_vector).fetchone() == before
    assert admin.execute("SELECT count(*) FROM pgsim.queue").fetchone()[0] == 1
    assert sync_as_worker(admin, roles, "docs").embedded == 1
    assert_chunks_of(admin, encoder, 1, new_text)


def test_chunk_tables_follow_the_registration(admin: Any, roles: Roles) -> None:
    with acting(admin, roles.owner):
        with pytest.raises(InvalidInput, match="chunked already"):
            add_chunks(admin, "docs", "embedding", SETTINGS)
        owner = admin.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'docs__embedding_chunks'").fetchone()
        assert owner == (roles.owner,)
        remove_chunks(admin, "docs", "embedding")
        assert admin.execute("SELECT to_regclass('docs__embedding_chunks')").fetchone() == (None,)
        with pytest.raises(InvalidInput, match="at most 254"):
            add_chunks(admin, "docs", "embedding", Chunks(300))
        add_chunks(admin, "docs", "embedding", Chunks(64))
    with acting(admin, roles.app), pytest.raises(InvalidInput, match="Only the owner"):
        remove_chunks(admin, "docs", "embedding")
    with acting(admin, roles.owner):
        remove_embedding(admin, "docs", "embedding")  # takes the chunk table with it
        left = (
            "SELECT to_regclass('docs__embedding_chunks'), count(*) FROM pgsim.chunking WHERE table_oid = %s::regclass"
        )
        assert admin.execute(left, ["docs"]).fetchone() == (None, 0)


def test_long_names_are_cut_with_a_hash() -> None:
    short = chunk_table_name("docs", "embedding")
    assert short == "docs__embedding_chunks"
    long_a, long_b = chunk_table_name("t" * 60, "embedding_a"), chunk_table_name("t" * 60, "embedding_b")
    assert len(long_a.encode()) <= 63 and long_a.endswith("_chunks") and long_a != long_b
