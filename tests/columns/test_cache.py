"""pgsim.embedding_cache: text encoded once is looked up, not encoded again, by ingest and by sync."""

from __future__ import annotations

from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.database import installed_without_registrations

from pgsim.columns.adding import add_embedding
from pgsim.columns.bulk_load import ingest
from pgsim.columns.cache import lookup, store
from pgsim.columns.worker import sync
from pgsim.demo.corpus import Package
from pgsim.encoding.encoder import Encoder
from pgsim.errors import InvalidInput
from pgsim.psycopg import register

ROWS = 60


@pytest.fixture
def docs(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    installed_without_registrations(conn)
    conn.execute("DROP TABLE IF EXISTS docs")
    conn.execute("TRUNCATE pgsim.embedding_cache")
    conn.execute("CREATE TABLE docs (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, title text, body text)")
    add_embedding(conn, "docs", "embedding", source="body")
    add_embedding(conn, "docs", "embedding_half", source="title", dtype="halfvec", index=None)
    register(conn)
    return conn


def rows_of(packages: list[Package]) -> list[dict[str, Any]]:
    return [{"title": p.synopsis, "body": p.description or None} for p in packages]


def stored(conn: psycopg.Connection[Any]) -> dict[int, np.ndarray[Any, Any]]:
    return {
        i: np.asarray(v.to_list())
        for i, v in conn.execute("SELECT id, embedding FROM docs WHERE embedding IS NOT NULL")
    }


def test_a_second_ingest_of_the_same_text_encodes_nothing(docs: Any, packages: list[Package], encoder: Encoder) -> None:
    rows = rows_of(packages[:ROWS])
    texts = {r["body"] for r in rows if r["body"]} | {r["title"] for r in rows}
    first = ingest(docs, "docs", rows, chunk_size=25, cache=True)
    assert first.cached == 0 and first.encoded > 0
    assert docs.execute("SELECT count(*) FROM pgsim.embedding_cache").fetchone() == (len(texts),)
    before = stored(docs)
    docs.execute("DELETE FROM docs")
    again = ingest(docs, "docs", rows, chunk_size=25, cache=True)
    assert (again.encoded, again.cached) == (0, first.encoded)  # every text from the cache, none encoded
    after = stored(docs)
    assert len(after) == len(before) > 0
    for old, new in zip(
        sorted(before.values(), key=lambda v: v.tobytes()),
        sorted(after.values(), key=lambda v: v.tobytes()),
        strict=True,
    ):
        assert np.array_equal(old, new)  # what the cache gives is what the model gave
    body = next(r["body"] for r in rows if r["body"])
    found = lookup(docs, encoder, [body])[body]
    assert float(np.abs(found - encoder.encode([body])[0]).max()) < 1e-6


def test_without_the_cache_nothing_is_read_or_stored(docs: Any, packages: list[Package]) -> None:
    report = ingest(docs, "docs", rows_of(packages[:10]))
    assert report.cached == 0 and report.encoded > 0
    assert docs.execute("SELECT count(*) FROM pgsim.embedding_cache").fetchone() == (0,)


def test_sync_looks_up_changed_rows_and_stores_new_text(docs: Any, packages: list[Package], database: str) -> None:
    docs.execute("INSERT INTO docs (title, body) VALUES ('a', 'parse JSON documents'), ('b', 'resize images')")
    with psycopg.connect(database, autocommit=True) as worker:
        first = sync(worker, cache=True)
        assert (first.embedded, first.cached) == (4, 0)
        docs.execute("UPDATE docs SET body = 'resize images', title = 'b' WHERE title = 'a'")  # text seen before
        docs.execute("INSERT INTO docs (title, body) VALUES ('c', 'play chess')")
        second = sync(worker, cache=True)
    assert (second.embedded, second.cached) == (4, 2)  # 'resize images' and 'b' from the cache
    one, two = (
        np.asarray(v.to_list()) for (v,) in docs.execute("SELECT embedding FROM docs WHERE body = 'resize images'")
    )
    assert np.array_equal(one, two)
    assert docs.execute("SELECT count(*) FROM pgsim.embedding_cache").fetchone() == (6,)  # 4 + 'play chess', 'c'


def test_a_rolled_back_write_keeps_nothing_in_the_cache(docs: Any, encoder: Encoder) -> None:
    with docs.transaction(force_rollback=True):
        assert store(docs, encoder, ["kept only if committed"], encoder.encode(["kept only if committed"])) == 1
    assert lookup(docs, encoder, ["kept only if committed"]) == {}


def test_a_schema_without_the_cache_table_is_a_clear_error(docs: Any, packages: list[Package]) -> None:
    with docs.transaction(force_rollback=True):
        docs.execute("DROP TABLE pgsim.embedding_cache")
        with pytest.raises(InvalidInput, match="run `pgsim install`"):
            ingest(docs, "docs", rows_of(packages[:3]), cache=True)
