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
from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    TypeDecorator,
    create_engine,
    func,
    insert,
    select,
    text,
    type_coerce,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column
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


class Tag(Base):
    __tablename__ = "orm_tags"
    package: Mapped[str] = mapped_column(ForeignKey("orm_packages.package"), primary_key=True)
    tag: Mapped[str] = mapped_column(String, primary_key=True)


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
        triggers = conn.execute(  # pgsim's two, not the foreign key's
            text("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orm_packages'::regclass AND NOT tgisinternal")
        )
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


def test_async_session_encodes_on_flush_and_searches_off_the_event_loop(
    database: str, engine: Engine, packages: list[Package], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    encoder = encoder_for("all-MiniLM-L6-v2")
    threads: list[str] = []
    for name in ("encode", "encode_query"):
        real = getattr(encoder, name)
        monkeypatch.setattr(
            encoder, name, lambda *a, real=real, **kw: threads.append(threading.current_thread().name) or real(*a, **kw)
        )

    async def scenario() -> list[str]:
        async_engine = create_async_engine(sqlalchemy_url(database))
        try:
            async with AsyncSession(async_engine) as session:
                session.add_all(rows_of(packages[:30]))
                await session.commit()
                result = await session.scalars(
                    select(Package_.package).order_by(Package_.embedding.nearest("an async board game")).limit(3)
                )
                return list(result.all())
        finally:
            await async_engine.dispose()

    found = asyncio.run(scenario())
    assert len(found) == 3
    assert len(threads) >= 2 and all(name.startswith("pgsim-encode") for name in threads)  # flush, query: off the loop
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(embedding) FROM orm_packages")).scalar() == 30


def test_an_async_engine_creates_the_table_and_the_column_is_registered_after(
    database: str, caplog: pytest.LogCaptureFixture
) -> None:
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

    with caplog.at_level("WARNING", logger="pgsim.sqlalchemy.columns"):
        asyncio.run(create())
    assert "orm_memos was created on an async connection" in caplog.text
    assert "register_embeddings_sync" in caplog.text
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


QUERY = "tools for parsing text files"


def test_joins_aliases_and_query_text_in_the_filter_take_the_exact_path(
    engine: Engine, packages: list[Package], package_vectors: Any, encoder: Encoder, caplog: pytest.LogCaptureFixture
) -> None:
    query_vector = encoder.encode_query(QUERY)
    distance = dict(zip([p.package for p in packages], 1 - package_vectors @ query_vector, strict=True))
    libs = exact_top_k(query_vector, package_vectors, packages, 10, lambda p: p.section == "libs")
    close = exact_top_k(query_vector, package_vectors, packages, 10, lambda p: distance[p.package] < 0.75)
    alias = aliased(Package_)
    with Session(engine) as session:
        session.add_all(rows_of(packages))
        session.add_all(Tag(package=p.package, tag="lib") for p in packages if p.section == "libs")
        session.commit()
        with caplog.at_level("INFO", logger="pgsim.sqlalchemy.knn"):
            joined = select(Package_.package).join(Tag).where(Tag.tag == "lib")
            assert list(session.scalars(joined.order_by(Package_.embedding.nearest(QUERY)).limit(10))) == libs
            by_alias = select(alias.package).where(alias.section == "libs")
            assert list(session.scalars(by_alias.order_by(alias.embedding.nearest(QUERY)).limit(10))) == libs
            near = select(Package_.package).where(Package_.embedding.distance(QUERY) < 0.75)
            assert list(session.scalars(near.order_by(Package_.embedding.nearest(QUERY)).limit(10))) == close
        assert caplog.text.count("exact (filter not plannable)") == 3
        assert session.execute(text("SELECT 1")).scalar() == 1  # the transaction is intact


def test_a_filter_on_a_joined_inheritance_parent_takes_the_exact_path(database: str, encoder: Encoder) -> None:
    class InheritanceBase(DeclarativeBase):
        pass

    class Item(InheritanceBase):
        __tablename__ = "orm_items"
        id: Mapped[int] = mapped_column(primary_key=True)
        kind: Mapped[str]
        section: Mapped[str]
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "item"}

    class ItemDoc(Item):
        __tablename__ = "orm_item_docs"
        id: Mapped[int] = mapped_column(ForeignKey("orm_items.id"), primary_key=True)
        body: Mapped[str]
        embedding = embedding_column(source="body", index=HNSW())
        __mapper_args__ = {"polymorphic_identity": "doc"}

    bodies = ["a chess engine", "a json parser", "an xml parser", "a board game", "a yaml parser"]
    sync_engine = create_engine(sqlalchemy_url(database))
    try:
        InheritanceBase.metadata.drop_all(sync_engine)
        InheritanceBase.metadata.create_all(sync_engine)
        with Session(sync_engine) as session:
            session.add_all(
                ItemDoc(id=n, section="libs" if "parser" in body else "games", body=body)
                for n, body in enumerate(bodies)
            )
            session.commit()
            statement = (
                select(ItemDoc.body)
                .where(ItemDoc.section == "libs")  # a column of the parent table
                .order_by(ItemDoc.embedding.nearest("parse json documents"))
                .limit(2)
            )
            query = encoder.encode_query("parse json documents")
            libs = [body for body in bodies if "parser" in body]
            nearest = sorted(libs, key=lambda body: -float(encoder.encode([body])[0] @ query))  # type: ignore[operator]
            assert list(session.scalars(statement)) == nearest[:2]
            assert session.execute(text("SELECT 1")).scalar() == 1
    finally:
        InheritanceBase.metadata.drop_all(sync_engine)
        sync_engine.dispose()


