"""Issue 21: Alembic autogenerate of chunked columns. A new ``embedding_column(..., chunks=pgsim.Chunks(...))``
renders ``op.create_embedding(..., chunks=pgsim.Chunks(...))`` (with its import), the upgrade registers it
chunked, and autogenerate then finds nothing (the chunk table is pgsim's, never dropped); another overlap
renders a change that the worker fills and switches over, and the downgrade changes back; chunks dropped
from the models render ``op.remove_chunks``. Offline (``--sql``) a chunked creation is refused, and a drop takes
the chunk table with it. Real server and model; two short rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from fixtures.alembic_project import app_project, downgrade_of, generate, nothing_to_generate, upgrade_of, write_models
from fixtures.database import scratch_database

import pgsim
from pgsim.errors import InvalidInput

MODELS = """
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
import pgsim
from pgsim.sqlalchemy import embedding_column


class Base(DeclarativeBase):
    pass


class Doc(Base):
    __tablename__ = "docs"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str | None]
    embedding = embedding_column(source="body", sync="worker"{chunks}{dtype})
"""
MODULE = "chunk_alembic_models"
ROWS = [(1, "Simmer tomatoes with garlic and basil for an hour."), (2, "Patch the inner tube to fix a flat tyre.")]


def models(chunks: str, dtype: str = "vector") -> str:
    return MODELS.format(chunks=f", chunks={chunks}" if chunks else "", dtype=f", dtype={dtype!r}")


def chunking(dsn: str) -> list[tuple[Any, ...]]:
    """(column, tokens, overlap, is a change under way) of every chunked registration of docs."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT e.column_name, k.tokens, k.overlap, e.replaces IS NOT NULL FROM pgsim.chunking k "
            "JOIN pgsim.embedding e ON e.id = k.embedding_id WHERE e.table_name = 'docs' ORDER BY e.id"
        ).fetchall()


