"""A chunked column's own vector is the normalised mean of its chunks' vectors, written by the worker with the
chunks: each new chunk is encoded once, in one encoder call per batch, and nothing else is (not the whole
text); a changed document's unchanged chunks keep their vectors and still count in its mean. On the real
server and model, with the worker role."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from chunked_docs import (
    CountingEncoder,
    chunk_rows,
    chunked_table,
    document_vectors,
    mean_of,
    one_batch,
    owned_database,
    sync_as_worker,
)
from fixtures.roles import Roles, acting

from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.chunking.splitting import model_tokenizer, split
from pgsim.columns.chunking.sync_step import document_vector
from pgsim.encoding.encoder import Encoder
from pgsim.psycopg import register

SETTINGS = Chunks(32, 8)
PARAGRAPHS = [
    "PostgreSQL keeps table statistics for the planner. Autovacuum analyzes tables after enough rows change.",
    "A tomato sauce simmers slowly with garlic and basil. Italian cooks add olive oil at the end.",
    "Chess engines search game trees with alpha-beta pruning. Opening books guide the first moves of a game.",
]
LONG = "\n\n".join(PARAGRAPHS)


@pytest.fixture(scope="module")
def database_dsn(server_dsn: str, roles: Roles) -> Iterator[str]:
    with owned_database(server_dsn, roles, "chunk_vector") as dsn:
        yield dsn


@pytest.fixture(params=["vector", "halfvec"])
def admin(request: pytest.FixtureRequest, database_dsn: str, roles: Roles) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        chunked_table(conn, roles, "docs", SETTINGS, dtype=request.param)
        register(conn)
        yield conn


def insert(admin: psycopg.Connection[Any], roles: Roles, rows: dict[int, str | None]) -> None:
    with acting(admin, roles.app):
        for doc_id, text in rows.items():
            admin.execute("INSERT INTO docs VALUES (%s, 'x', %s)", [doc_id, text])


def test_a_batch_encodes_each_new_chunk_once_and_writes_their_mean_as_the_documents_vector(
    admin: Any, roles: Roles, encoder: Encoder
) -> None:
    texts: dict[int, str | None] = {1: LONG, 2: "  A short note.\n", 3: None, 4: "   "}
    insert(admin, roles, texts)
    counting = CountingEncoder()
    report = one_batch(admin, roles, counting)
    assert report is not None and (report.embedded, report.emptied) == (2, 2)
    chunks = {doc_id: split(text, SETTINGS, model_tokenizer(encoder)) for doc_id, text in texts.items()}
    assert len(chunks[1]) > 1 and len(chunks[2]) == 1 and chunks[3] == chunks[4] == []
    (call,) = counting.calls  # one call, the chunks' texts only: no document text is encoded
    assert call == [c.text for c in chunks[1] + chunks[2]]
    stored, documents = chunk_rows(admin, "docs"), document_vectors(admin)
    assert documents[3] is None and documents[4] is None and set(stored) == {1, 2}
    for doc_id in (1, 2):
        want = encoder.encode([c.text for c in chunks[doc_id]])
        assert [(no, start, end) for no, start, end, _, _ in stored[doc_id]] == [
            (c.chunk_no, c.start, c.end) for c in chunks[doc_id]
        ]
        for (*_, vector), expected in zip(stored[doc_id], want, strict=True):
            assert float(np.abs(vector - expected).max()) < 2e-3  # halfvec keeps about three digits
        assert float(np.abs(documents[doc_id] - mean_of(want)).max()) < 2e-3
    assert float(np.linalg.norm(documents[1])) == pytest.approx(1.0, abs=2e-3)
    assert float(documents[1] @ encoder.encode([LONG])[0]) < 0.99  # the mean, not the first window's vector


def test_a_changed_document_encodes_only_its_new_chunks_and_its_mean_counts_the_kept_ones(
    admin: Any, roles: Roles, encoder: Encoder
) -> None:
    insert(admin, roles, {1: LONG})
    sync_as_worker(admin, roles, "docs")
    changed = "\n\n".join([*PARAGRAPHS[:2], "Rowing crews train on cold rivers at dawn, six days a week."])
    with acting(admin, roles.app):
        admin.execute("UPDATE docs SET body = %s WHERE id = 1", [changed])
    counting = CountingEncoder()
    assert one_batch(admin, roles, counting).embedded == 1
    old = {c.text for c in split(LONG, SETTINGS, model_tokenizer(encoder))}
    new = split(changed, SETTINGS, model_tokenizer(encoder))
    (call,) = counting.calls
    assert call == [c.text for c in new if c.text not in old] and len(call) < len(new)
    want = mean_of(encoder.encode([c.text for c in new]))
    assert float(np.abs(document_vectors(admin)[1] - want).max()) < 2e-3
    assert [no for no, *_ in chunk_rows(admin, "docs")[1]] == list(range(len(new)))


def test_document_vector_is_the_unit_mean_and_keeps_a_direction() -> None:
    x, y = np.eye(3, dtype=np.float32)[:2]
    assert document_vector([]) is None
    assert document_vector([x]) is x
    assert np.allclose(document_vector([x, y]), (x + y) / np.sqrt(2))
    assert document_vector([x, -x]) is x  # no mean direction: the first chunk stands for the text
