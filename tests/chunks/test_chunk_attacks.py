"""Attacks on chunked embeddings (review of the first version), on the real server and model: a document table
whose name is one of the aliases of search_documents' statement, and a document table handed to another owner
while its chunk table stays with the old one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from chunked_docs import chunked_table, owned_database, sync_as_worker
from fixtures.roles import Roles, acting
from psycopg import sql

from pgsim.columns.adding import add_embedding
from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.chunking.tables import add_chunks, remove_chunks
from pgsim.columns.grants import grant
from pgsim.errors import InvalidInput
from pgsim.knn.documents import search_documents
from pgsim.psycopg import register

TEXTS = {
    1: "PostgreSQL keeps table statistics for the planner. Autovacuum analyzes tables after enough rows change.",
    2: "A tomato sauce simmers slowly with garlic and basil. Italian cooks add olive oil at the end.",
    3: "Chess engines search game trees with alpha-beta pruning. Opening books guide the first moves of a game.",
}


@pytest.fixture(scope="module")
def database_dsn(server_dsn: str, roles: Roles) -> Iterator[str]:
    with owned_database(server_dsn, roles, "chunk_attacks") as dsn:
        yield dsn


@pytest.fixture
def admin(database_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        register(conn)
        yield conn


def fill(admin: psycopg.Connection[Any], roles: Roles, table: str) -> None:
    chunked_table(admin, roles, table, Chunks(32, 8))
    with acting(admin, roles.app):
        for doc_id, text in TEXTS.items():
            admin.execute(sql.SQL("INSERT INTO {} VALUES (%s, 'x', %s)").format(sql.Identifier(table)), [doc_id, text])
    sync_as_worker(admin, roles, table)


@pytest.mark.parametrize("table", ["best", "candidates", "counted", "hits", "doc", "c"])
def test_a_table_named_like_a_statement_alias_gets_its_own_nearest_documents(
    admin: psycopg.Connection[Any], roles: Roles, table: str
) -> None:
    """The hnsw statement matched the document to its best chunk with ``{table}.id = best.id``: for a table named
    ``best`` that compared the table with itself, so every document took the nearest chunk's distance and
    the k returned were any k documents."""
    fill(admin, roles, table)
    with acting(admin, roles.app):
        hits = search_documents(admin, table, "embedding", "garlic and basil in a tomato sauce", k=3)
    assert [hit.row["id"] for hit in hits][:1] == [2]
    assert len({hit.row["id"] for hit in hits}) == 3
    distances = [hit.distance for hit in hits]
    assert distances == sorted(distances) and distances[0] < distances[1]


def test_a_former_owner_keeps_neither_the_chunks_nor_the_workers_rights(
    admin: psycopg.Connection[Any], roles: Roles
) -> None:
    """ALTER TABLE docs OWNER TO another role does not move the chunk table (PostgreSQL moves a table's indexes
    and sequences, not the tables pgsim made beside it). The former owner still owns it: its trigger there
    ran as the worker (and its policy as the searching application), and it read the new owner's chunks.
    Workers and searches refuse a chunk table whose owner is not the document table's."""
    fill(admin, roles, "handed")
    with acting(admin, roles.owner):
        admin.execute("CREATE TABLE spied (who text, id int)")
        admin.execute("GRANT INSERT ON spied TO PUBLIC")
        admin.execute(
            "CREATE FUNCTION public.spy() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN INSERT INTO public.spied VALUES (current_user, NEW.id); RETURN NEW; END $$"
        )
    admin.execute(sql.SQL("ALTER TABLE handed OWNER TO {}").format(sql.Identifier(roles.tenant)))
    with acting(admin, roles.owner):  # no longer the documents' owner, still the chunk table's
        admin.execute(
            "CREATE TRIGGER spy BEFORE INSERT ON handed__embedding_chunks FOR EACH ROW EXECUTE FUNCTION public.spy()"
        )
    with acting(admin, roles.app):
        admin.execute("INSERT INTO handed VALUES (4, 'x', 'A brand new secret document of the new owner.')")
    sync_as_worker(admin, roles, "handed")
    with acting(admin, roles.owner):
        assert admin.execute("SELECT who FROM spied").fetchall() == []
        assert admin.execute("SELECT count(*) FROM handed__embedding_chunks WHERE id = 4").fetchone() == (0,)
    with acting(admin, roles.app), pytest.raises(InvalidInput, match="owner"):
        search_documents(admin, "handed", "embedding", "secret document", k=1)
    register(admin)
    vector = np.ones(384, dtype=np.float32)
    for function in ("knn_documents", "knn"):  # the SQL searches refuse it too
        statement = sql.SQL("SELECT * FROM {}('handed', 'embedding', %s, 1)").format(sql.Identifier("pgsim", function))
        with acting(admin, roles.app), pytest.raises(psycopg.errors.InsufficientPrivilege, match="not owned"):
            admin.execute(statement, [vector])


def test_a_worker_granted_before_chunking_existed_still_embeds_unchunked_tables(
    admin: psycopg.Connection[Any], roles: Roles
) -> None:
    """Every batch, chunked or not, reads pgsim.chunking; a worker role granted (pgsim grant worker) before the
    upgrade that made it had no SELECT there, so every batch of every table failed on the upgrade and its rows
    went to the dead letters. pgsim.chunking is readable by every role that reaches schema pgsim (its
    row-level security shows the rows of tables the role may read)."""
    with acting(admin, roles.owner):
        admin.execute("DROP TABLE IF EXISTS plain")
        admin.execute("CREATE TABLE plain (id int PRIMARY KEY, section text, body text)")
        add_embedding(admin, "plain", "embedding", source="body")
        grant(admin, "worker", roles.worker, tables=["plain"])
        admin.execute(sql.SQL("REVOKE ALL ON pgsim.chunking FROM {}").format(sql.Identifier(roles.worker)))
        admin.execute("INSERT INTO plain VALUES (1, 'x', 'Parse JSON fast'), (2, 'x', 'Tune PostgreSQL')")
    report = sync_as_worker(admin, roles, "plain")
    assert (report.embedded, report.failed, report.dead) == (2, 0, 0)


def test_a_search_leaves_the_callers_search_path_as_it_was(
    admin: psycopg.Connection[Any], roles: Roles, database_dsn: str
) -> None:
    """In a transaction the caller had open (psycopg's default: not autocommit), search_documents' first
    block is a savepoint whose pinned search_path outlived it: the caller's next unqualified name
    (its own table, a function of its schema) no longer resolved until its transaction ended."""
    fill(admin, roles, "pathed")
    with psycopg.connect(database_dsn) as conn:  # not autocommit
        register(conn)
        with acting(conn, roles.app):
            conn.execute("SET search_path = public")
            conn.execute("SELECT count(*) FROM pathed").fetchone()  # the caller's transaction is open
            search_documents(conn, "pathed", "embedding", "garlic and basil", k=1)
            assert conn.execute("SELECT pg_catalog.current_setting('search_path')").fetchone() == ("public",)
            conn.execute("SELECT count(*) FROM pathed").fetchone()
            conn.rollback()
        with acting(conn, roles.owner):  # and so do the owner's remove_chunks and add_chunks
            conn.execute("SET search_path = public")
            conn.execute("SELECT count(*) FROM pathed").fetchone()
            remove_chunks(conn, "pathed", "embedding")
            assert conn.execute("SELECT pg_catalog.current_setting('search_path')").fetchone() == ("public",)
            add_chunks(conn, "pathed", "embedding", Chunks(32, 8))
            assert conn.execute("SELECT pg_catalog.current_setting('search_path')").fetchone() == ("public",)
            conn.rollback()
