"""Issue 21: a chunked column declared in the ORM (``embedding_column(..., chunks=pgsim.Chunks(...))``):
create_all registers it chunked, ``.nearest()`` returns documents once the worker made the chunks, and a
declaration whose chunks differ from the registration's is refused at flush, naming the fix. Real server and
model; a handful of short rows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import String, create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import pgsim
from pgsim.sqlalchemy import DefinitionMismatch, database_url, embedding_column
from pgsim.sqlalchemy.definition import forget_definitions

TABLE = "declared_docs"
DOCS = {
    1: "Tomato sauce. Simmer tomatoes with garlic and basil for an hour. Season with salt and a little sugar.",
    2: "Bicycle repair. To fix a flat tyre, remove the wheel, find the puncture, and patch the inner tube.",
    3: "Gardening notes. Water the roses in the morning. Prune them in late winter before new growth.",
}


def document_class(sync: str, chunks: pgsim.Chunks | None) -> Any:
    """A mapped class over TABLE (id, body) declaring its embedding with ``chunks`` (its own Base each)."""

    class Base(DeclarativeBase):
        pass

    class Doc(Base):
        __tablename__ = TABLE
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str | None] = mapped_column(String, nullable=True)
        embedding = embedding_column(source="body", sync=sync, chunks=chunks)

    return Doc


@pytest.fixture
def engine(database: str) -> Iterator[Engine]:
    made = create_engine(database_url(database))
    with psycopg.connect(database, autocommit=True) as conn:
        pgsim.install(conn)
        tables = [sql.Identifier(TABLE), sql.Identifier(f"{TABLE}__embedding_chunks")]
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.SQL(", ").join(tables)))
        pgsim.columns.registry.forget_dropped(conn)
    forget_definitions()
    yield made
    made.dispose()


def chunking(database: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database) as conn:
        return conn.execute(
            "SELECT e.column_name, k.tokens, k.overlap, k.chunk_table::regclass::text FROM pgsim.chunking k "
            "JOIN pgsim.embedding e ON e.id = k.embedding_id WHERE e.table_name = %s",
            [TABLE],
        ).fetchall()


def test_create_all_registers_the_declared_chunks_and_nearest_returns_documents(database: str, engine: Engine) -> None:
    Doc = document_class("worker", pgsim.Chunks(16, 4))
    Doc.metadata.create_all(engine)
    assert chunking(database) == [("embedding", 16, 4, f"{TABLE}__embedding_chunks")]

    with Session(engine) as session:
        session.add_all([Doc(id=key, body=text) for key, text in DOCS.items()])
        session.commit()
    with psycopg.connect(database, autocommit=True) as conn:
        assert pgsim.sync(conn, table=TABLE, allow_superuser=True).embedded == len(DOCS)
        chunk_table = sql.Identifier(f"{TABLE}__embedding_chunks")
        chunks = conn.execute(
            sql.SQL("SELECT id, count(*) FROM {} GROUP BY id ORDER BY id").format(chunk_table)
        ).fetchall()
    assert [key for key, _ in chunks] == sorted(DOCS) and all(count >= 2 for _, count in chunks)  # 16-piece chunks

    with Session(engine) as session:
        nearest = Doc.embedding.nearest("how do I patch a punctured inner tube")
        found = [doc.id for doc in session.scalars(select(Doc).order_by(nearest).limit(3))]
    assert found[0] == 2 and sorted(found) == [1, 2, 3]  # documents, each once, not their chunks


def test_a_declaration_whose_chunks_differ_from_the_registration_is_refused_at_flush(
    database: str, engine: Engine
) -> None:
    document_class("flush", pgsim.Chunks(16, 4)).metadata.create_all(engine)

    def flush(chunks: pgsim.Chunks | None) -> None:
        Doc = document_class("flush", chunks)
        with Session(engine) as session:
            session.add(Doc(id=1, body=DOCS[1]))
            session.flush()
            session.rollback()

    with pytest.raises(DefinitionMismatch, match=r"chunks of 16 word pieces \(overlap 4\) where the ORM declares "
                       r"chunks of 16 word pieces \(overlap 8\)") as other_overlap:  # fmt: skip
        flush(pgsim.Chunks(16, 8))
    message = str(other_overlap.value)
    assert "--chunk-tokens 16 --chunk-overlap 8" in message and "chunks=pgsim.Chunks(16, 8)" in message
    with pytest.raises(DefinitionMismatch, match="where the ORM declares no chunks") as undeclared:
        flush(None)
    assert f"op.remove_chunks('{TABLE}', 'embedding')" in str(undeclared.value)

    flush(pgsim.Chunks(16, 4))  # the registered chunks: encoded
    with psycopg.connect(database, autocommit=True) as conn:
        pgsim.remove_chunks(conn, TABLE, "embedding")
    forget_definitions()  # the agreement above is kept for a while
    with pytest.raises(DefinitionMismatch, match=r"no chunks where the ORM declares chunks of 16") as unchunked:
        flush(pgsim.Chunks(16, 4))
    assert "op.change_embedding(" in str(unchunked.value) and "chunks=pgsim.Chunks(16, 4)" in str(unchunked.value)
    flush(None)  # as registered now
