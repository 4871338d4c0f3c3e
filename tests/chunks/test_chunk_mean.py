"""A chunked column's own vector is the normalised mean of its chunks' vectors, written by the workers with the
chunks: each new chunk is encoded once, in one encoder call per batch, and nothing else is (not the whole
text); a changed document's kept chunks count in its mean; ingest and the ORM flush leave a chunked column to
the workers. Then attacks on it: removing chunks, vectors written by hand, ingest's counts, repeated
paragraphs, blank texts, the cache, model and chunk changes, row-level security, pgvector in another schema,
very long documents, two lanes. On the real server and model, with the worker role."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from chunked_docs import (
    CountingEncoder,
    chunk_rows,
    chunked_connection,
    document_class,
    document_vectors,
    engine_as,
    mean_of,
    one_batch,
    owned_database,
    sync_as_worker,
)
from fixtures.roles import Roles, acting
from sqlalchemy import insert
from sqlalchemy.orm import Session

from pgsim.columns.adding import add_embedding
from pgsim.columns.bulk_load import ingest
from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.chunking.splitting import model_tokenizer, split
from pgsim.columns.chunking.sync_step import digest, document_vector
from pgsim.columns.chunking.tables import remove_chunks
from pgsim.columns.grants import grant
from pgsim.columns.model_change import change_chunks
from pgsim.columns.worker import sync
from pgsim.encoding.encoder import Encoder

SETTINGS = Chunks(32, 8)
PARAGRAPHS = [
    "PostgreSQL keeps table statistics for the planner. Autovacuum analyzes tables after enough rows change.",
    "A tomato sauce simmers slowly with garlic and basil. Italian cooks add olive oil at the end.",
    "Chess engines search game trees with alpha-beta pruning. Opening books guide the first moves of a game.",
]
LONG = "\n\n".join(PARAGRAPHS)
TOLERANCE = 3e-3  # halfvec keeps about three digits


@pytest.fixture(scope="module")
def database_dsn(server_dsn: str, roles: Roles) -> Iterator[str]:
    with owned_database(server_dsn, roles, "chunk_mean_attacks") as dsn:
        yield dsn


@pytest.fixture(params=["vector", "halfvec"])
def admin(request: pytest.FixtureRequest, database_dsn: str, roles: Roles) -> Iterator[psycopg.Connection[Any]]:
    with chunked_connection(database_dsn, roles, SETTINGS, dtype=request.param) as conn:
        yield conn


@pytest.fixture
def plain(database_dsn: str, roles: Roles) -> Iterator[psycopg.Connection[Any]]:
    """The vector-typed table only (for the slower attacks)."""
    with chunked_connection(database_dsn, roles, SETTINGS) as conn:
        yield conn


def insert_rows(admin: psycopg.Connection[Any], roles: Roles, rows: dict[int, str | None]) -> None:
    with acting(admin, roles.app):
        for doc_id, text in rows.items():
            admin.execute("INSERT INTO docs VALUES (%s, 'x', %s)", [doc_id, text])


def chunk_texts(encoder: Encoder, text: str | None, settings: Chunks = SETTINGS) -> list[str]:
    return [c.text for c in split(text, settings, model_tokenizer(encoder))]


def expected_mean(encoder: Encoder, text: str, settings: Chunks = SETTINGS) -> Any:
    return mean_of(encoder.encode(chunk_texts(encoder, text, settings)))


def close(a: Any, b: Any) -> bool:
    return a is not None and b is not None and float(np.abs(np.asarray(a) - np.asarray(b)).max()) < TOLERANCE


def test_a_batch_encodes_each_new_chunk_once_and_writes_their_mean_as_the_documents_vector(
    admin: Any, roles: Roles, encoder: Encoder
) -> None:
    texts: dict[int, str | None] = {1: LONG, 2: "  A short note.\n", 3: None, 4: "   "}
    insert_rows(admin, roles, texts)
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
    insert_rows(admin, roles, {1: LONG})
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


# --- found by the review, fixed or documented ----------------------------------------------------------------


def test_remove_chunks_queues_every_row_for_its_whole_text_vector(
    plain: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    """After remove_chunks the registration says "the whole text": the rows written while the column was
    chunked are queued again, so a row's vector never stays its chunks' mean under the whole-text definition."""
    admin = plain
    insert_rows(admin, roles, {1: LONG})
    sync_as_worker(admin, roles, "docs")
    assert close(document_vectors(admin)[1], expected_mean(encoder, LONG))
    with acting(admin, roles.owner):
        remove_chunks(admin, "docs", "embedding")
    with acting(admin, roles.app):
        report = ingest(admin, "docs", [{"id": 2, "section": "x", "body": LONG}])
    assert (report.encoded, report.queued) == (1, 0)  # no longer chunked: ingest encodes it again
    assert sync_as_worker(admin, roles, "docs").embedded == 1  # row 1, queued by remove_chunks
    vectors = document_vectors(admin)
    assert close(vectors[2], encoder.encode([LONG])[0])
    assert close(vectors[1], vectors[2])  # the same text, the same column: the same vector


def test_a_vector_written_alone_is_kept_until_the_text_changes(
    plain: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    """docs/long_documents.md: a vector written on its own, the text unchanged, is kept (nothing queues it);
    when the text changes, the workers write the new chunks' mean over it; set to NULL, the mean comes back."""
    admin = plain
    insert_rows(admin, roles, {1: LONG})
    sync_as_worker(admin, roles, "docs")
    foreign = encoder.encode(["A completely unrelated sentence about rowing on cold rivers."])[0]
    with acting(admin, roles.app):
        admin.execute("UPDATE docs SET embedding = %s WHERE id = 1", [foreign])
    assert sync_as_worker(admin, roles, "docs").embedded == 0
    assert close(document_vectors(admin)[1], foreign)
    with acting(admin, roles.app):
        admin.execute("UPDATE docs SET embedding = NULL WHERE id = 1")
    assert sync_as_worker(admin, roles, "docs").embedded == 1
    assert close(document_vectors(admin)[1], expected_mean(encoder, LONG))
    changed = LONG + "\n\nA closing paragraph about rowing."
    with acting(admin, roles.app):
        admin.execute("UPDATE docs SET embedding = %s, body = %s WHERE id = 1", [foreign, changed])
    sync_as_worker(admin, roles, "docs")
    assert close(document_vectors(admin)[1], expected_mean(encoder, changed))