def test_without_knn_plan_a_warning_says_so_and_the_exact_scan_answers_in_the_same_transaction(
    engine: Engine, packages: list[Package], package_vectors: Any, encoder: Encoder
) -> None:
    with Session(engine) as session:
        session.add_all(rows_of(packages))
        session.commit()
        session.execute(text("ALTER FUNCTION pgsim.knn_plan RENAME TO knn_plan_hidden"))  # rolled back below
        statement = (
            select(Package_.package)
            .where(Package_.section == "libs")
            .order_by(Package_.embedding.nearest(QUERY))
            .limit(10)
        )
        with pytest.warns(RuntimeWarning, match="pgsim install"):
            found = list(session.scalars(statement))
        keep = lambda p: p.section == "libs"  # noqa: E731
        assert found == exact_top_k(encoder.encode_query(QUERY), package_vectors, packages, 10, keep)
        assert session.execute(text("SELECT to_regproc('pgsim.knn_plan_hidden') IS NOT NULL")).scalar() is True
        session.rollback()


class Exploding(TypeDecorator[str]):
    """A result type that fails while the rows are read: the hnsw path's Python-side failure."""

    impl = String
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        raise ValueError("boom")


def test_in_autocommit_the_hnsw_settings_apply_to_the_query_and_are_set_back(
    engine: Engine, packages: list[Package], caplog: pytest.LogCaptureFixture
) -> None:
    from pgsim.search import Tuning

    with Session(engine) as session:
        session.add_all(rows_of(packages))
        session.commit()
        session.execute(text("ANALYZE orm_packages"))
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    with autocommit.connect() as conn, Session(bind=conn) as session:
        session.execute(text("SET hnsw.ef_search = 17"))
        during = func.current_setting("hnsw.iterative_scan")  # read while the k-NN query runs
        statement = (
            select(Package_.package, during)
            .where(Package_.section != "no-such-section")
            .order_by(Package_.embedding.nearest(QUERY))
            .limit(10)
            .execution_options(pgsim_tuning=Tuning(exact_below_rows=10))
        )
        with caplog.at_level("INFO", logger="pgsim.sqlalchemy.knn"):
            rows = session.execute(statement).all()
        assert "hnsw path" in caplog.text
        assert len(rows) == 10 and {setting for _, setting in rows} == {"strict_order"}
        assert session.execute(text("SHOW hnsw.ef_search")).scalar() == "17"
        assert session.execute(text("SHOW hnsw.iterative_scan")).scalar() == "off"
        failing = statement.with_only_columns(type_coerce(Package_.package, Exploding()))
        with pytest.raises(ValueError, match="boom"):
            session.execute(failing).all()
        assert session.execute(text("SHOW hnsw.ef_search")).scalar() == "17"
        assert session.execute(text("SHOW hnsw.iterative_scan")).scalar() == "off"


