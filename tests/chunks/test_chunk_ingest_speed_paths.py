"""The worker's shortcuts for chunked columns, on the real server and model: a batch encodes its documents'
texts and their new chunks in one encoder call, and a document cut into one chunk that is its whole text is
encoded once, that chunk taking the document's own vector."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import psycopg
import pytest
from chunked_docs import chunk_rows, chunked_table, owned_database, sync_as_worker
from fixtures.roles import Roles, acting

from pgsim.columns.batches import claim_and_encode
from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.chunking.splitting import Chunk, model_tokenizer, split
from pgsim.columns.chunking.sync_step import whole_document
from pgsim.columns.registry import require_registration
from pgsim.encoding.encoder import Encoder, Kind, Vector, encoder_for
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.psycopg import register

SETTINGS = Chunks(32, 8)
LONG = "\n\n".join(
    [
        "PostgreSQL keeps table statistics for the planner. Autovacuum analyzes tables after enough rows change.",
        "A tomato sauce simmers slowly with garlic and basil. Italian cooks add olive oil at the end.",
        "Chess engines search game trees with alpha-beta pruning. Opening books guide the first moves of a game.",
    ]
)


class CountingEncoder(Encoder):
    """The real encoder, recording the texts of each call."""

    def __init__(self) -> None:
        super().__init__(DEFAULT_MODEL)
        self.calls: list[list[str | None]] = []

    def encode(self, texts: Sequence[str | None], *, kind: Kind = "document", **options: Any) -> list[Vector | None]:
        self.calls.append(list(texts))
        return super().encode(texts, kind=kind, **options)


@pytest.fixture(scope="module")
def database_dsn(server_dsn: str, roles: Roles) -> Iterator[str]:
    with owned_database(server_dsn, roles, "chunk_speed") as dsn:
        yield dsn


@pytest.fixture
def admin(database_dsn: str, roles: Roles) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        chunked_table(conn, roles, "docs", SETTINGS)
        register(conn)
        yield conn


def insert(admin: psycopg.Connection[Any], roles: Roles, rows: list[tuple[int, str]]) -> None:
    with acting(admin, roles.app):
        for doc_id, text in rows:
            admin.execute("INSERT INTO docs VALUES (%s, 'x', %s)", [doc_id, text])


def document_vectors(admin: psycopg.Connection[Any]) -> dict[int, Any]:
    rows = admin.execute("SELECT id, embedding FROM docs").fetchall()
    return {doc_id: np.asarray(vector.to_list(), dtype=np.float32) for doc_id, vector in rows}


def test_a_one_chunk_document_is_encoded_once_and_its_chunk_takes_its_vector(
    admin: Any, roles: Roles, encoder: Encoder
) -> None:
    # the same string as its chunk; one whose chunk drops its outer whitespace (the same word pieces); a long one
    insert(admin, roles, [(1, "Pesto sauce with basil."), (2, "  Garlic bread, toasted.\n"), (3, LONG)])
    long_chunks = split(LONG, SETTINGS, model_tokenizer(encoder))
    assert len(long_chunks) > 1
    worker_encoder = encoder_for(DEFAULT_MODEL)
    encoded_before = worker_encoder.stats.encoded
    assert sync_as_worker(admin, roles, "docs").embedded == 3
    assert worker_encoder.stats.encoded - encoded_before == 3 + len(long_chunks)  # one chunk's texts: once
    stored, documents = chunk_rows(admin, "docs"), document_vectors(admin)
    for doc_id, text in ((1, "Pesto sauce with basil."), (2, "Garlic bread, toasted.")):
        ((chunk_no, start, end, _, vector),) = stored[doc_id]
        assert chunk_no == 0 and admin.execute("SELECT substr(body, %s, %s) FROM docs WHERE id = %s",
                                               [start + 1, end - start, doc_id]).fetchone() == (text,)  # fmt: skip
        assert np.array_equal(vector, documents[doc_id])
        assert float(np.abs(vector - encoder.encode([text])[0]).max()) < 1e-5
    want = encoder.encode([chunk.text for chunk in long_chunks])
    assert len(stored[3]) == len(long_chunks)
    for (*_, vector), expected in zip(stored[3], want, strict=True):
        assert float(np.abs(vector - expected).max()) < 1e-5
    assert not any(np.array_equal(vector, documents[3]) for *_, vector in stored[3])


def test_a_batch_encodes_its_documents_and_their_new_chunks_in_one_call(
    admin: Any, roles: Roles, encoder: Encoder
) -> None:
    texts = {1: LONG, 2: LONG.replace("garlic", "onion"), 3: "A short note."}
    insert(admin, roles, list(texts.items()))
    counting = CountingEncoder()
    counting.warn_truncation = False
    with acting(admin, roles.worker):
        registration = require_registration(admin, "docs", "embedding")
        report = claim_and_encode(admin, registration, counting, 10, retried=False, max_attempts=5,
                                  retry_delay=1.0, cache=False, encoding=contextlib.nullcontext())  # fmt: skip
    assert report is not None and report.embedded == 3
    tokenizer = model_tokenizer(encoder)
    chunks = {doc_id: split(text, SETTINGS, tokenizer) for doc_id, text in texts.items()}
    (call,) = counting.calls
    assert call[:3] == list(texts.values())  # the documents' texts, then their chunks
    # the chunks the two long texts share and the short text's one chunk (its own text) are not asked for again
    assert sorted(call[3:]) == sorted(c.text for c in chunks[1] + chunks[2])
    stored = chunk_rows(admin, "docs")
    for doc_id in texts:
        assert [(no, start, end) for no, start, end, _, _ in stored[doc_id]] == [
            (c.chunk_no, c.start, c.end) for c in chunks[doc_id]
        ]
        for (*_, vector), want in zip(stored[doc_id], encoder.encode([c.text for c in chunks[doc_id]]), strict=True):
            assert float(np.abs(vector - want).max()) < 1e-5


def test_whole_document_needs_one_chunk_read_as_the_whole_text(encoder: Encoder) -> None:
    tokenizer = model_tokenizer(encoder)
    assert whole_document("pesto", split("pesto", SETTINGS, tokenizer), encoder, tokenizer)
    assert whole_document(" pesto\n\n", split(" pesto\n\n", SETTINGS, tokenizer), encoder, tokenizer)
    assert not whole_document(LONG, split(LONG, SETTINGS, tokenizer), encoder, tokenizer)  # several chunks
    assert not whole_document("pesto sauce", [Chunk(0, 0, 5, "pesto")], encoder, tokenizer)  # other pieces
    assert not whole_document(None, [], encoder, tokenizer)
