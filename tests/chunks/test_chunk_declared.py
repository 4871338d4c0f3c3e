"""Chunking declared where an embedding is declared: ``pgsim.add_embedding(..., chunks=pgsim.Chunks(...))``,
``pgsim.change_embedding(..., chunks=...)`` and the command line's ``--chunk-tokens/--chunk-overlap``, used by a
non-superuser owner, with the application role writing and searching and the worker role filling the chunks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from chunked_docs import chunk_rows, owned_database, sync_as_worker
from fixtures.forks import PGSIM_CLI, ForkServer
from fixtures.roles import Roles, acting
from psycopg import sql

import pgsim
from pgsim.columns.registry import chunk_table, require_registration

LONG = "\n\n".join(
    [
        "PostgreSQL keeps table statistics for the planner. Autovacuum analyzes tables after enough rows change.",
        "A tomato sauce simmers slowly with garlic and basil. Italian cooks add olive oil at the end.",
        "Chess engines search game trees with alpha-beta pruning. Opening books guide the first moves of a game.",
    ]
    * 3
)
FORKS = ForkServer(("torch", "sentence_transformers", "tqdm", "psycopg", "pgsim", "pgsim.cli.main"))


@pytest.fixture(scope="module", autouse=True)
def _stop_forks() -> Iterator[None]:
    yield
    FORKS.stop()


@pytest.fixture(scope="module")
def database_dsn(server_dsn: str, roles: Roles) -> Iterator[str]:
    with owned_database(server_dsn, roles, "chunk_declared") as dsn:
        yield dsn


@pytest.fixture
def admin(database_dsn: str, roles: Roles) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        with acting(conn, roles.owner):
            conn.execute("DROP TABLE IF EXISTS docs__embedding_chunks, docs__embedding_next_chunks, docs CASCADE")
            conn.execute("CREATE TABLE docs (id int PRIMARY KEY, section text, body text)")
            conn.execute(
                "INSERT INTO docs VALUES (1, 'db', %s), (2, 'food', 'pesto with basil'), (3, 'db', NULL)", [LONG]
            )
        yield conn


def recorded(conn: psycopg.Connection[Any], column: str = "embedding") -> tuple[int, int] | None:
    found = chunk_table(conn, require_registration(conn, "docs", column))
    return None if found is None else (found.tokens, found.overlap)


@pytest.mark.parametrize("concurrently", [False, True], ids=["one-transaction", "concurrently"])
def test_add_embedding_with_chunks_makes_a_chunked_column_that_the_worker_fills(
    admin: psycopg.Connection[Any], roles: Roles, concurrently: bool
) -> None:
    with acting(admin, roles.owner):
        pgsim.add_embedding(
            admin, "docs", "embedding", source="body", chunks=pgsim.Chunks(32, 8), concurrently=concurrently
        )
        assert recorded(admin) == (32, 8)
        pgsim.grant(admin, "worker", roles.worker, tables=["docs"])
        pgsim.grant(admin, "search", roles.app, tables=["docs"])
        admin.execute(sql.SQL("GRANT INSERT ON docs TO {}").format(sql.Identifier(roles.app)))
    with acting(admin, roles.app):  # a row the application writes after the registration is chunked too
        admin.execute("INSERT INTO docs VALUES (4, 'chess', 'Chess engines prune game trees.')")
    report = sync_as_worker(admin, roles, "docs")
    assert report.failed == 0
    chunks = chunk_rows(admin, "docs")
    assert sorted(chunks) == [1, 2, 4]  # row 3 has no text: no chunks
    assert len(chunks[1]) > 3 and len(chunks[2]) == len(chunks[4]) == 1
    pgsim.register(admin)
    with acting(admin, roles.app):
        hits = pgsim.search(admin, "docs", "embedding", "alpha-beta pruning of game trees", k=3)
    assert [hit.row["id"] for hit in hits][:1] in ([1], [4]) and len({hit.row["id"] for hit in hits}) == 3
    assert all(hit.chunk_no is not None and hit.span is not None for hit in hits)


def test_bad_chunk_settings_are_refused_before_anything_changes(admin: psycopg.Connection[Any], roles: Roles) -> None:
    with acting(admin, roles.owner):
        for bad, says in (
            (pgsim.Chunks(100_000), "longer than model"),
            ("128", "must be pgsim.Chunks"),
        ):
            with pytest.raises(pgsim.InvalidInput, match=says):
                pgsim.add_embedding(admin, "docs", "embedding", source="body", chunks=bad)  # type: ignore[arg-type]
            assert pgsim.get_registration(admin, "docs", "embedding") is None
            columns = admin.execute(
                "SELECT count(*) FROM pg_attribute WHERE attrelid = 'docs'::regclass AND attname = 'embedding'"
            ).fetchone()
            assert columns == (0,)
        with pytest.raises(pgsim.InvalidInput, match="less than tokens"):
            pgsim.Chunks(32, 32)


def test_change_embedding_with_chunks_rechunks_in_the_background(admin: psycopg.Connection[Any], roles: Roles) -> None:
    with acting(admin, roles.owner):
        pgsim.add_embedding(admin, "docs", "embedding", source="body")
        assert recorded(admin) is None
        new = pgsim.change_embedding(admin, "docs", "embedding", chunks=pgsim.Chunks(48, 8))
        assert recorded(admin, new.column) == (48, 8)
        assert recorded(admin) is None  # searches read the unchunked column until the switch
        pgsim.sync(admin, table="docs", allow_superuser=True)
        assert recorded(admin) == (48, 8)
        assert sorted(chunk_rows(admin, "docs")) == [1, 2]
        with pytest.raises(pgsim.InvalidInput, match="nothing to change"):
            pgsim.change_embedding(admin, "docs", "embedding", chunks=pgsim.Chunks(48, 8))
        pgsim.remove_chunks(admin, "docs", "embedding")
        assert recorded(admin) is None


def run_cli(dsn: str, *args: str) -> tuple[int, str, str]:
    env = dict(os.environ)
    env.pop("PGSIM_DSN", None)
    return FORKS.run(PGSIM_CLI, env, timeout=600, argv=["--dsn", dsn, *args])


def test_the_command_line_declares_chunks(admin: psycopg.Connection[Any], database_dsn: str) -> None:
    def add(*chunk_options: str) -> tuple[int, str, str]:
        return run_cli(database_dsn, "add-embedding", "docs", "embedding", "--source", "body", *chunk_options)

    code, out, err = add("--chunk-overlap", "8")
    assert code != 0 and "--chunk-overlap needs --chunk-tokens" in err
    code, out, err = add("--chunk-tokens", "32", "--chunk-overlap", "32")
    assert code != 0 and "less than tokens" in err
    assert pgsim.get_registration(admin, "docs", "embedding") is None
    code, out, err = add("--chunk-tokens", "32", "--chunk-overlap", "8")
    assert code == 0, err
    assert "chunks of 32 word pieces (overlap 8)" in out
    assert recorded(admin) == (32, 8)
    code, out, err = run_cli(database_dsn, "change-embedding", "docs", "embedding", "--chunk-tokens", "64")
    assert code == 0, err
    assert recorded(admin, "embedding_next") == (64, 0)
    code, out, err = run_cli(database_dsn, "remove-chunks", "docs", "embedding")
    assert code == 0, err
    assert recorded(admin) is None and recorded(admin, "embedding_next") == (64, 0)  # the change goes on


def test_a_table_dropped_with_cascade_and_made_again_can_be_chunked_again(
    admin: psycopg.Connection[Any], roles: Roles
) -> None:
    with acting(admin, roles.owner):
        pgsim.add_embedding(admin, "docs", "embedding", source="body", chunks=pgsim.Chunks(32))
        pgsim.sync(admin, table="docs", allow_superuser=True)
        admin.execute("DROP TABLE docs CASCADE")  # drops the chunk table's foreign key, not the chunk table
        assert admin.execute("SELECT to_regclass('docs__embedding_chunks')").fetchone() != (None,)
        admin.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        admin.execute("INSERT INTO docs VALUES (7, 'a new document')")
        pgsim.add_embedding(admin, "docs", "embedding", source="body", chunks=pgsim.Chunks(32))
        pgsim.sync(admin, table="docs", allow_superuser=True)
        assert sorted(chunk_rows(admin, "docs")) == [7]  # the leftover's chunks are gone with it
        # a table of that name that is not a leftover chunk table is the user's: refused, not dropped
        pgsim.remove_embedding(admin, "docs", "embedding")
        admin.execute("DROP TABLE IF EXISTS docs__embedding_chunks")
        admin.execute("CREATE TABLE docs__embedding_chunks (id int, note text)")
        with pytest.raises(pgsim.InvalidInput, match="exists already"):
            pgsim.add_embedding(admin, "docs", "embedding", source="body", chunks=pgsim.Chunks(32))
        assert admin.execute("SELECT count(*) FROM docs__embedding_chunks").fetchone() == (0,)
        assert pgsim.get_registration(admin, "docs", "embedding") is None