def test_an_orm_vector_assigned_to_a_loaded_chunked_object_is_kept_until_its_text_changes(
    plain: psycopg.Connection[Any], roles: Roles, database_dsn: str, encoder: Encoder
) -> None:
    admin = plain
    insert_rows(admin, roles, {1: LONG})
    sync_as_worker(admin, roles, "docs")
    doc_class = document_class("docs", "flush", SETTINGS)
    foreign = encoder.encode(["A completely unrelated sentence about rowing on cold rivers."])[0]
    changed = LONG + "\n\nA closing paragraph about rowing."
    engine = engine_as(database_dsn, roles.app)
    try:
        with Session(engine) as session:
            session.get(doc_class, 1).embedding = foreign
            session.commit()
            sync_as_worker(admin, roles, "docs")
            assert close(document_vectors(admin)[1], foreign)
            session.get(doc_class, 1).body = changed
            session.commit()
    finally:
        engine.dispose()
    sync_as_worker(admin, roles, "docs")
    assert close(document_vectors(admin)[1], expected_mean(encoder, changed))


def test_ingest_counts_blank_texts_of_a_chunked_column_as_empty_and_the_rest_as_queued(
    plain: psycopg.Connection[Any], roles: Roles
) -> None:
    """A text with no word pieces (a zero-width space) is queued: only the workers' tokenizer finds it empty."""
    admin = plain
    with acting(admin, roles.app):
        report = ingest(
            admin,
            "docs",
            [
                {"id": 1, "section": "x", "body": LONG},
                {"id": 2, "section": "x", "body": "   "},
                {"id": 3, "section": "x", "body": None},
                {"id": 4, "section": "x", "body": "\u200b"},
            ],
        )
    assert (report.rows, report.queued, report.empty, report.encoded) == (4, 2, 2, 0)
    drained = sync_as_worker(admin, roles, "docs")
    assert drained.embedded == 1 and drained.emptied == 3


# --- attacks that held ----------------------------------------------------------------------------------------


