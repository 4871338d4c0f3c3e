"""SQLAlchemy ORM integration: the exact SQL it compiles to, and what it does against the real server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.model import exact_top_k
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, func, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.schema import CreateIndex, CreateTable

from pgsim.corpus import Package
from pgsim.encode import Encoder
from pgsim.errors import InvalidInput, ModelNotFound
from pgsim.index import HNSW
from pgsim.psycopg import encoder_for
from pgsim.sqlalchemy import Embedding, embedding_column, hnsw_index

DIALECT = postgresql.psycopg.dialect()  # type: ignore[attr-defined]


class Base(DeclarativeBase):
    pass


class Package_(Base):
    __tablename__ = "orm_packages"
    package: Mapped[str] = mapped_column(String, primary_key=True)
    section: Mapped[str] = mapped_column(String)
    synopsis: Mapped[str] = mapped_column(String)
    description: Mapped[str | None] = mapped_column(String, nullable=True)
    embedding = embedding_column(source=["synopsis", "description"], index=HNSW(m=16, ef_construction=64))


def compiled(statement: Any) -> str:
    return str(statement.compile(dialect=DIALECT))


def test_nearest_under_a_filter_compiles_to_one_select() -> None:
    statement = (
        select(Package_.package)
        .where(Package_.section == "libs")
        .order_by(Package_.embedding.nearest("parse json"))
        .limit(10)
    )
    assert compiled(statement) == (
        "SELECT orm_packages.package \nFROM orm_packages \n"
        "WHERE orm_packages.section = %(section_1)s::VARCHAR "
        "ORDER BY orm_packages.embedding <=> %(param_1)s \n LIMIT %(param_2)s::INTEGER"
    )


def test_distance_and_similarity_compile_to_the_cosine_operator() -> None:
    vector = [0.0] * 383 + [1.0]
    assert compiled(select(Package_.embedding.distance(vector))) == (
        "SELECT orm_packages.embedding <=> %(param_1)s AS anon_1 \nFROM orm_packages"
    )
    assert compiled(select(Package_.embedding.similarity("x"))) == (
        "SELECT %(param_1)s - (orm_packages.embedding <=> %(param_2)s) AS anon_1 \nFROM orm_packages"
    )
    assert compiled(select(func.pgsim.cosine_similarity(Package_.embedding, Package_.embedding))) == (
        "SELECT pgsim.cosine_similarity(orm_packages.embedding, orm_packages.embedding) AS cosine_similarity_1 "
        "\nFROM orm_packages"
    )


def test_the_column_its_index_and_the_hnsw_index_helper_render_as_ddl() -> None:
    table = Package_.__table__
    assert "embedding VECTOR(384)" in compiled(CreateTable(table))  # the dimension, from the model's files
    (index,) = table.indexes  # type: ignore[attr-defined]
    assert compiled(CreateIndex(index)) == (
        "CREATE INDEX orm_packages_embedding_hnsw ON orm_packages USING hnsw (embedding vector_cosine_ops) "
        "WITH (m = 16, ef_construction = 64)"
    )
    other = Table("other", MetaData(), Column("id", Integer, primary_key=True), Column("e", Embedding(8)))
    helper = hnsw_index(other.c.e, m=8, ef_construction=32)
    assert compiled(CreateIndex(helper)) == (
        "CREATE INDEX other_e_hnsw ON other USING hnsw (e vector_cosine_ops) WITH (m = 8, ef_construction = 32)"
    )


def test_bad_input_is_refused_before_any_round_trip() -> None:
    row = Package_(package="p", section="s", synopsis="x")
    with pytest.raises(InvalidInput, match="3 dimensions, the column holds 384"):
        row.embedding = [0.1, 0.2, 0.3]
    with pytest.raises(InvalidInput, match="NaN"):
        row.embedding = [float("nan")] * 384
    with pytest.raises(InvalidInput, match="not None"):
        Package_.embedding.nearest(None)
    with pytest.raises(InvalidInput, match="no model to encode text"):
        Table("plain", MetaData(), Column("e", Embedding(384))).c.e.nearest("text")
    with pytest.raises(ModelNotFound):
        embedding_column(source="body", model="/nonexistent/model")
    with pytest.raises(InvalidInput, match="sync='worker'"):
        embedding_column(source="title || body")


def sqlalchemy_url(dsn: str, driver: str = "postgresql+psycopg") -> URL:
    params = conninfo_to_dict(dsn)
    return URL.create(
        driver,
        username=str(params.get("user")),
        database=str(params["dbname"]),
        query={"host": str(params["host"]), "port": str(params.get("port", 5432))},
    )


@pytest.fixture
def engine(database: str) -> Iterator[Engine]:
    created = create_engine(sqlalchemy_url(database))
    Base.metadata.drop_all(created)
    with psycopg.connect(database, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('pgsim.embedding')").fetchone() != (None,):
            conn.execute("DELETE FROM pgsim.embedding WHERE table_name = 'orm_packages'")
    Base.metadata.create_all(created)
    yield created
    created.dispose()


def rows_of(packages: list[Package]) -> list[Package_]:
    return [Package_(package=p.package, section=p.section, synopsis=p.synopsis, description=p.description or None)
            for p in packages]  # fmt: skip


def test_create_all_registers_the_column_and_adopts_its_index(engine: Engine) -> None:
    with engine.connect() as conn:
        registered = conn.execute(
            text("SELECT column_name, index_name, source FROM pgsim.embedding WHERE table_name = 'orm_packages'")
        ).one()
        assert registered == (
            "embedding",
            "orm_packages_embedding_hnsw",
            'concat_ws(\'\n\n\', "synopsis", "description")',
        )
        triggers = conn.execute(text("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orm_packages'::regclass"))
        assert triggers.scalar() == 2


def test_flush_encodes_new_objects_in_one_batch_and_changed_sources_only(
    engine: Engine, packages: list[Package], package_vectors: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = encoder_for("all-MiniLM-L6-v2")
    calls: list[int] = []
    real_encode = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda texts, **kw: calls.append(len(texts)) or real_encode(texts, **kw))
    with Session(engine) as session:
        session.add_all(rows_of(packages[:50]))
        session.commit()
        assert calls == [50]
        stored = dict(session.execute(select(Package_.package, Package_.embedding)).all())
        for p, vector in zip(packages[:50], package_vectors[:50], strict=True):
            assert float(np.abs(np.asarray(stored[p.package]) - vector).max()) < 1e-5
        first, second = session.scalars(select(Package_).order_by(Package_.package).limit(2)).all()
        first.section = "elsewhere"  # not a source column
        second.synopsis = "a chess engine with a graphical board"
        session.commit()
        assert calls == [50, 1]
        refreshed = np.asarray(session.get(Package_, second.package).embedding)  # type: ignore[union-attr]
        expected = Encoder().encode([f"{second.synopsis}\n\n{second.description}"])[0]
        assert float(np.abs(refreshed - expected).max()) < 1e-5
    with engine.connect() as conn:  # the ORM wrote the vectors: the triggers queued nothing
        assert conn.execute(text("SELECT count(*) FROM pgsim.queue")).scalar() == 0


def test_nearest_under_a_filter_returns_k_exact_rows_and_leaves_no_setting_behind(
    engine: Engine, packages: list[Package], package_vectors: Any, encoder: Encoder
) -> None:
    with Session(engine) as session:
        session.add_all(rows_of(packages))
        session.commit()
        session.execute(text("ANALYZE orm_packages"))
        for section in ("libs", "games", "devel"):
            query = "tools for parsing text files"
            found = session.scalars(
                select(Package_.package)
                .where(Package_.section == section)
                .order_by(Package_.embedding.nearest(query))
                .limit(10)
            ).all()
            expected = exact_top_k(
                encoder.encode_query(query), package_vectors, packages, 10, lambda p, s=section: p.section == s
            )
            assert list(found) == expected
            second_page = session.scalars(
                select(Package_.package)
                .where(Package_.section == section)
                .order_by(Package_.embedding.nearest(query))
                .limit(5)
                .offset(5)
            ).all()
            assert list(second_page) == expected[5:10]
            assert session.execute(text("SHOW hnsw.ef_search")).scalar() == "40"
            assert session.execute(text("SHOW hnsw.iterative_scan")).scalar() == "off"


def test_the_hnsw_path_returns_k_rows_under_its_settings_and_restores_them(
    engine: Engine, packages: list[Package], package_vectors: Any, encoder: Encoder, caplog: pytest.LogCaptureFixture
) -> None:
    from pgsim.search import Tuning

    with Session(engine) as session:
        session.add_all(rows_of(packages))
        session.commit()
        session.execute(text("ANALYZE orm_packages"))
        session.execute(text("SET hnsw.ef_search = 17"))  # the session's own setting, to be kept
        query = "tools for parsing text files"
        statement = (
            select(Package_.package)
            .where(Package_.section != "no-such-section")
            .order_by(Package_.embedding.nearest(query))
            .limit(10)
            .execution_options(pgsim_tuning=Tuning(exact_below_rows=10))
        )
        with caplog.at_level("INFO", logger="pgsim.sqlalchemy.knn"):
            found = session.scalars(statement).all()
        assert "hnsw path" in caplog.text
        expected = exact_top_k(encoder.encode_query(query), package_vectors, packages, 10)
        assert len(found) == 10 and len(set(found) & set(expected)) >= 9
        assert session.execute(text("SHOW hnsw.ef_search")).scalar() == "17"
        assert session.execute(text("SHOW hnsw.iterative_scan")).scalar() == "off"


def test_sync_worker_columns_are_filled_by_the_worker(database: str) -> None:
    from pgsim.sync import sync

    class WorkerBase(DeclarativeBase):
        pass

    class Note(WorkerBase):
        __tablename__ = "orm_notes"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str]
        embedding = embedding_column(source="upper(body)", sync="worker", index=None)

    sync_engine = create_engine(sqlalchemy_url(database))
    try:
        WorkerBase.metadata.drop_all(sync_engine)
        WorkerBase.metadata.create_all(sync_engine)
        with Session(sync_engine) as session:
            session.add_all([Note(id=1, body="a chess engine"), Note(id=2, body="a json parser")])
            session.commit()
            assert session.scalars(select(Note.embedding)).all() == [None, None]  # not encoded on flush
        with psycopg.connect(database, autocommit=True) as conn:
            assert sync(conn).embedded == 2
        with Session(sync_engine) as session:
            assert all(vector is not None for vector in session.scalars(select(Note.embedding)))
    finally:
        WorkerBase.metadata.drop_all(sync_engine)
        sync_engine.dispose()


def test_async_session_encodes_on_flush_and_searches(database: str, engine: Engine, packages: list[Package]) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async def scenario() -> list[str]:
        async_engine = create_async_engine(sqlalchemy_url(database))
        try:
            async with AsyncSession(async_engine) as session:
                session.add_all(rows_of(packages[:30]))
                await session.commit()
                result = await session.scalars(
                    select(Package_.package).order_by(Package_.embedding.nearest("a board game")).limit(3)
                )
                return list(result.all())
        finally:
            await async_engine.dispose()

    found = asyncio.run(scenario())
    assert len(found) == 3
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(embedding) FROM orm_packages")).scalar() == 30


def test_an_async_engine_creates_the_table_and_the_column_is_registered_after(database: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from pgsim.sqlalchemy import register_embeddings_sync

    class AsyncBase(DeclarativeBase):
        pass

    class Memo(AsyncBase):
        __tablename__ = "orm_memos"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str]
        embedding = embedding_column(source="body", index=None)

    url = sqlalchemy_url(database)

    async def create() -> None:
        async_engine = create_async_engine(url)
        try:
            async with async_engine.begin() as conn:
                await conn.run_sync(AsyncBase.metadata.drop_all)
                await conn.run_sync(AsyncBase.metadata.create_all)
        finally:
            await async_engine.dispose()

    asyncio.run(create())
    register_embeddings_sync(url.render_as_string(hide_password=False), AsyncBase.metadata)
    register_embeddings_sync(url.render_as_string(hide_password=False), AsyncBase.metadata)  # idempotent
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM pgsim.embedding WHERE table_name = 'orm_memos'").fetchone() == (1,)


def test_a_limit_given_as_a_parameter_runs_as_written(engine: Engine) -> None:
    from sqlalchemy import bindparam

    with Session(engine) as session:
        plain = select(Package_.package).limit(bindparam("n"))
        assert session.scalars(plain, {"n": 3}).all() == []
        nearest = select(Package_.package).order_by(Package_.embedding.nearest("x")).limit(bindparam("n"))
        assert session.scalars(nearest, {"n": 3}).all() == []