def test_an_hnsw_index_in_table_args_replaces_the_default_one() -> None:
    class ArgsBase(DeclarativeBase):
        pass

    class ByName(ArgsBase):
        __tablename__ = "args_docs"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str]
        embedding = embedding_column(source="body")
        __table_args__ = (hnsw_index("embedding", m=32, ef_construction=128),)

    class ByColumn(ArgsBase):
        __tablename__ = "args_halves"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str]
        embedding = embedding_column(source="body", dtype="halfvec")
        __table_args__ = (hnsw_index(embedding, name="halves_hnsw"),)

    (by_name,) = ByName.__table__.indexes  # type: ignore[attr-defined]
    assert compiled(CreateIndex(by_name)) == (
        "CREATE INDEX args_docs_embedding_hnsw ON args_docs USING hnsw (embedding vector_cosine_ops) "
        "WITH (m = 32, ef_construction = 128)"
    )
    (by_column,) = ByColumn.__table__.indexes  # type: ignore[attr-defined]
    assert compiled(CreateIndex(by_column)) == (
        "CREATE INDEX halves_hnsw ON args_halves USING hnsw (embedding halfvec_cosine_ops) "
        "WITH (m = 16, ef_construction = 64)"
    )
    with pytest.raises(InvalidInput, match="not a vector"):
        Table("bad", MetaData(), Column("id", Integer, primary_key=True), Column("body", String), hnsw_index("body"))


def test_a_bulk_insert_is_encoded_in_one_batch_and_a_given_vector_is_kept(
    engine: Engine, packages: list[Package], package_vectors: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = encoder_for("all-MiniLM-L6-v2")
    calls: list[int] = []
    real_encode = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda texts, **kw: calls.append(len(texts)) or real_encode(texts, **kw))
    given = [0.0] * 383 + [1.0]
    rows: list[dict[str, Any]] = [
        {"package": p.package, "section": p.section, "synopsis": p.synopsis, "description": p.description or None}
        for p in packages[:20]
    ]
    rows[0]["embedding"] = given
    with Session(engine) as session:
        session.execute(insert(Package_), rows)
        session.commit()
        stored = dict(session.execute(select(Package_.package, Package_.embedding)).all())
    assert calls == [19]
    assert list(stored[rows[0]["package"]]) == given
    for p, vector in zip(packages[1:20], package_vectors[1:20], strict=True):
        assert float(np.abs(np.asarray(stored[p.package]) - vector).max()) < 1e-5
    assert "embedding" not in rows[1]  # the caller's rows are left as they were
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM pgsim.queue")).scalar() == 0


def test_a_query_text_is_encoded_once_however_often_it_runs(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = encoder_for("all-MiniLM-L6-v2")
    calls: list[str] = []
    real = encoder.encode_query
    monkeypatch.setattr(encoder, "encode_query", lambda query: calls.append(query) or real(query))
    statement = select(Package_.package).order_by(Package_.embedding.nearest("a query asked twice")).limit(3)
    with Session(engine) as session:
        session.scalars(statement).all()
        session.scalars(statement.offset(3)).all()
    assert calls == ["a query asked twice"]


def test_database_url_keeps_every_connection_parameter() -> None:
    from sqlalchemy import create_engine as make_engine

    from pgsim.sqlalchemy import database_url

    url = database_url(
        "postgresql://app:p%40ss@db.example:5433/prod?sslmode=verify-full&sslrootcert=/etc/ca.pem"
        "&options=-c%20search_path%3Dapp&connect_timeout=5"
    )
    _, arguments = make_engine(url).dialect.create_connect_args(url)
    arguments.pop("context", None)
    assert arguments == {
        "dbname": "prod",
        "user": "app",
        "password": "p@ss",
        "host": "db.example",
        "port": "5433",
        "sslmode": "verify-full",
        "sslrootcert": "/etc/ca.pem",
        "options": "-c search_path=app",
        "connect_timeout": "5",
    }


def test_flush_specs_do_not_keep_dropped_mappers_alive() -> None:
    import gc
    import weakref

    from pgsim.sqlalchemy.columns import _flush_specs, _flush_specs_by_mapper

    def declare() -> Any:
        class TempBase(DeclarativeBase):
            pass

        class Temp(TempBase):
            __tablename__ = "temp"
            id: Mapped[int] = mapped_column(primary_key=True)
            body: Mapped[str]
            embedding = embedding_column(source="body", index=None)

        _flush_specs(Temp.__mapper__)
        assert Temp.__mapper__ in _flush_specs_by_mapper
        return weakref.ref(Temp.__mapper__)

    mapper = declare()
    gc.collect()
    assert mapper() is None
