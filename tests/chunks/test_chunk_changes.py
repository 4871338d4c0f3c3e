"""Chunk settings changed, and a chunked column's model or type changed, in the background: a new registration
with its own chunk table is filled by the worker role while searches read the current chunks, and the owner's
drain switches both at once (pgsim.columns.model_change)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from chunked_docs import chunk_rows, chunked_table, owned_database, sync_as_worker
from fixtures.roles import Roles, acting

from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.chunking.splitting import model_tokenizer, split
from pgsim.columns.chunking.sync_step import digest
from pgsim.columns.model_change import change_chunks, change_embedding
from pgsim.columns.registry import require_registration
from pgsim.columns.worker import sync
from pgsim.encoding.encoder import Encoder
from pgsim.errors import InvalidInput
from pgsim.knn.filtered import search
from pgsim.psycopg import register

OLD, NEW = Chunks(32, 8), Chunks(64, 16)
TEXT = "\n\n".join(
    [
        "PostgreSQL keeps table statistics for the planner. Autovacuum analyzes tables after enough rows change.",
        "A tomato sauce simmers slowly with garlic and basil. Italian cooks add olive oil at the end.",
        "Chess engines search game trees with alpha-beta pruning. Opening books guide the first moves of a game.",
    ]
    * 3
)


@pytest.fixture(scope="module")
def database_dsn(server_dsn: str, roles: Roles) -> Iterator[str]:
    with owned_database(server_dsn, roles, "chunk_changes") as dsn:
        yield dsn


@pytest.fixture
def admin(database_dsn: str, roles: Roles) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        for leftover in ("docs__embedding_next_chunks", "docs__embedding_chunks"):
            conn.execute(f"DROP TABLE IF EXISTS {leftover}")
        chunked_table(conn, roles, "docs", OLD)
        register(conn)
        with acting(conn, roles.app):
            conn.execute("INSERT INTO docs VALUES (1, 'db', %s), (2, 'food', 'pesto with basil')", [TEXT])
        sync_as_worker(conn, roles, "docs")
        yield conn


def spans(admin: Any, encoder: Encoder, settings: Chunks, text: str) -> list[tuple[int, int, int, bytes]]:
    return [(c.chunk_no, c.start, c.end, digest(c.text)) for c in split(text, settings, model_tokenizer(encoder))]


def stored(admin: Any, doc_id: int) -> list[tuple[int, int, int, bytes]]:
    return [(no, start, end, d) for no, start, end, d, _ in chunk_rows(admin, "docs")[doc_id]]


def drain_as_owner(admin: Any, roles: Roles) -> Any:
    with acting(admin, roles.owner):
        return sync(admin, table="docs", allow_superuser=True)


def test_new_chunk_settings_fill_in_the_background_and_switch_at_once(
    admin: Any, roles: Roles, encoder: Encoder
) -> None:
    with acting(admin, roles.owner):
        with pytest.raises(InvalidInput, match="nothing to change"):
            change_chunks(admin, "docs", "embedding", OLD)
        change_chunks(admin, "docs", "embedding", NEW)
    with acting(admin, roles.app):  # a write during the change: both chunk sets follow it
        admin.execute("UPDATE docs SET body = 'pesto with basil and pine nuts' WHERE id = 2")
        before = [(h.row["id"], h.chunk_no) for h in search(admin, "docs", "embedding", "garlic and basil", k=2)]
    assert sync_as_worker(admin, roles, "docs").switched == 0  # the worker fills; the switch is the owner's
    assert stored(admin, 1) == spans(admin, encoder, OLD, TEXT)  # searches still read the current chunks
    with acting(admin, roles.app):
        during = [(h.row["id"], h.chunk_no) for h in search(admin, "docs", "embedding", "garlic and basil", k=2)]
    assert during == before
    assert drain_as_owner(admin, roles).switched == 1
    assert stored(admin, 1) == spans(admin, encoder, NEW, TEXT)
    assert stored(admin, 2) == spans(admin, encoder, NEW, "pesto with basil and pine nuts")
    left = admin.execute(
        "SELECT (SELECT count(*) FROM pgsim.chunking), (SELECT tokens FROM pgsim.chunking), "
        "to_regclass('docs__embedding_next_chunks'), to_regclass('docs__embedding_chunks_hnsw') IS NOT NULL, "
        "(SELECT count(*) FROM information_schema.columns WHERE table_name = 'docs' AND column_name LIKE 'embedding%')"
    ).fetchone()
    assert left == (1, NEW.tokens, None, True, 1)
    with acting(admin, roles.app):
        hits = search(admin, "docs", "embedding", "garlic and basil", k=2)
    assert len({h.row["id"] for h in hits}) == 2 and all(h.span is not None for h in hits)


def test_a_model_or_type_change_of_a_chunked_column_carries_its_chunks_over(admin: Any, roles: Roles) -> None:
    with acting(admin, roles.owner):
        change_embedding(admin, "docs", "embedding", dtype="halfvec")
    sync_as_worker(admin, roles, "docs")
    assert drain_as_owner(admin, roles).switched == 1
    with acting(admin, roles.owner):
        assert require_registration(admin, "docs", "embedding").dtype == "halfvec"
    kind = admin.execute(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'docs__embedding_chunks'::regclass AND attname = 'embedding'"
    ).fetchone()
    assert kind == ("halfvec(384)",)
    assert set(chunk_rows(admin, "docs")) == {1, 2}
    with acting(admin, roles.app):
        assert [h.row["id"] for h in search(admin, "docs", "embedding", "chess engine", k=1)] == [1]
