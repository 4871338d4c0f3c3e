"""One definition of an embedding (issue 22, finding 1): the ORM's encode-on-flush and the database's triggers
and worker write the same vector for the same row when the ORM's declaration and the registration agree, and
the ORM refuses to encode when they do not, naming the difference and the migration. Real server and model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from sqlalchemy import create_engine as sqlalchemy_engine
from sqlalchemy import event, insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import pgsim
from pgsim.columns.worker import sync
from pgsim.sqlalchemy import DefinitionMismatch, database_url, embedding_column
from pgsim.sqlalchemy.definition import forget_definitions

TABLE = "orm_defs"
TITLE, BODY = "Sauce", "A slow-cooked tomato sauce with basil"


def note_class(**declared: Any) -> Any:
    """A mapped class of TABLE whose embedding is declared with ``declared`` (a Base of its own each)."""

    class Base(DeclarativeBase):
        pass

    class Note(Base):
        __tablename__ = TABLE
        id: Mapped[int] = mapped_column(primary_key=True)
        title: Mapped[str]
        body: Mapped[str]
        embedding = embedding_column(**{"source": ["title", "body"], **declared})

    return Note


Note = note_class()


@pytest.fixture
def engines(database: str) -> Iterator[list[Engine]]:
    """Engines the test makes (each its own process, as far as the check's cache goes), disposed after."""
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.dispose()


def engine_for(database: str, engines: list[Engine]) -> Engine:
    engine = sqlalchemy_engine(database_url(database))
    engines.append(engine)
    return engine


@pytest.fixture
def conn(database: str, engines: list[Engine]) -> Iterator[psycopg.Connection[Any]]:
    """TABLE as Note declares it, created and registered by create_all (source: title and body), empty."""
    engine = engine_for(database, engines)
    Note.metadata.drop_all(engine)
    with psycopg.connect(database, autocommit=True) as connection:
        pgsim.install(connection)
        connection.execute("DELETE FROM pgsim.embedding WHERE table_name = %s", [TABLE])
        Note.metadata.create_all(engine)
        yield connection


def vector(conn: Any, row_id: int, column: str = "embedding") -> Any:
    row = conn.execute(f"SELECT {column} FROM {TABLE} WHERE id = %s", [row_id]).fetchone()  # noqa: S608
    return None if row is None or row[0] is None else pgsim.psycopg.vector_array(row[0])


def insert_by_sql(conn: Any, row_id: int) -> None:
    conn.execute(f"INSERT INTO {TABLE} (id, title, body) VALUES (%s, %s, %s)", [row_id, TITLE, BODY])  # noqa: S608


def test_the_orm_and_the_worker_write_the_same_vector_when_the_definitions_agree(
    conn: Any, database: str, engines: list[Engine]
) -> None:
    with Session(engine_for(database, engines)) as session:
        session.add(Note(id=1, title=TITLE, body=BODY))
        session.commit()  # encoded on flush
    insert_by_sql(conn, 2)
    assert sync(conn).embedded == 1  # by the triggers' queue and the worker
    orm, worker = vector(conn, 1), vector(conn, 2)
    assert orm is not None and worker is not None
    assert np.array_equal(orm, worker)


def test_a_changed_registration_stops_the_orm_before_it_encodes_other_text(
    conn: Any, database: str, engines: list[Engine]
) -> None:
    pgsim.change_embedding(conn, TABLE, "embedding", source="body")  # the documented route
    assert sync(conn).switched == 1
    assert pgsim.get_registration(conn, TABLE, "embedding").source == '"body"'  # type: ignore[union-attr]

    with Session(engine_for(database, engines)) as session:  # the application, not yet changed
        session.add(Note(id=1, title=TITLE, body=BODY))
        with pytest.raises(DefinitionMismatch) as refused:
            session.commit()
        session.rollback()
        with pytest.raises(DefinitionMismatch):  # the bulk insert the ORM encodes itself: the same check
            session.execute(insert(Note), [{"id": 3, "title": TITLE, "body": BODY}, {"id": 4, "title": "", "body": ""}])
    message = str(refused.value)
    assert 'source "body" where the ORM\'s is concat_ws(\'\n\n\', "title", "body")' in message
    assert f"`pgsim change-embedding {TABLE} embedding --source title body`" in message
    assert f"op.change_embedding('{TABLE}', 'embedding', source=['title', 'body'])" in message
    assert conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone() == (0,)  # noqa: S608 - nothing was written

    Changed = note_class(source="body", index=None)  # the application, changed to match
    with Session(engine_for(database, engines)) as session:
        session.add(Changed(id=1, title=TITLE, body=BODY))
        session.commit()
    insert_by_sql(conn, 2)
    assert sync(conn).embedded == 1
    assert np.array_equal(vector(conn, 1), vector(conn, 2))
    assert not np.array_equal(vector(conn, 1), pgsim.Encoder().encode([f"{TITLE}\n\n{BODY}"])[0])  # it changed


def test_during_a_change_to_the_declared_source_the_worker_embeds_the_row(
    conn: Any, database: str, engines: list[Engine]
) -> None:
    pgsim.change_embedding(conn, TABLE, "embedding", source="body")  # under way, not switched
    Changed = note_class(source="body", index=None)
    with Session(engine_for(database, engines)) as session:
        session.add(Changed(id=1, title=TITLE, body=BODY))
        session.add(Note(id=2, title=TITLE, body=BODY))  # an application still declaring the old source
        session.commit()
    assert vector(conn, 1) is None  # left to the worker: it fills the new column
    assert vector(conn, 2) is not None  # the old definition is still the column's until the switch
    report = sync(conn)
    assert report.switched == 1
    insert_by_sql(conn, 3)
    sync(conn)
    assert np.array_equal(vector(conn, 1), vector(conn, 3))  # the new source's vector, as the worker makes it


def test_each_difference_is_named_and_the_check_is_read_once_per_engine(
    conn: Any, database: str, engines: list[Engine]
) -> None:
    engine = engine_for(database, engines)
    reads: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: reads.append(args[2]) if "pgsim.embedding" in args[2]
                 else None)  # fmt: skip
    with Session(engine) as session:
        session.add(Note(id=1, title=TITLE, body=BODY))
        session.commit()
        checks = len(reads)
        session.add(Note(id=2, title=TITLE, body=BODY))
        session.commit()
        assert checks > 0 and len(reads) == checks  # the second flush asked nothing

    Half = note_class(dtype="halfvec", index=None)
    with Session(engine) as session:
        session.add(Half(id=3, title=TITLE, body=BODY))
        with pytest.raises(DefinitionMismatch, match="dtype vector where the ORM's is halfvec") as refused:
            session.flush()
        assert "--dtype halfvec" in str(refused.value) and "dtype='halfvec'" in str(refused.value)
        session.rollback()
        before = len(reads)
        session.add(Half(id=3, title=TITLE, body=BODY))
        with pytest.raises(DefinitionMismatch):
            session.flush()
        assert len(reads) > before  # a disagreement is read again: a fix is seen at once
    forget_definitions()
    assert conn.execute(f"SELECT id FROM {TABLE} ORDER BY id").fetchall() == [(1,), (2,)]  # noqa: S608
