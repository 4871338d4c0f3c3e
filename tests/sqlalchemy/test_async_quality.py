"""The async forms of hybrid search, the relevance threshold and near-duplicates (pgsim.sqlalchemy's
*_async): on an AsyncSession they call the schema's SQL functions, and give what the synchronous forms (pgsim's
Python searches, an independent implementation) give on the same data: the same objects, in the same order,
with the same scores. The real sample and model."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Computed, String, create_engine, insert, text
from sqlalchemy.dialects.postgresql import TSVECTOR
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import pgsim
import pgsim.sqlalchemy.async_quality as async_quality
from pgsim.demo.corpus import Package
from pgsim.errors import InvalidInput
from pgsim.sqlalchemy import (
    Embedding,
    FusedMatch,
    RelevantMatch,
    database_url,
    embedding_column,
    hybrid_search,
    hybrid_search_async,
    near_duplicates,
    near_duplicates_async,
    relevant_search,
    relevant_search_async,
)

TABLE = "orm_async_quality_packages"
FTS = "to_tsvector('english', coalesce(synopsis, '') || ' ' || coalesce(description, ''))"
QUERY = "library for parsing XML documents"
HNSW = pgsim.Tuning(exact_below_rows=0, min_hnsw_selectivity=0)  # the HNSW path, however few rows pass


class Base(DeclarativeBase):
    pass


class Pkg(Base):
    __tablename__ = TABLE
    package: Mapped[str] = mapped_column(String, primary_key=True)
    section: Mapped[str]
    synopsis: Mapped[str]
    description: Mapped[str | None]
    embedding = embedding_column(source=["synopsis", "description"])
    fts = mapped_column(TSVECTOR, Computed(FTS, persisted=True))


class HalfPkg(Base):
    """The same rows in a halfvec column: the query vector is bound with the column's type."""

    __tablename__ = TABLE + "_half"
    package: Mapped[str] = mapped_column(String, primary_key=True)
    synopsis: Mapped[str]
    embedding = embedding_column(source="synopsis", dtype="halfvec")
    fts = mapped_column(TSVECTOR, Computed("to_tsvector('english', synopsis)", persisted=True))


class KindBase(DeclarativeBase):
    pass


class Kinded(KindBase):
    __tablename__ = TABLE
    package: Mapped[str] = mapped_column(String, primary_key=True)
    section: Mapped[str]
    embedding = mapped_column(Embedding(384, "all-MiniLM-L6-v2"))
    __mapper_args__ = {"polymorphic_on": "section", "polymorphic_identity": "any"}


class KindedLibs(Kinded):
    __mapper_args__ = {"polymorphic_identity": "libs"}


def few() -> list[Any]:
    """Criteria that keep a few dozen rows, with a LIKE pattern whose % must reach the server as it is."""
    return [Pkg.section.in_(["libs", "devel", "utils", "text"]), Pkg.synopsis.like("%librar%")]


@pytest.fixture(scope="module")
def engine(database: str, packages: list[Package], package_vectors: Any) -> Iterator[Engine]:
    created = create_engine(database_url(database))
    Base.metadata.drop_all(created)
    Base.metadata.create_all(created)
    rows = [
        {"package": p.package, "section": p.section, "synopsis": p.synopsis, "description": p.description or None,
         "embedding": vector}
        for p, vector in zip(packages, package_vectors, strict=True)
    ]  # fmt: skip
    with Session(created) as session:
        session.execute(insert(Pkg), rows)
        session.execute(insert(HalfPkg), [{k: row[k] for k in ("package", "synopsis", "embedding")} for row in rows])
        session.commit()
        session.execute(text(f"ANALYZE {TABLE}"))
        session.commit()
    yield created
    created.dispose()


def on_async_session(database: str, work: Callable[[AsyncSession], Awaitable[Any]]) -> Any:
    async def scenario() -> Any:
        async_engine = create_async_engine(database_url(database))
        try:
            async with AsyncSession(async_engine) as session:
                return await work(session)
        finally:
            await async_engine.dispose()

    return asyncio.run(scenario())


