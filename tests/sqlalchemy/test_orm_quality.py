"""Hybrid search, the relevance threshold and near-duplicates over mapped classes (pgsim.sqlalchemy): mapped
objects back, in the order and with the scores of pgsim's own searches on the same table, under SQLAlchemy
criteria (the ORM's own included). The real sample and model; the rows get the session's vectors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Computed, String, create_engine, insert, text
from sqlalchemy.dialects.postgresql import TSVECTOR
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import pgsim
from pgsim.demo.corpus import Package
from pgsim.errors import InvalidInput
from pgsim.sqlalchemy import (
    Embedding,
    FusedMatch,
    RelevantMatch,
    database_url,
    embedding_column,
    hybrid_search,
    near_duplicates,
    relevant_search,
)

TABLE = "orm_quality_packages"
FTS = "to_tsvector('english', coalesce(synopsis, '') || ' ' || coalesce(description, ''))"
QUERY = "library for parsing XML documents"


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


class KindBase(DeclarativeBase):
    pass


class Kinded(KindBase):
    """The same table, with single-table inheritance on its section (for the criteria the ORM adds)."""

    __tablename__ = TABLE
    package: Mapped[str] = mapped_column(String, primary_key=True)
    section: Mapped[str]
    embedding = mapped_column(Embedding(384, "all-MiniLM-L6-v2"))
    __mapper_args__ = {"polymorphic_on": "section", "polymorphic_identity": "any"}


class KindedLibs(Kinded):
    __mapper_args__ = {"polymorphic_identity": "libs"}


@pytest.fixture(scope="module")
def engine(database: str, packages: list[Package], package_vectors: Any) -> Iterator[Engine]:
    created = create_engine(database_url(database))
    Base.metadata.drop_all(created)
    Base.metadata.create_all(created)  # registers the column, with the default HNSW index
    rows = [
        {"package": p.package, "section": p.section, "synopsis": p.synopsis, "description": p.description or None,
         "embedding": vector}
        for p, vector in zip(packages, package_vectors, strict=True)
    ]  # fmt: skip
    with Session(created) as session:
        session.execute(insert(Pkg), rows)
        session.commit()
        session.execute(text(f"ANALYZE {TABLE}"))
        session.commit()
    yield created
    created.dispose()


@pytest.fixture
def conn(database: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database, autocommit=True) as connection:
        yield connection


def keys(matches: list[Any]) -> list[str]:
    return [match.obj.package for match in matches]


def rows(hits: list[Any]) -> list[str]:
    return [hit.row["package"] for hit in hits]


@pytest.mark.parametrize("sections", [None, ["libs", "devel", "text"]])
def test_hybrid_search_returns_the_objects_pgsim_finds_with_their_scores(
    engine: Engine, conn: Any, sections: list[str] | None
) -> None:
    with Session(engine) as session:
        found = hybrid_search(session, Pkg, QUERY, k=8, where=None if sections is None else Pkg.section.in_(sections))
        assert found and all(isinstance(match, FusedMatch) and isinstance(match.obj, Pkg) for match in found)
        assert all(match.obj in session for match in found)  # loaded into the session, one SELECT
    expected = pgsim.hybrid_search(conn, TABLE, "embedding", QUERY, k=8,
                                   where=None if sections is None else {"section": sections})  # fmt: skip
    assert keys(found) == rows(expected) and len(found) == 8
    for match, hit in zip(found, expected, strict=True):
        assert (match.score, match.vector_rank, match.text_rank) == (hit.score, hit.vector_rank, hit.text_rank)
        assert match.distance == pytest.approx(hit.distance) and match.relevance == pytest.approx(hit.relevance)
        assert sections is None or match.obj.section in sections


def test_hybrid_search_cuts_by_relevance_and_names_its_text_column(engine: Engine, conn: Any) -> None:
    with Session(engine) as session:
        everything = hybrid_search(session, Pkg, QUERY, k=20, candidates=20, text_column=Pkg.fts)
        cut = sorted(match.relevance for match in everything if match.relevance is not None)[len(everything) // 2]
        kept = hybrid_search(session, Pkg, QUERY, k=20, candidates=20, text_column="fts", min_score=cut)
        assert 0 < len(kept) < len(everything) and all(match.relevance >= cut for match in kept)  # type: ignore[operator]
    assert keys(kept) == rows(pgsim.hybrid_search(conn, TABLE, "embedding", QUERY, k=20, candidates=20, min_score=cut))


def test_relevant_search_returns_the_objects_that_stand_out_or_none(engine: Engine, conn: Any) -> None:
    with Session(engine) as session:
        found = relevant_search(session, Pkg, QUERY, k=5, min_score=0.05)
        assert found and all(isinstance(match, RelevantMatch) and isinstance(match.obj, Pkg) for match in found)
        assert relevant_search(session, Pkg, "a recipe for lemon cake with icing") == []
    expected = pgsim.relevant_search(conn, TABLE, "embedding", QUERY, k=5, min_score=0.05)
    assert [(m.obj.package, m.score, m.distance) for m in found] == [(h.row["package"], h.score, h.distance)
                                                                       for h in expected]  # fmt: skip


def test_criteria_are_compiled_with_their_literals_and_keep_k_rows(engine: Engine, conn: Any) -> None:
    """A LIKE pattern's % survives into the statement pgsim runs with parameters; a filter that keeps a few
    rows still gives k objects."""
    criteria = [Pkg.section.in_(["libs", "devel", "utils", "text"]), Pkg.synopsis.like("%librar%")]
    with Session(engine) as session:
        found = relevant_search(session, Pkg, QUERY, k=5, min_score=0, where=criteria)
        fused = hybrid_search(session, Pkg, QUERY, k=5, where=criteria)
    passing = conn.execute(
        f"SELECT count(*) FROM {TABLE} WHERE section IN ('libs', 'devel', 'utils', 'text') AND synopsis LIKE '%librar%'"  # noqa: S608
    ).fetchone()
    assert passing is not None and passing[0] >= 5
    assert len(found) == len(fused) == 5
    assert all("librar" in match.obj.synopsis for match in [*found, *fused])
    where = sql.SQL("section IN ('libs', 'devel', 'utils', 'text') AND synopsis LIKE '%%librar%%'")
    assert keys(found) == rows(pgsim.relevant_search(conn, TABLE, "embedding", QUERY, k=5, min_score=0, where=where))


def test_a_subclass_searches_its_own_rows_and_pending_objects_are_found(engine: Engine, conn: Any) -> None:
    with Session(engine) as session:
        libs = relevant_search(session, KindedLibs, QUERY, k=5, min_score=0)
        assert len(libs) == 5 and all(type(match.obj) is KindedLibs for match in libs)
        expected = pgsim.relevant_search(conn, TABLE, "embedding", QUERY, k=5, min_score=0, where={"section": "libs"})
        assert keys(libs) == rows(expected)
    with Session(engine) as session:
        session.add(Pkg(package="zz-xml", section="libs", synopsis="XML parsing library",
                        description="Parses XML documents: a library for parsing XML"))  # fmt: skip
        found = relevant_search(session, Pkg, QUERY, k=3, min_score=0)  # flushed (and encoded) first
        assert found[0].obj.package == "zz-xml"
        session.rollback()


def test_near_duplicates_are_groups_of_objects(engine: Engine, conn: Any) -> None:
    with Session(engine) as session:
        groups = near_duplicates(session, Pkg, threshold=0.9, neighbours=20)
        assert groups and all(isinstance(obj, Pkg) for group in groups for obj in group)
    expected = pgsim.near_duplicates(conn, TABLE, "embedding", threshold=0.9, neighbours=20, columns=["package"])
    assert [[obj.package for obj in group] for group in groups] == [[row["package"] for row in g] for g in expected]


def test_what_cannot_be_searched_is_refused_clearly(engine: Engine, database: str) -> None:
    with Session(engine) as session:
        with pytest.raises(InvalidInput, match="not an embedding attribute of Pkg"):
            hybrid_search(session, Pkg, QUERY, embedding=Pkg.synopsis)
        with pytest.raises(InvalidInput, match="Expected a mapped class"):
            relevant_search(session, str, QUERY)
        with pytest.raises(InvalidInput, match="SQLAlchemy criteria"):
            relevant_search(session, Pkg, QUERY, where={"section": "libs"})
        with pytest.raises(InvalidInput, match="filter cannot be written as literal SQL"):
            relevant_search(session, Pkg, QUERY, where=Pkg.embedding.similarity("xml") > 0.5)

    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async def attempt() -> None:
        async_engine = create_async_engine(database_url(database))
        try:
            async with AsyncSession(async_engine) as session:
                with pytest.raises(InvalidInput, match="synchronous connection"):
                    await session.run_sync(lambda sync: relevant_search(sync, Pkg, QUERY))
        finally:
            await async_engine.dispose()

    asyncio.run(attempt())