def test_repeated_paragraphs_weigh_in_the_mean_and_survive_a_change(
    admin: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    text = PARAGRAPHS[1] + "\n\n" + "Vacuum the table now. " * 30 + "\n\n" + PARAGRAPHS[2]
    insert_rows(admin, roles, {1: text})
    report = sync_as_worker(admin, roles, "docs")
    assert report.embedded == 1 and report.failed == 0
    texts = chunk_texts(encoder, text)
    assert len(texts) > len(set(texts))  # the same chunk text more than once
    stored = chunk_rows(admin, "docs")[1]
    assert len(stored) == len(texts)
    assert close(document_vectors(admin)[1], mean_of(encoder.encode(texts)))  # each occurrence counts
    changed = "Vacuum the table now. " * 20 + "\n\n" + PARAGRAPHS[2]
    with acting(admin, roles.app):
        admin.execute("UPDATE docs SET body = %s WHERE id = 1", [changed])
    counting = CountingEncoder()
    assert one_batch(admin, roles, counting).embedded == 1
    assert set(counting.encoded) <= set(chunk_texts(encoder, changed)) - set(texts)
    assert close(document_vectors(admin)[1], expected_mean(encoder, changed))
    assert len(chunk_rows(admin, "docs")[1]) == len(chunk_texts(encoder, changed))


def test_a_text_made_blank_then_null_then_long_again(
    admin: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    insert_rows(admin, roles, {1: LONG, 2: "A short note."})
    sync_as_worker(admin, roles, "docs")
    for blank in ("  \n\t ", None):
        with acting(admin, roles.app):
            admin.execute("UPDATE docs SET body = %s WHERE id = 1", [blank])
        report = sync_as_worker(admin, roles, "docs")
        assert report.emptied == 1 and report.failed == 0
        assert document_vectors(admin)[1] is None and 1 not in chunk_rows(admin, "docs")
    with acting(admin, roles.app):
        admin.execute("UPDATE docs SET body = %s WHERE id = 1", [LONG])
    sync_as_worker(admin, roles, "docs")
    vectors = document_vectors(admin)
    assert close(vectors[1], expected_mean(encoder, LONG))
    assert close(vectors[2], encoder.encode(["A short note."])[0])  # one chunk: its vector


def test_a_vector_set_to_null_is_made_again_from_the_kept_chunks_without_encoding(
    admin: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    insert_rows(admin, roles, {1: LONG})
    sync_as_worker(admin, roles, "docs")
    before = document_vectors(admin)[1]
    with acting(admin, roles.app):
        admin.execute("UPDATE docs SET embedding = NULL WHERE id = 1")
    counting = CountingEncoder()
    report = one_batch(admin, roles, counting)
    assert report is not None and report.embedded == 1
    assert counting.encoded == []  # every chunk kept: nothing to encode
    assert close(document_vectors(admin)[1], before)
    assert close(document_vectors(admin)[1], expected_mean(encoder, LONG))


def test_the_cache_gives_the_same_mean_and_counts_its_chunks(
    admin: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    admin.execute("DELETE FROM pgsim.embedding_cache")  # shared by every test of the database
    insert_rows(admin, roles, {1: LONG})
    first = one_batch(admin, roles, CountingEncoder(), cache=True)
    assert first.embedded == 1 and first.cached == 0
    insert_rows(admin, roles, {2: LONG, 3: PARAGRAPHS[1] + "\n\nAnd a last new sentence about bread."})
    counting = CountingEncoder()
    report = one_batch(admin, roles, counting, cache=True)
    assert report.embedded == 2 and report.failed == 0
    assert set(counting.encoded).isdisjoint(chunk_texts(encoder, LONG))  # row 2 entirely from the cache
    assert report.cached >= len(chunk_texts(encoder, LONG))
    vectors = document_vectors(admin)
    assert close(vectors[1], vectors[2])
    assert close(vectors[2], expected_mean(encoder, LONG))
    text3 = PARAGRAPHS[1] + "\n\nAnd a last new sentence about bread."
    assert close(vectors[3], expected_mean(encoder, text3))


def test_ingest_on_a_table_with_a_chunked_and_a_plain_column(
    plain: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    admin = plain
    with acting(admin, roles.owner):
        add_embedding(admin, "docs", "title_vec", source="section")
        grant(admin, "worker", roles.worker, tables=["docs"])
        grant(admin, "search", roles.app, tables=["docs"])
    rows = [
        {"id": 1, "section": "databases", "body": LONG},
        {"id": 2, "section": "cooking", "body": PARAGRAPHS[1]},
        {"id": 3, "section": None, "body": "   "},
    ]
    for cache in (False, True):
        admin.execute("DELETE FROM docs")
        admin.execute("DELETE FROM pgsim.queue")
        with acting(admin, roles.owner):  # the app role may not read the content-hash cache
            report = ingest(admin, "docs", rows, cache=cache)
        assert report.rows == 3 and report.queued == 2
        assert report.encoded + report.cached == 2  # the plain column's two texts
        plain_vectors, chunked = document_vectors(admin, "title_vec"), document_vectors(admin)
        assert close(plain_vectors[1], encoder.encode(["databases"])[0]) and plain_vectors[3] is None
        assert all(v is None for v in chunked.values())
        drained = sync_as_worker(admin, roles, "docs")
        assert drained.failed == 0 and drained.dead == 0
        chunked = document_vectors(admin)
        assert close(chunked[1], expected_mean(encoder, LONG))
        assert close(chunked[2], encoder.encode([PARAGRAPHS[1]])[0])
        assert chunked[3] is None
        assert close(document_vectors(admin, "title_vec")[1], encoder.encode(["databases"])[0])


def test_an_orm_bulk_insert_leaves_a_chunked_column_to_the_workers(
    plain: psycopg.Connection[Any], roles: Roles, database_dsn: str, encoder: Encoder
) -> None:
    admin = plain
    doc_class = document_class("docs", "flush", SETTINGS)
    engine = engine_as(database_dsn, roles.app)
    try:
        with Session(engine) as session:
            session.execute(
                insert(doc_class),
                [{"id": 1, "section": "a", "body": LONG}, {"id": 2, "section": "b", "body": PARAGRAPHS[2]}],
            )
            session.commit()
    finally:
        engine.dispose()
    assert all(v is None for v in document_vectors(admin).values())
    assert sync_as_worker(admin, roles, "docs").embedded == 2
    vectors = document_vectors(admin)
    assert close(vectors[1], expected_mean(encoder, LONG))
    assert close(vectors[2], encoder.encode([PARAGRAPHS[2]])[0])


def test_change_chunks_gives_the_new_column_the_mean_of_the_new_chunks(
    plain: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    admin = plain
    text = "\n\n".join(PARAGRAPHS * 2)
    insert_rows(admin, roles, {1: text})
    sync_as_worker(admin, roles, "docs")
    wider = Chunks(64, 16)
    with acting(admin, roles.owner):
        change_chunks(admin, "docs", "embedding", wider)
    sync_as_worker(admin, roles, "docs")
    with acting(admin, roles.owner):
        assert sync(admin, table="docs", allow_superuser=True).switched == 1
    assert close(document_vectors(admin)[1], expected_mean(encoder, text, wider))
    assert not close(document_vectors(admin)[1], expected_mean(encoder, text, SETTINGS)) or len(
        chunk_texts(encoder, text, wider)
    ) == len(chunk_texts(encoder, text, SETTINGS))


def test_change_chunks_of_an_unchunked_column_switches_to_the_mean_and_ingest_fills_the_old_one(
    plain: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    admin = plain
    with acting(admin, roles.owner):
        remove_chunks(admin, "docs", "embedding")
    insert_rows(admin, roles, {1: LONG})
    sync_as_worker(admin, roles, "docs")
    assert close(document_vectors(admin)[1], encoder.encode([LONG])[0])  # whole text
    with acting(admin, roles.owner):
        change_chunks(admin, "docs", "embedding", SETTINGS)
    with acting(admin, roles.app):  # during the change: the old column is encoded here, the new one queued
        report = ingest(admin, "docs", [{"id": 2, "section": "x", "body": LONG}])
    assert (report.encoded, report.queued) == (1, 1)
    assert close(document_vectors(admin)[2], encoder.encode([LONG])[0])
    assert document_vectors(admin, "embedding_next")[2] is None
    sync_as_worker(admin, roles, "docs")
    with acting(admin, roles.owner):
        assert sync(admin, table="docs", allow_superuser=True).switched == 1
    vectors = document_vectors(admin)
    assert close(vectors[1], expected_mean(encoder, LONG)) and close(vectors[2], expected_mean(encoder, LONG))


def test_a_dtype_change_of_a_chunked_column_gives_the_new_column_the_mean(
    plain: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    from pgsim.columns.model_change import change_embedding

    admin = plain
    insert_rows(admin, roles, {1: LONG, 2: PARAGRAPHS[0]})
    sync_as_worker(admin, roles, "docs")
    with acting(admin, roles.owner):
        change_embedding(admin, "docs", "embedding", dtype="halfvec")
    with acting(admin, roles.app):
        admin.execute("UPDATE docs SET body = %s WHERE id = 2", [LONG + "\n\nOne more line about bread."])
    sync_as_worker(admin, roles, "docs")
    with acting(admin, roles.owner):
        assert sync(admin, table="docs", allow_superuser=True).switched == 1
    vectors = document_vectors(admin)
    assert close(vectors[1], expected_mean(encoder, LONG))
    assert close(vectors[2], expected_mean(encoder, LONG + "\n\nOne more line about bread."))


def test_after_remove_chunks_an_orm_flush_encodes_the_column_again(
    plain: psycopg.Connection[Any], roles: Roles, database_dsn: str, encoder: Encoder
) -> None:
    from pgsim.sqlalchemy.definition import DefinitionMismatch

    admin = plain
    chunked_class = document_class("docs", "flush", SETTINGS)
    plain_class = document_class("docs", "flush", None)
    engine = engine_as(database_dsn, roles.app)
    try:
        with Session(engine) as session:  # the chunked declaration agrees: checked, not encoded (verdict cached)
            session.add(chunked_class(id=1, section="x", body=LONG))
            session.commit()
            assert session.get(chunked_class, 1).embedding is None
        with Session(engine) as session, pytest.raises(DefinitionMismatch):
            session.add(plain_class(id=2, section="x", body=LONG))
            session.commit()
        with acting(admin, roles.owner):
            remove_chunks(admin, "docs", "embedding")
        with Session(engine) as session:
            session.add(plain_class(id=3, section="x", body=LONG))
            session.commit()
            stored = session.get(plain_class, 3).embedding
        assert stored is not None and close(np.asarray(stored), encoder.encode([LONG])[0])
        with Session(engine) as session:  # the stale chunked declaration (cached verdict): no vector lost
            session.add(chunked_class(id=4, section="x", body=PARAGRAPHS[0]))
            session.commit()
    except DefinitionMismatch:
        pass  # refusing the stale chunked declaration is fine too
    finally:
        engine.dispose()
    sync_as_worker(admin, roles, "docs")
    vectors = document_vectors(admin)
    assert all(v is not None for v in vectors.values())
    if 4 in vectors:
        assert close(vectors[4], encoder.encode([PARAGRAPHS[0]])[0])


def test_tenant_row_level_security_the_worker_reads_kept_chunks_and_writes_the_mean(
    plain: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    admin = plain
    with acting(admin, roles.owner):
        admin.execute("ALTER TABLE docs ENABLE ROW LEVEL SECURITY")
        admin.execute("ALTER TABLE docs FORCE ROW LEVEL SECURITY")
        admin.execute("CREATE POLICY tenant ON docs USING (section = 'x') WITH CHECK (section = 'x')")
        grant(admin, "worker", roles.worker, tables=["docs"])
    insert_rows(admin, roles, {1: LONG})
    assert sync_as_worker(admin, roles, "docs").embedded == 1
    changed = LONG + "\n\nRowing crews train on cold rivers at dawn, six days a week."
    with acting(admin, roles.app):
        admin.execute("UPDATE docs SET body = %s WHERE id = 1", [changed])
    counting = CountingEncoder()
    report = one_batch(admin, roles, counting)
    assert report.embedded == 1 and report.failed == 0
    assert len(counting.encoded) < len(chunk_texts(encoder, changed))  # kept chunks were read, not re-encoded
    assert close(document_vectors(admin)[1], expected_mean(encoder, changed))


def test_pgvector_in_another_schema_kept_halfvec_chunks_are_read_back_for_the_mean(
    server_dsn: str, encoder: Encoder
) -> None:
    from fixtures.database import scratch_database

    from pgsim.db.schema import install

    with scratch_database(server_dsn, "mean_vector_schema") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "Vectors"')
        conn.execute('CREATE EXTENSION vector SCHEMA "Vectors"')
        install(conn)
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, section text, body text)")
        add_embedding(conn, "docs", "embedding", source="body", dtype="halfvec", chunks=SETTINGS)
        conn.execute("INSERT INTO docs VALUES (1, 'x', %s)", [LONG])
        assert sync(conn, table="docs", allow_superuser=True).embedded == 1
        changed = LONG + "\n\nRowing crews train on cold rivers at dawn, six days a week."
        conn.execute("UPDATE docs SET body = %s WHERE id = 1", [changed])
        report = sync(conn, table="docs", allow_superuser=True)
        assert report.embedded == 1 and report.failed == 0
        row = conn.execute('SELECT embedding::"Vectors".vector::text FROM docs WHERE id = 1').fetchone()
        stored = np.asarray([float(x) for x in row[0].strip("[]").split(",")], dtype=np.float32)
        assert close(stored, expected_mean(encoder, changed))


def test_a_long_document_edited_at_its_end_encodes_only_its_last_chunks(
    plain: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    admin = plain
    # past MAX_CHARS (100,000), distinct sentences, in long words: about 14,000 word pieces where sentences of
    # short words took 23,000 for as many characters, and the chunks to encode with them
    sentences = [
        f"Sentence {i} concerns internationalization, telecommunications, responsibilities and understanding."
        for i in range(1100)
    ]
    text = " ".join(sentences)
    assert len(text) > 100_000
    insert_rows(admin, roles, {1: text})
    first = sync_as_worker(admin, roles, "docs")
    assert first.embedded == 1 and first.failed == 0
    texts = chunk_texts(encoder, text)
    assert len(chunk_rows(admin, "docs")[1]) == len(texts) > 100
    stored = [v for *_, v in chunk_rows(admin, "docs")[1]]
    assert close(document_vectors(admin)[1], mean_of(stored))
    changed = text + " A final sentence about rowing."
    with acting(admin, roles.app):
        admin.execute("UPDATE docs SET body = %s WHERE id = 1", [changed])
    counting = CountingEncoder()
    assert one_batch(admin, roles, counting).embedded == 1
    assert 0 < len(counting.encoded) <= 3
    stored = [v for *_, v in chunk_rows(admin, "docs")[1]]
    assert len(stored) == len(chunk_texts(encoder, changed))
    assert close(document_vectors(admin)[1], mean_of(stored))


def test_two_lanes_and_small_batches_with_the_cache_give_every_document_its_mean(
    plain: psycopg.Connection[Any], roles: Roles, database_dsn: str, encoder: Encoder
) -> None:
    """Two connections in flight (overlap_with), batches of 2, documents sharing chunks across batches, the
    cache on: each document's vector is the mean of the chunks stored for it."""
    admin = plain
    admin.execute("DELETE FROM pgsim.embedding_cache")
    texts = {i: "\n\n".join(PARAGRAPHS[i % 3 :] + PARAGRAPHS[: i % 3] + [f"Note {i} on nothing."]) for i in range(1, 9)}
    insert_rows(admin, roles, texts)
    with psycopg.connect(database_dsn, autocommit=True) as second:
        with acting(admin, roles.worker), acting(second, roles.worker):
            report = sync(admin, table="docs", allow_superuser=True, batch_size=2, cache=True, overlap_with=second)
    assert report.embedded == 8 and report.failed == 0 and report.dead == 0
    assert report.cached > 0
    stored, vectors = chunk_rows(admin, "docs"), document_vectors(admin)
    for doc_id, text in texts.items():
        assert [d for _, _, _, d, _ in stored[doc_id]] == [digest(t) for t in chunk_texts(encoder, text)]
        assert close(vectors[doc_id], mean_of([v for *_, v in stored[doc_id]]))
        assert close(vectors[doc_id], expected_mean(encoder, text))
