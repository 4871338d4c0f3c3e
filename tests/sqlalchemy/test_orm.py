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
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column, relationship
from sqlalchemy.schema import CreateIndex, CreateTable

from pgsim.db.hnsw import HNSW
from pgsim.demo.corpus import Package
from pgsim.encoding.encoder import Encoder, encoder_for
from pgsim.errors import InvalidInput, ModelNotFound
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
    tags: Mapped[list[Tag]] = relationship(viewonly=True)


class Tag(Base):
    __tablename__ = "orm_tags"
    package: Mapped[str] = mapped_column(ForeignKey("orm_packages.package"), primary_key=True)
    tag: Mapped[str] = mapped_column(String, primary_key=True)


class KindBase(DeclarativeBase):
    pass


class Kinded(KindBase):
    """orm_packages again, with single-table inheritance on its section (for the criteria the ORM adds)."""

    __tablename__ = "orm_packages"
    package: Mapped[str] = mapped_column(String, primary_key=True)
    section: Mapped[str] = mapped_column(String)
    embedding = mapped_column(Embedding(384, "all-MiniLM-L6-v2"))
    __mapper_args__ = {"polymorphic_on": "section", "polymorphic_identity": "any"}


class Libs(Kinded):
    __mapper_args__ = {"polymorphic_identity": "libs"}


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
    assert compiled(select(func.pgsim.rrf(3, 60), func.pgsim.nearest_label(Package_.embedding, ["a"], [vector]))) == (
        "SELECT pgsim.rrf(%(rrf_2)s::INTEGER, %(rrf_3)s::INTEGER) AS rrf_1, "
        "pgsim.nearest_label(orm_packages.embedding, %(nearest_label_2)s, %(nearest_label_3)s) AS nearest_label_1 "
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
    with pytest.raises(InvalidInput, match="dimension=32, but all-MiniLM-L6-v2 makes vectors of 384 dimensions"):
        embedding_column(source="body", dimension=32)
    assert embedding_column(source="body", dimension=384, index=None).column.type.dim == 384
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


def rows_of(packages: list[Package], vectors: Any = None) -> list[Package_]:
    """ORM rows of ``packages``; with ``vectors`` (the session's encodings of the same text) given, the flush
    keeps them instead of encoding the rows again, for tests about something else than encode-on-flush."""
    rows = [Package_(package=p.package, section=p.section, synopsis=p.synopsis, description=p.description or None)
            for p in packages]  # fmt: skip
    for row, vector in zip(rows, [] if vectors is None else vectors, strict=False):
        row.embedding = list(map(float, vector))
    return rows


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
        session.add_all(rows_of(packages, package_vectors))
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
    from pgsim.knn.planner import Tuning

    with Session(engine) as session:
        session.add_all(rows_of(packages, package_vectors))
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
    from pgsim.columns.worker import sync

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


QUERY = "tools for parsing text files"


def load_rows(session: Session, packages: list[Package], vectors: Any) -> None:
    """The sample with the vectors the model gave it (nothing encodes), analyzed for knn_plan's estimates."""
    rows = [
        {"package": p.package, "section": p.section, "synopsis": p.synopsis, "description": p.description or None,
         "embedding": vector}
        for p, vector in zip(packages, vectors, strict=True)
    ]  # fmt: skip
    session.execute(insert(Package_), rows)
    session.commit()
    session.execute(text("ANALYZE orm_packages"))


def index_scans_only(session: Session) -> None:
    """The planner takes the HNSW index whenever it can, and pgvector's iterative scan gives up after a few
    dozen tuples (work_mem 64kB): what a large table does to a selective filter, on a small one."""
    session.execute(text("SET enable_seqscan = off"))
    session.execute(text("SET work_mem = '64kB'"))
    session.execute(text("SET hnsw.scan_mem_multiplier = 1"))


def test_a_limit_given_as_a_parameter_or_a_fetch_keeps_the_k_rows_contract(
    engine: Engine, packages: list[Package], package_vectors: Any, encoder: Encoder, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy import bindparam

    expected = exact_top_k(encoder.encode_query(QUERY), package_vectors, packages, 10, lambda p: p.section == "games")
    with Session(engine) as session:
        plain = select(Package_.package).limit(bindparam("n"))
        assert session.scalars(plain, {"n": 3}).all() == []
        load_rows(session, packages, package_vectors)
        index_scans_only(session)
        base = select(Package_.package).where(Package_.section == "games").order_by(Package_.embedding.nearest(QUERY))
        assert len(session.scalars(base.limit(10).order_by(None).order_by(Package_.embedding.op("<=>")(
            Package_.embedding.type.query_parameter(QUERY)))).all()) < 10  # fmt: skip
        with caplog.at_level("INFO", logger="pgsim.sqlalchemy.knn"):
            assert list(session.scalars(base.limit(bindparam("n")), {"n": 10})) == expected
            assert list(session.scalars(base.fetch(10))) == expected
            assert (
                list(session.scalars(base.limit(bindparam("n")).offset(bindparam("o")), {"n": 5, "o": 5}))
                == (expected[5:])
            )
        assert caplog.text.count("exact path") == 2  # the bound LIMITs were planned with their values


def test_rows_not_embedded_yet_are_left_out_on_every_path(
    engine: Engine, packages: list[Package], package_vectors: Any
) -> None:
    counts: dict[str, int] = {}
    for p in packages:
        counts[p.section] = counts.get(p.section, 0) + 1
    section = next(s for s, n in sorted(counts.items(), key=lambda item: item[1]) if n >= 3)
    waiting = next(p.package for p in packages if p.section == section)
    with Session(engine) as session:
        load_rows(session, packages, package_vectors)
        session.execute(text("UPDATE orm_packages SET embedding = NULL WHERE package = :p"), {"p": waiting})
        session.commit()
        found = session.scalars(
            select(Package_.package)
            .where(Package_.section == section)
            .order_by(Package_.embedding.nearest(QUERY))
            .limit(counts[section] + 5)
        ).all()
        session.execute(text("DELETE FROM pgsim.queue"))  # the cleared row was queued for the worker
        session.commit()
    assert sorted(found) == sorted(p.package for p in packages if p.section == section and p.package != waiting)


def test_filters_the_orm_adds_itself_are_planned(
    engine: Engine, packages: list[Package], package_vectors: Any, encoder: Encoder, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy import event
    from sqlalchemy.orm import ORMExecuteState, with_loader_criteria

    from pgsim.knn.planner import Tuning

    query_vector = encoder.encode_query(QUERY)
    libs = exact_top_k(query_vector, package_vectors, packages, 10, lambda p: p.section == "libs")
    games = exact_top_k(query_vector, package_vectors, packages, 10, lambda p: p.section == "games")
    assert sum(p.section == "libs" for p in packages) < len(packages) / 2  # below min_hnsw_selectivity
    tuning = Tuning(exact_below_rows=0)  # the path rests on the filter's selectivity alone

    def games_only(state: ORMExecuteState) -> None:  # an application's hook, registered after pgsim's
        if state.is_select:
            state.statement = state.statement.options(with_loader_criteria(Kinded, Kinded.section == "games"))

    with Session(engine) as session:
        load_rows(session, packages, package_vectors)
        with caplog.at_level("INFO", logger="pgsim.sqlalchemy.knn"):
            sti = select(Libs.package).order_by(Libs.embedding.nearest(QUERY)).limit(10)
            assert list(session.scalars(sti.execution_options(pgsim_tuning=tuning))) == libs
            criteria = select(Kinded.package).options(with_loader_criteria(Kinded, Kinded.section == "libs"))
            nearest = criteria.order_by(Kinded.embedding.nearest(QUERY)).limit(10)
            assert list(session.scalars(nearest.execution_options(pgsim_tuning=tuning))) == libs
        assert caplog.text.count("exact path") == 2 and "hnsw path" not in caplog.text
        caplog.clear()
        event.listen(session, "do_orm_execute", games_only)
        with caplog.at_level("INFO", logger="pgsim.sqlalchemy.knn"):
            unfiltered = select(Kinded.package).order_by(Kinded.embedding.nearest(QUERY)).limit(10)
            assert list(session.scalars(unfiltered.execution_options(pgsim_tuning=tuning))) == games
        assert "1 conditions, 0 were planned; exact scan instead" in caplog.text


def test_a_joined_eager_collection_does_not_count_as_rows(
    engine: Engine, packages: list[Package], package_vectors: Any, encoder: Encoder, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy.orm import joinedload

    from pgsim.knn.planner import Tuning

    sound = [p for p in packages if p.section == "sound"]
    assert len(sound) < 10  # the hnsw path returns fewer than k objects: the fallback must run
    expected = exact_top_k(encoder.encode_query(QUERY), package_vectors, packages, 10, lambda p: p.section == "sound")
    with Session(engine) as session:
        load_rows(session, packages, package_vectors)
        session.add_all(Tag(package=p.package, tag=f"t{n}") for p in sound for n in range(4))  # 4 joined rows each
        session.commit()
        statement = (
            select(Package_)
            .where(Package_.section == "sound")
            .order_by(Package_.embedding.nearest(QUERY))
            .limit(10)
            .options(joinedload(Package_.tags))
            .execution_options(pgsim_tuning=Tuning(exact_below_rows=0, min_hnsw_selectivity=0.001))
        )
        with caplog.at_level("INFO", logger="pgsim.sqlalchemy.knn"):
            found = session.scalars(statement).unique().all()
        assert f"hnsw path gave {len(sound)} of 10 rows; exact scan instead" in caplog.text
        assert [p.package for p in found] == expected
        assert all(len(p.tags) == 4 for p in found)


def test_joins_aliases_and_query_text_in_the_filter_take_the_exact_path(
    engine: Engine, packages: list[Package], package_vectors: Any, encoder: Encoder, caplog: pytest.LogCaptureFixture
) -> None:
    query_vector = encoder.encode_query(QUERY)
    distance = dict(zip([p.package for p in packages], 1 - package_vectors @ query_vector, strict=True))
    libs = exact_top_k(query_vector, package_vectors, packages, 10, lambda p: p.section == "libs")
    close = exact_top_k(query_vector, package_vectors, packages, 10, lambda p: distance[p.package] < 0.75)
    alias = aliased(Package_)
    with Session(engine) as session:
        session.add_all(rows_of(packages, package_vectors))
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
        session.add_all(rows_of(packages, package_vectors))
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
    engine: Engine, packages: list[Package], package_vectors: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from pgsim.knn.planner import Tuning

    with Session(engine) as session:
        session.add_all(rows_of(packages, package_vectors))
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

    from pgsim.sqlalchemy.flush import _flush_specs_by_mapper, flush_specs

    def declare() -> Any:
        class TempBase(DeclarativeBase):
            pass

        class Temp(TempBase):
            __tablename__ = "temp"
            id: Mapped[int] = mapped_column(primary_key=True)
            body: Mapped[str]
            embedding = embedding_column(source="body", index=None)

        flush_specs(Temp.__mapper__)
        assert Temp.__mapper__ in _flush_specs_by_mapper
        return weakref.ref(Temp.__mapper__)

    mapper = declare()
    gc.collect()
    assert mapper() is None


def test_merge_and_an_explicit_none_encode_and_an_unchanged_source_does_not(
    engine: Engine, encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = encoder_for("all-MiniLM-L6-v2")
    calls: list[list[str]] = []
    real_encode = model.encode
    monkeypatch.setattr(model, "encode", lambda texts, **kw: calls.append(list(texts)) or real_encode(texts, **kw))

    def stored(session: Session, package: str) -> Any:
        return session.scalar(select(Package_.embedding).where(Package_.package == package))

    def encoded(words: str) -> Any:
        return np.asarray(encoder.encode([words])[0])

    with Session(engine) as session:
        session.add(Package_(package="a", section="s", synopsis="a json parser", embedding=None))  # Doc(**payload)
        session.add(Package_(package="b", section="s", synopsis="a chess engine"))
        session.commit()
        assert float(np.abs(np.asarray(stored(session, "a")) - encoded("a json parser")).max()) < 1e-5
        detached = session.get(Package_, "b")
        session.expunge(detached)  # type: ignore[arg-type]
    detached.synopsis = "an image decoding library"  # type: ignore[union-attr]
    with Session(engine) as session:
        session.merge(detached)  # copies the loaded embedding back too: not an assignment
        session.commit()
        assert float(np.abs(np.asarray(stored(session, "b")) - encoded("an image decoding library")).max()) < 1e-5
        calls.clear()
        again = session.get(Package_, "b")
        session.commit()  # expires it
        again.synopsis = "an image decoding library"  # type: ignore[union-attr]  # the value it has
        session.commit()
        assert calls == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM pgsim.queue")).scalar() == 0


def test_a_declared_hnsw_index_is_the_one_registered(database: str) -> None:
    class IndexBase(DeclarativeBase):
        pass

    class Custom(IndexBase):
        __tablename__ = "idx_custom"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str]
        embedding = embedding_column(source="body")
        __table_args__ = (hnsw_index(embedding, name="idx_custom_graph", m=32, ef_construction=128),)

    class Named(IndexBase):
        __tablename__ = "idx_named"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str]
        embedding = embedding_column(source="body")
        __table_args__ = (hnsw_index("embedding", m=32, ef_construction=128),)

    class Bare(IndexBase):
        __tablename__ = "idx_bare"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str]
        embedding = embedding_column(source="body", index=None)
        __table_args__ = (hnsw_index("embedding", m=24, ef_construction=100),)

    sync_engine = create_engine(sqlalchemy_url(database))
    try:
        IndexBase.metadata.drop_all(sync_engine)
        IndexBase.metadata.create_all(sync_engine)
        with sync_engine.connect() as conn:
            indexes = conn.execute(
                text(
                    "SELECT tablename, indexname FROM pg_indexes WHERE tablename LIKE 'idx\\_%' AND indexdef LIKE "
                    "'%USING hnsw%' ORDER BY 1, 2"
                )  # fmt: skip
            ).all()
            registered = conn.execute(
                text(
                    "SELECT table_name, index_name, index_m, index_ef_construction FROM pgsim.embedding "
                    "WHERE table_name LIKE 'idx\\_%' ORDER BY 1"
                )  # fmt: skip
            ).all()
        assert indexes == [
            ("idx_bare", "idx_bare_embedding_hnsw"),
            ("idx_custom", "idx_custom_graph"),
            ("idx_named", "idx_named_embedding_hnsw"),
        ]
        assert registered == [
            ("idx_bare", "idx_bare_embedding_hnsw", 24, 100),
            ("idx_custom", "idx_custom_graph", 32, 128),
            ("idx_named", "idx_named_embedding_hnsw", 32, 128),
        ]
    finally:
        IndexBase.metadata.drop_all(sync_engine)
        sync_engine.dispose()


def test_a_lost_connection_or_a_cancel_surfaces_as_itself(
    database: str, engine: Engine, packages: list[Package], package_vectors: Any
) -> None:
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from pgsim.knn.planner import Tuning

    hnsw = Tuning(exact_below_rows=0)
    nearest = Package_.embedding.nearest(QUERY)
    with Session(engine) as session:
        load_rows(session, packages, package_vectors)
        killed = select(Package_.package, func.pg_terminate_backend(func.pg_backend_pid()))
        with pytest.raises(OperationalError, match="terminat"):
            session.execute(killed.order_by(nearest).limit(10).execution_options(pgsim_tuning=hnsw)).all()

    async def cancelled(isolation_level: str) -> None:
        async_engine = create_async_engine(sqlalchemy_url(database), isolation_level=isolation_level)
        try:
            async with AsyncSession(async_engine) as session:
                slow = select(Package_.package, func.pg_sleep(0.2)).order_by(nearest).limit(10)
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(session.execute(slow.execution_options(pgsim_tuning=hnsw)), 0.5)
        finally:
            await async_engine.dispose()

    for isolation_level in ("READ COMMITTED", "AUTOCOMMIT"):
        asyncio.run(cancelled(isolation_level))


def test_a_percent_in_the_filter_is_planned_as_written_and_limit_0_returns_nothing(
    engine: Engine, packages: list[Package], package_vectors: Any, encoder: Encoder, caplog: pytest.LogCaptureFixture
) -> None:
    import warnings

    from pgsim.knn.planner import Tuning

    even = func.length(Package_.package) % 2 == 0
    expected = exact_top_k(
        encoder.encode_query(QUERY), package_vectors, packages, 10, lambda p: len(p.package) % 2 == 0
    )
    statement = (
        select(Package_.package)
        .where(even)
        .order_by(Package_.embedding.nearest(QUERY))
        .execution_options(pgsim_tuning=Tuning(exact_below_rows=0, min_hnsw_selectivity=0.001))
    )
    with Session(engine) as session, warnings.catch_warnings():
        warnings.simplefilter("error")  # no "run `pgsim install`"
        load_rows(session, packages, package_vectors)
        with caplog.at_level("INFO", logger="pgsim.sqlalchemy.knn"):
            found = list(session.scalars(statement.limit(10)))
            assert session.scalars(statement.limit(0)).all() == []
        assert "hnsw path" in caplog.text and "could not plan" not in caplog.text
        assert len(found) == 10 and len(set(found) & set(expected)) >= 9
    from pgsim.sqlalchemy.knn import _literal_sql  # what knn_plan is given: a percent sign is one

    assert _literal_sql(Package_.section != "50%", DIALECT) == "orm_packages.section != '50%'"


def test_a_flush_source_outside_the_embeddings_table_is_a_clear_error() -> None:
    class JoinedBase(DeclarativeBase):
        pass

    class Entry(JoinedBase):
        __tablename__ = "orm_entries"
        id: Mapped[int] = mapped_column(primary_key=True)
        kind: Mapped[str]
        title: Mapped[str]
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "entry"}

    class Article(Entry):
        __tablename__ = "orm_articles"
        id: Mapped[int] = mapped_column(ForeignKey("orm_entries.id"), primary_key=True)
        embedding = embedding_column(source="title", index=None)
        __mapper_args__ = {"polymorphic_identity": "article"}

    with pytest.raises(
        InvalidInput, match="'title' of orm_articles.embedding is not in orm_articles .it is in orm_entries"
    ):
        JoinedBase.registry.configure()
    assert Article.__tablename__ == "orm_articles"


def test_a_vector_assigned_to_a_new_object_after_construction_is_kept(
    engine: Engine, packages: list[Package], package_vectors: Any
) -> None:
    with Session(engine) as session:
        row = rows_of(packages[:1])[0]
        row.embedding = list(map(float, package_vectors[1]))  # another row's vector: kept, so not re-encoded
        session.add(row)
        session.commit()
        stored = session.scalars(select(Package_.embedding).where(Package_.package == packages[0].package)).one()
    assert np.allclose(np.asarray(stored, dtype=np.float32), package_vectors[1], atol=1e-6)