def drain(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgsim.sync(conn, allow_superuser=True)


def test_a_chunked_column_autogenerates_round_trips_changes_and_goes_back(
    server_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with scratch_database(server_dsn, "alembic_chunks") as dsn:
        config = app_project(tmp_path, dsn, models("pgsim.Chunks(16, 4)"), module=MODULE)
        first = generate(config, "docs")
        created = "op.create_embedding('docs', 'embedding', source=['body']"
        assert created in upgrade_of(first) and "chunks=pgsim.Chunks(16, 4))" in upgrade_of(first)
        assert "\nimport pgsim\n" in first  # the rendered Chunks resolves
        assert "chunks=pgsim.Chunks(16, 4)" in downgrade_of(first)  # drop_embedding knows what to make again

        with pytest.raises(InvalidInput, match="cannot be rendered as SQL"):
            command.upgrade(config, "head", sql=True)  # offline: refused, no wrong SQL
        command.upgrade(config, "head")
        assert chunking(dsn) == [("embedding", 16, 4, False)]
        assert "op." not in nothing_to_generate(config)  # the round trip; the chunk table is left alone

        capsys.readouterr()
        command.downgrade(config, "head:base", sql=True)  # offline, the drop takes the chunk table with it
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(capsys.readouterr().out.encode())
            assert conn.execute("SELECT to_regclass('docs__embedding_chunks')").fetchone() == (None,)
        assert chunking(dsn) == []
        command.upgrade(config, "head")
        assert chunking(dsn) == [("embedding", 16, 4, False)]
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.cursor().executemany("INSERT INTO docs VALUES (%s, %s)", ROWS)
        drain(dsn)

        write_models(tmp_path, MODULE, models("pgsim.Chunks(16, 8)"))
        second = generate(config, "overlap")
        assert "chunks=pgsim.Chunks(16, 8))" in upgrade_of(second) and "op.change_embedding('docs'" in upgrade_of(
            second
        )
        assert "chunks=pgsim.Chunks(16, 4))" in downgrade_of(second)
        command.upgrade(config, "head")
        assert chunking(dsn) == [("embedding", 16, 4, False), ("embedding_next", 16, 8, True)]
        assert "op." not in nothing_to_generate(config)  # the change under way is the models' definition
        drain(dsn)  # fills the new chunks and switches over
        assert chunking(dsn) == [("embedding", 16, 8, False)]
        assert "op." not in nothing_to_generate(config)

        write_models(tmp_path, MODULE, models(""))
        third = generate(config, "unchunked")
        assert "op.remove_chunks('docs', 'embedding', tokens=16, overlap=8)" in upgrade_of(third)
        assert "chunks=pgsim.Chunks(16, 8))" in downgrade_of(third)
        command.upgrade(config, "head")
        assert chunking(dsn) == []
        assert "op." not in nothing_to_generate(config)

        command.downgrade(config, "-1")  # chunked again, by a change the worker fills
        drain(dsn)
        assert chunking(dsn) == [("embedding", 16, 8, False)]
        command.downgrade(config, "-1")  # back to the first overlap
        drain(dsn)
        assert chunking(dsn) == [("embedding", 16, 4, False)]
        with psycopg.connect(dsn) as conn:
            chunks = conn.execute("SELECT count(DISTINCT id) FROM docs__embedding_chunks").fetchone()
        assert chunks == (len(ROWS),)
        command.downgrade(config, "base")
        assert chunking(dsn) == []


def test_chunks_added_to_a_column_render_a_change_whose_downgrade_drops_them(server_dsn: str, tmp_path: Path) -> None:
    with scratch_database(server_dsn, "alembic_chunks_added") as dsn:
        config = app_project(tmp_path, dsn, models(""), module=MODULE)
        assert "chunks=" not in generate(config, "docs")
        command.upgrade(config, "head")
        write_models(tmp_path, MODULE, models("pgsim.Chunks(16)"))
        added = generate(config, "chunked")
        assert "op.change_embedding('docs', 'embedding'" in upgrade_of(added)
        assert "chunks=pgsim.Chunks(16, 0))" in upgrade_of(added) and "chunks=False)" in downgrade_of(added)
        command.upgrade(config, "head")
        drain(dsn)  # no rows: the switch at once
        assert chunking(dsn) == [("embedding", 16, 0, False)]
        assert "op." not in nothing_to_generate(config)
        command.downgrade(config, "-1")  # the chunks go, the vectors stay: nothing to re-embed
        assert chunking(dsn) == []
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*) FROM pgsim.embedding WHERE table_name = 'docs'").fetchone() == (1,)


def test_a_change_that_also_drops_the_chunks_switches_to_an_unchunked_column_and_back(
    server_dsn: str, tmp_path: Path
) -> None:
    with scratch_database(server_dsn, "alembic_chunks_dtype") as dsn:
        config = app_project(tmp_path, dsn, models("pgsim.Chunks(16, 4)"), module=MODULE)
        generate(config, "docs")
        command.upgrade(config, "head")
        write_models(tmp_path, MODULE, models("", dtype="halfvec"))
        changed = generate(config, "halfvec")
        assert "dtype='halfvec', chunks=False)" in upgrade_of(changed)
        assert "dtype='vector', chunks=pgsim.Chunks(16, 4))" in downgrade_of(changed)
        command.upgrade(config, "head")
        assert chunking(dsn) == [("embedding", 16, 4, False)]  # the change under way has no chunks
        assert "op." not in nothing_to_generate(config)
        drain(dsn)  # no rows: the switch at once
        assert chunking(dsn) == []
        with psycopg.connect(dsn) as conn:
            registered = conn.execute("SELECT column_name, dtype FROM pgsim.embedding WHERE table_name = 'docs'")
            assert registered.fetchall() == [("embedding", "halfvec")]
        command.downgrade(config, "-1")
        drain(dsn)
        assert chunking(dsn) == [("embedding", 16, 4, False)]
