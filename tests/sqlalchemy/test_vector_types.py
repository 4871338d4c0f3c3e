"""One vector type for every integration: a stored vector read through the ORM and through pgsim's psycopg
adapters is a 1-D float32 numpy array (``pgsim.psycopg.VectorArray``), for vector and halfvec columns, in
text and binary results alike, and it binds back as it came. Against the real server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pgsim.db.schema import install
from pgsim.psycopg import VectorArray, register
from pgsim.sqlalchemy import Embedding, HalfEmbedding, database_url

VALUES = [0.1, -2.5, 1 / 3]


class Base(DeclarativeBase):
    pass


class Pair(Base):
    __tablename__ = "vector_pairs"
    id: Mapped[int] = mapped_column(primary_key=True)
    vec = mapped_column(Embedding(3))
    half = mapped_column(HalfEmbedding(3))


@pytest.fixture(scope="module")
def engine(database: str) -> Iterator[Engine]:
    with psycopg.connect(database, autocommit=True) as conn:
        install(conn)
    created = create_engine(database_url(database))
    Base.metadata.drop_all(created)
    Base.metadata.create_all(created)
    with Session(created) as session:
        session.add(Pair(id=1, vec=VALUES, half=VALUES))
        session.commit()
    yield created
    created.dispose()


def is_float32_vector(value: Any) -> bool:
    return isinstance(value, VectorArray) and isinstance(value, np.ndarray) and value.dtype == np.float32


def test_the_orm_reads_float32_arrays_for_vector_and_halfvec(engine: Engine) -> None:
    with Session(engine) as session:
        pair = session.get(Pair, 1)
        assert pair is not None
        assert is_float32_vector(pair.vec) and is_float32_vector(pair.half)
        assert np.array_equal(pair.vec, np.array(VALUES, dtype=np.float32))
        assert np.array_equal(pair.half, np.array(VALUES, dtype=np.float16).astype(np.float32))  # widened exactly
        assert float(np.array(pair.vec) @ np.ones(3)) == pytest.approx(sum(VALUES), abs=1e-6)
        assert session.scalars(select(Pair.vec)).one().shape == (3,)
        pair.vec = pair.half  # a vector read binds back
        session.commit()
        assert np.array_equal(session.get(Pair, 1).vec, pair.half)  # type: ignore[union-attr]
        pair.vec = VALUES
        session.commit()


@pytest.mark.parametrize("binary", [False, True])
def test_pgsims_psycopg_adapters_read_the_same_arrays_as_the_orm(engine: Engine, database: str, binary: bool) -> None:
    with Session(engine) as session:
        pair = session.get(Pair, 1)
        assert pair is not None
        orm = (pair.vec, pair.half)
    with psycopg.connect(database) as conn:
        register(conn)
        row = conn.execute("SELECT vec, half, ARRAY[vec, vec] FROM vector_pairs", binary=binary).fetchone()
        assert row is not None
        vec, half, both = row
        assert is_float32_vector(vec) and is_float32_vector(half) and all(map(is_float32_vector, both))
        assert np.array_equal(vec, orm[0]) and np.array_equal(half, orm[1])
        assert float(np.array(vec) @ np.ones(3)) == pytest.approx(sum(VALUES), abs=1e-6)  # Vector refused this
        assert vec.to_list() == orm[0].tolist() and type(vec.to_numpy()) is np.ndarray  # pgvector.Vector's API
        same = conn.execute("SELECT vec = %s, half = %s::halfvec FROM vector_pairs", [vec, half]).fetchone()
        assert same == (True, True)  # and they bind back