def fused(matches: list[Any]) -> list[tuple[Any, ...]]:
    return [(m.obj.package, m.score, m.distance, m.vector_rank, m.text_rank, m.relevance) for m in matches]


def assert_same(found: list[tuple[Any, ...]], expected: list[tuple[Any, ...]]) -> None:
    """Same keys in the same order, and the same numbers (to 1e-6)."""
    assert [row[0] for row in found] == [row[0] for row in expected]
    for got, want in zip(found, expected, strict=True):
        assert got[1:] == pytest.approx(want[1:], abs=1e-6), got[0]


@pytest.mark.parametrize(
    ("where", "tuning"),
    [(None, pgsim.Tuning()), ("section", pgsim.Tuning()), ("few", pgsim.Tuning()), ("few", HNSW)],
    ids=["all", "section", "few", "few-on-hnsw"],
)
def test_hybrid_search_async_gives_what_the_sync_form_gives(
    engine: Engine, database: str, where: str | None, tuning: pgsim.Tuning
) -> None:
    k = 6 if where == "few" else 8  # "few" keeps 6 rows: all of them come back

    def criteria() -> Any:
        return {None: None, "section": Pkg.section.in_(["libs", "devel", "text"]), "few": few()}[where]

    async def search(session: AsyncSession) -> list[Any]:
        found = await hybrid_search_async(session, Pkg, QUERY, k=k, where=criteria(), tuning=tuning)
        assert all(isinstance(m, FusedMatch) and isinstance(m.obj, Pkg) and m.obj in session for m in found)
        return fused(found)

    found = on_async_session(database, search)
    with Session(engine) as session:
        expected = fused(hybrid_search(session, Pkg, QUERY, k=k, where=criteria(), tuning=tuning))
    assert len(found) == k  # k rows, under a filter too
    assert_same(found, expected)


