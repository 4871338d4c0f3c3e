"""pgsim's quality functions given a SQLAlchemy Session, its Connection or its pooled connection instead of a
psycopg connection: the same answers, in the session's own transaction. The real sample and model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from pgsim.demo.corpus import Package
from pgsim.errors import InvalidInput
from pgsim.psycopg import register
from pgsim.quality.diversity import diverse_search
from pgsim.quality.duplicates import near_duplicates
from pgsim.quality.hybrid import hybrid_search
from pgsim.quality.labels import label_rows
from pgsim.quality.relevance import relevant_search
from pgsim.sqlalchemy import database_url

pytestmark = pytest.mark.usefixtures("db")
FORMS = ["session", "connection", "pooled"]


@pytest.fixture(scope="module")
def engine(db: str) -> Iterator[Engine]:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE packages ADD COLUMN IF NOT EXISTS fts tsvector GENERATED ALWAYS AS "
            "(to_tsvector('english', coalesce(synopsis, '') || ' ' || coalesce(description, ''))) STORED"
        )
    created = create_engine(database_url(db))
    yield created
    created.dispose()


@pytest.fixture
def conn(db: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db, autocommit=True) as connection:
        register(connection)
        yield connection


def given(session: Session, form: str) -> Any:
    """What a user holding ``session`` might pass."""
    if form == "session":
        return session
    if form == "connection":
        return session.connection()
    return session.connection().connection  # the pool's proxy of the psycopg connection


def names(hits: Any) -> list[str]:
    return [hit.row["package"] for hit in hits]


@pytest.mark.parametrize("form", FORMS)
def test_every_search_answers_through_a_session_as_through_psycopg(engine: Engine, conn: Any, form: str) -> None:
    query, libs = "parse XML documents", {"section": ["libs", "devel", "text"]}
    with Session(engine) as session:
        assert names(hybrid_search(given(session, form), "packages", "embedding", query, k=5, where=libs)) == names(
            hybrid_search(conn, "packages", "embedding", query, k=5, where=libs)
        )
        relevant = relevant_search(given(session, form), "packages", "embedding", query, min_score=0.05)
        assert names(relevant) == names(relevant_search(conn, "packages", "embedding", query, min_score=0.05))
        assert relevant
        diverse = diverse_search(given(session, form), "packages", "embedding", query, k=5, lambda_mult=0.5)
        assert names(diverse) == names(diverse_search(conn, "packages", "embedding", query, k=5, lambda_mult=0.5))
        groups = near_duplicates(given(session, form), "packages", "embedding", threshold=0.9, columns=["package"])
        assert groups == near_duplicates(conn, "packages", "embedding", threshold=0.9, columns=["package"])
        assert groups


def test_a_session_searches_its_own_uncommitted_rows_and_writes_in_its_transaction(
    engine: Engine, conn: Any, packages: list[Package]
) -> None:
    original = packages[3].package
    with Session(engine) as session:
        session.execute(
            text(
                "INSERT INTO packages (package, section, synopsis, description, embedding) "
                "SELECT 'zz-copy', section, synopsis, description, embedding FROM packages WHERE package = :p"
            ),
            {"p": original},
        )
        groups = near_duplicates(session, "packages", "embedding", threshold=0.999, columns=["package"])
        assert sorted(row["package"] for row in groups[0]) == sorted([original, "zz-copy"])
        elsewhere = near_duplicates(conn, "packages", "embedding", threshold=0.999, columns=["package"])
        assert "zz-copy" not in [row["package"] for group in elsewhere for row in group]  # not committed

        session.execute(text("ALTER TABLE packages ADD COLUMN guess_s text"))
        counted = label_rows(session, "packages", "embedding", {"x": "a library", "y": "a game"}, into="guess_s")
        assert sum(counted.values()) == len(packages) + 1
        session.rollback()
    assert conn.execute("SELECT count(*) FROM packages WHERE package = 'zz-copy'").fetchone() == (0,)
    assert conn.execute("SELECT to_regclass('packages') IS NOT NULL").fetchone() == (True,)
    columns = conn.execute(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'packages'::regclass AND attname = 'guess_s'"
    )
    assert columns.fetchone() == (0,)  # the labels went with the session's transaction


def test_an_async_session_or_another_object_is_refused_with_what_to_pass(db: str) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async def attempt() -> None:
        async_engine = create_async_engine(database_url(db))
        try:
            async with AsyncSession(async_engine) as session:
                with pytest.raises(InvalidInput, match="synchronous connection"):
                    near_duplicates(session, "packages", "embedding")
                with pytest.raises(InvalidInput, match="synchronous connection"):
                    await session.run_sync(lambda sync: near_duplicates(sync, "packages", "embedding"))
        finally:
            await async_engine.dispose()

    asyncio.run(attempt())
    with pytest.raises(InvalidInput, match="Expected a psycopg.Connection, or a SQLAlchemy Session"):
        relevant_search("postgresql://", "packages", "embedding", "json")  # type: ignore[arg-type]