def test_hybrid_search_async_cuts_by_relevance_and_takes_the_options(engine: Engine, database: str) -> None:
    options = {"k": 20, "candidates": 30, "rrf_k": 10, "text_column": Pkg.fts, "text_config": "english"}
    with Session(engine) as session:
        everything = hybrid_search(session, Pkg, QUERY, **options)  # type: ignore[arg-type]
        cut = sorted(m.relevance for m in everything if m.relevance is not None)[len(everything) // 2]
        expected = fused(hybrid_search(session, Pkg, QUERY, min_score=cut, **options))  # type: ignore[arg-type]

    async def search(session: AsyncSession) -> list[Any]:
        return fused(await hybrid_search_async(session, Pkg, QUERY, min_score=cut, **options))  # type: ignore[arg-type]

    found = on_async_session(database, search)
    assert 0 < len(found) < len(everything)
    assert_same(found, expected)


@pytest.mark.parametrize(
    ("where", "tuning"),
    [(None, pgsim.Tuning()), ("few", pgsim.Tuning()), ("few", HNSW)],
    ids=["all", "few", "few-on-hnsw"],
)
def test_relevant_search_async_gives_what_the_sync_form_gives(
    engine: Engine, database: str, package_vectors: Any, where: str | None, tuning: pgsim.Tuning
) -> None:
    async def search(session: AsyncSession) -> tuple[list[Any], list[Any], list[Any]]:
        criteria = few() if where else None
        found = await relevant_search_async(session, Pkg, QUERY, k=5, min_score=0, where=criteria, tuning=tuning)
        assert all(isinstance(m, RelevantMatch) and isinstance(m.obj, Pkg) for m in found)
        by_vector = await relevant_search_async(session, Pkg, package_vectors[3], k=4, min_score=0.01, reference=30)
        none = await relevant_search_async(session, Pkg, "a recipe for lemon cake with icing", where=criteria)
        return (
            [(m.obj.package, m.distance, m.score) for m in found],
            [(m.obj.package, m.distance, m.score) for m in by_vector],
            none,
        )

    found, by_vector, none = on_async_session(database, search)
    with Session(engine) as session:
        expected = relevant_search(session, Pkg, QUERY, k=5, min_score=0, where=few() if where else None, tuning=tuning)
        expected_vector = relevant_search(session, Pkg, package_vectors[3], k=4, min_score=0.01, reference=30)
    assert len(found) == 5 and none == []
    assert_same(found, [(m.obj.package, m.distance, m.score) for m in expected])
    assert by_vector and by_vector[0][1] == pytest.approx(0, abs=1e-6)
    assert_same(by_vector, [(m.obj.package, m.distance, m.score) for m in expected_vector])


def test_a_halfvec_column_gives_what_the_sync_form_gives(engine: Engine, database: str) -> None:
    async def search(session: AsyncSession) -> tuple[list[Any], list[Any]]:
        relevant = await relevant_search_async(session, HalfPkg, QUERY, k=5, min_score=0)
        hybrid = await hybrid_search_async(session, HalfPkg, QUERY, k=5)
        return [(m.obj.package, m.distance, m.score) for m in relevant], fused(hybrid)

    relevant, hybrid = on_async_session(database, search)
    with Session(engine) as session:
        expected = relevant_search(session, HalfPkg, QUERY, k=5, min_score=0)
        expected_hybrid = fused(hybrid_search(session, HalfPkg, QUERY, k=5))
    assert len(relevant) == len(hybrid) == 5
    assert_same(relevant, [(m.obj.package, m.distance, m.score) for m in expected])
    assert_same(hybrid, expected_hybrid)


def test_near_duplicates_async_gives_the_groups_of_the_sync_form(engine: Engine, database: str) -> None:
    async def groups(session: AsyncSession) -> list[list[str]]:
        found = await near_duplicates_async(session, Pkg, threshold=0.9, neighbours=20)
        assert all(isinstance(obj, Pkg) for group in found for obj in group)
        return [[obj.package for obj in group] for group in found]

    found = on_async_session(database, groups)
    with Session(engine) as session:
        expected = [
            [obj.package for obj in group] for group in near_duplicates(session, Pkg, threshold=0.9, neighbours=20)
        ]
    assert found and found == expected


def test_a_subclass_searches_its_own_rows(engine: Engine, database: str) -> None:
    async def search(session: AsyncSession) -> list[Any]:
        return [
            (m.obj, m.distance, m.score)
            for m in await relevant_search_async(session, KindedLibs, QUERY, k=5, min_score=0)
        ]

    found = on_async_session(database, search)
    assert len(found) == 5 and all(type(obj) is KindedLibs for obj, _, _ in found)
    with Session(engine) as session:
        expected = relevant_search(session, KindedLibs, QUERY, k=5, min_score=0)
    assert_same([(o.package, d, s) for o, d, s in found], [(m.obj.package, m.distance, m.score) for m in expected])


def test_pending_objects_are_flushed_first_and_the_query_is_encoded_off_the_event_loop(
    database: str, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    encode = async_quality.query_vector

    def recorded(model: str, query: str) -> Any:
        threads.append(threading.current_thread().name)
        return encode(model, query)

    monkeypatch.setattr(async_quality, "query_vector", recorded)

    async def search(session: AsyncSession) -> tuple[str, str, str]:
        session.add(Pkg(package="zz-xml", section="libs", synopsis="XML parsing library",
                        description="Parses XML documents: a library for parsing XML"))  # fmt: skip
        relevant = await relevant_search_async(session, Pkg, QUERY, k=3, min_score=0)
        hybrid = await hybrid_search_async(session, Pkg, QUERY, k=3)
        session.add(Pkg(package="zz-xml-2", section="libs", synopsis="XML parsing library",
                        description="Parses XML documents: a library for parsing XML"))  # fmt: skip
        groups = await near_duplicates_async(session, Pkg, threshold=0.99)
        pair = next(g for g in groups if "zz-xml" in {o.package for o in g})
        found = relevant[0].obj.package, hybrid[0].obj.package, ",".join(sorted(o.package for o in pair))
        await session.rollback()
        return found

    assert on_async_session(database, search) == ("zz-xml", "zz-xml", "zz-xml,zz-xml-2")
    assert threads and all(name.startswith("pgsim-encode") for name in threads)
    with Session(engine) as session:
        assert session.get(Pkg, "zz-xml") is None  # rolled back: the search ran in the session's transaction


def test_bad_input_is_a_clear_error_and_the_transaction_goes_on(engine: Engine, database: str) -> None:
    async def attempts(session: AsyncSession) -> list[Any]:
        with pytest.raises(InvalidInput, match="not an embedding attribute of Pkg"):
            await hybrid_search_async(session, Pkg, QUERY, embedding=Pkg.synopsis)
        with pytest.raises(InvalidInput, match="not an embedding attribute of Pkg"):
            await relevant_search_async(session, Pkg, QUERY, embedding="nope")
        with pytest.raises(InvalidInput, match="not an embedding attribute of Pkg"):
            await near_duplicates_async(session, Pkg, embedding="synopsis")
        with pytest.raises(InvalidInput, match="Expected a mapped class"):
            await relevant_search_async(session, str, QUERY)
        for k in (0, 10_001, True):
            with pytest.raises(InvalidInput, match="k must be a whole number"):
                await hybrid_search_async(session, Pkg, QUERY, k=k)
        with pytest.raises(InvalidInput, match="k must be a whole number"):
            await relevant_search_async(session, Pkg, QUERY, k=0)
        with pytest.raises(InvalidInput, match="reference must be a whole number above k"):
            await relevant_search_async(session, Pkg, QUERY, k=50)
        with pytest.raises(InvalidInput, match="candidates must be"):
            await hybrid_search_async(session, Pkg, QUERY, k=20, candidates=10)
        with pytest.raises(InvalidInput, match="min_score is a margin"):
            await relevant_search_async(session, Pkg, QUERY, min_score=3)
        with pytest.raises(InvalidInput, match="threshold is a cosine similarity"):
            await near_duplicates_async(session, Pkg, threshold=1.5)
        with pytest.raises(InvalidInput, match="neighbours must be"):
            await near_duplicates_async(session, Pkg, neighbours=0)
        with pytest.raises(InvalidInput, match="query text is empty"):
            await hybrid_search_async(session, Pkg, "  ")
        with pytest.raises(InvalidInput, match="SQLAlchemy criteria"):
            await relevant_search_async(session, Pkg, QUERY, where={"section": "libs"})
        with pytest.raises(InvalidInput, match="filter cannot be written as literal SQL"):
            await relevant_search_async(session, Pkg, QUERY, where=Pkg.embedding.similarity("xml") > 0.5)
        # refused by the SQL function: the savepoint keeps the session's transaction usable
        with pytest.raises(InvalidInput, match="no tsvector column"):
            await hybrid_search_async(session, Pkg, QUERY, text_column="synopsis")
        with pytest.raises(InvalidInput, match="nope"):
            await hybrid_search_async(session, Pkg, QUERY, text_config="nope")
        with pytest.raises(InvalidInput, match="AsyncSession"):
            await relevant_search_async(session.sync_session, Pkg, QUERY)  # type: ignore[arg-type]
        return await relevant_search_async(session, Pkg, QUERY, k=3, min_score=0)

    assert len(on_async_session(database, attempts)) == 3
    with pytest.raises(InvalidInput, match="synchronous connection"):  # the sync forms refuse an AsyncSession
        asyncio.run(_sync_form_refuses_async(database))


async def _sync_form_refuses_async(database: str) -> None:
    async_engine = create_async_engine(database_url(database))
    try:
        async with AsyncSession(async_engine) as session:
            await session.run_sync(lambda sync: relevant_search(sync, Pkg, QUERY))
    finally:
        await async_engine.dispose()


def test_pgsim_exports_the_async_forms() -> None:
    import pgsim.sqlalchemy as orm

    assert {"hybrid_search_async", "relevant_search_async", "near_duplicates_async"} <= set(orm.__all__)
    assert pgsim.sqlalchemy.hybrid_search_async is async_quality.hybrid_search_async
