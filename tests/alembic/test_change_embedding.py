"""Issue 22, findings 1 and 2: a registered column whose source, model or dtype the models change becomes
``op.change_embedding``, before the ``op.drop_column`` of a column only the old source read; the upgrade
runs, the worker (pgsim.sync) fills the new column and switches over, and the downgrade goes back (a change
the workers have not finished is cancelled instead). Autogenerate between the upgrade and the switch renders
nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from alembic import command
from alembic.script import ScriptDirectory
from fixtures.alembic_project import (
    app_project,
    downgrade_of,
    generate,
    nothing_to_generate,
    upgrade_of,
    write_models,
)
from fixtures.database import scratch_database

import pgsim
from pgsim.encoding.encoder import Encoder

HEADER = """
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from pgsim.sqlalchemy import embedding_column


class Base(DeclarativeBase):
    pass
"""
BEFORE = """
class Ticket(Base):
    __tablename__ = "tickets"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    body: Mapped[str]
    legacy: Mapped[str | None]
    embedding = embedding_column(source=["title", "body", "legacy"])
"""
AFTER = """
class Ticket(Base):
    __tablename__ = "tickets"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    component: Mapped[str | None]
    body: Mapped[str]
    embedding = embedding_column(source=["title", "component", "body"])
"""
MODULE = "ce_models"
ROWS = [(i, f"Crash number {i}", f"The app crashes when I press button {i}", f"old tracker id {i}") for i in range(6)]
NEW_TEXT = "concat_ws(E'\\n\\n', title, component, body)"
OLD_TEXT = "concat_ws(E'\\n\\n', title, body, legacy)"


def query(dsn: str, statement: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(statement, params).fetchall()  # type: ignore[arg-type]


def registry(dsn: str) -> list[tuple[Any, ...]]:
    return query(
        dsn,
        "SELECT column_name, source_columns, model, dtype, replaces IS NOT NULL FROM pgsim.embedding "
        "ORDER BY column_name",
    )


def columns(dsn: str) -> list[str]:
    rows = query(dsn, "SELECT attname FROM pg_attribute WHERE attrelid = 'tickets'::regclass AND attnum > 0 "
                      "AND NOT attisdropped ORDER BY attnum")  # fmt: skip
    return [name for (name,) in rows]


def drain(dsn: str) -> pgsim.SyncReport:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return pgsim.sync(conn)


def assert_embeds(dsn: str, encoder: Encoder, expression: str) -> None:
    """Every row's vector is the encoding of ``expression`` over the row as it is now."""
    with psycopg.connect(dsn) as conn:
        pgsim.register(conn)
        rows = conn.execute(f"SELECT {expression}, embedding FROM tickets ORDER BY id").fetchall()  # noqa: S608
    encoded = encoder.encode([text for text, _ in rows])
    pairs = zip(rows, encoded, strict=True)
    worst = max(float(np.abs(np.asarray(stored, dtype=np.float32) - v).max()) for (_, stored), v in pairs)
    assert worst < 1e-5


def test_a_changed_source_and_a_dropped_column_upgrade_fill_switch_and_downgrade(
    server_dsn: str, tmp_path: Path, encoder: Encoder
) -> None:
    with scratch_database(server_dsn, "alembic_change_source") as dsn:
        config = app_project(tmp_path, dsn, HEADER + BEFORE, module=MODULE)
        generate(config, "tickets")
        command.upgrade(config, "head")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.cursor().executemany("INSERT INTO tickets VALUES (%s, %s, %s, %s)", ROWS)
        assert drain(dsn).embedded == len(ROWS)
        assert_embeds(dsn, encoder, OLD_TEXT)

        write_models(tmp_path, MODULE, HEADER + AFTER)
        revision = generate(config, "component")
        upgrade, downgrade = upgrade_of(revision), downgrade_of(revision)
        change = (
            "op.change_embedding('tickets', 'embedding', source=['title', 'component', 'body'], "
            "model='all-MiniLM-L6-v2', dtype='vector')"
        )
        back = (
            "op.change_embedding('tickets', 'embedding', source=['title', 'body', 'legacy'], "
            "model='all-MiniLM-L6-v2', dtype='vector')"
        )
        # the change reads the added column and comes before the drop of the column only the old source read
        assert upgrade.index("op.add_column('tickets'") < upgrade.index(change)
        pass
        assert "into embedding_next; searches use embedding until pgsim's worker" in upgrade
        assert downgrade.index("op.add_column('tickets', sa.Column('legacy'") < downgrade.index(back)
        assert downgrade.index(back) < downgrade.index("op.drop_column('tickets', 'component')")
        assert "every row of tickets is embedded again" in downgrade
        assert "alter_column" not in revision and "uninstall" not in revision

        command.upgrade(config, "head")  # finding 2: no DependentObjectsStillExist from the old triggers
        assert columns(dsn) == ["id", "title", "body", "embedding", "component", "embedding_next"]
        assert registry(dsn) == [
            ("embedding", ["title", "body", "legacy"], "all-MiniLM-L6-v2", "vector", False),  # searched, frozen
            ("embedding_next", ["title", "body", "component"], "all-MiniLM-L6-v2", "vector", True),  # table order
        ]
        assert "op." not in nothing_to_generate(config)  # the change under way is the models' definition
        with psycopg.connect(dsn, autocommit=True) as conn:  # written meanwhile: embedded by the new source
            conn.execute("UPDATE tickets SET component = 'ui' WHERE id = 1")
            conn.execute("INSERT INTO tickets (id, title, body, component) VALUES (9, 'Slow', 'Takes ages', 'sync')")

        report = drain(dsn)
        assert report.switched == 1 and report.embedded == len(ROWS) + 1
        assert registry(dsn) == [("embedding", ["title", "body", "component"], "all-MiniLM-L6-v2", "vector", False)]
        assert columns(dsn) == ["id", "title", "body", "component", "embedding"]
        assert_embeds(dsn, encoder, NEW_TEXT)
        assert "op." not in nothing_to_generate(config)

        command.downgrade(config, "-1")  # after the switch: back to the old source, embedded again
        assert registry(dsn)[1] == ("embedding_next", ["title", "body", "legacy"], "all-MiniLM-L6-v2", "vector", True)
        assert "component" not in columns(dsn)
        assert drain(dsn).switched == 1
        assert registry(dsn) == [("embedding", ["title", "body", "legacy"], "all-MiniLM-L6-v2", "vector", False)]
        assert_embeds(dsn, encoder, OLD_TEXT)  # legacy came back empty: the rows' texts are title and body now

        command.upgrade(config, "head")  # and a downgrade before the workers switch cancels the change
        command.downgrade(config, "-1")
        assert registry(dsn) == [("embedding", ["title", "body", "legacy"], "all-MiniLM-L6-v2", "vector", False)]
        assert "embedding_next" not in columns(dsn)
        triggers = query(dsn, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'tickets'::regclass "
                              "AND tgname LIKE 'pgsim%'")  # fmt: skip
        assert triggers == [(2,)]  # the old column is kept in sync again
        drain(dsn)
        assert_embeds(dsn, encoder, OLD_TEXT)


DTYPE = """
class Ticket(Base):
    __tablename__ = "tickets"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]
    embedding = embedding_column(source="body"{options})
"""


def index_definition(dsn: str) -> str:
    (row,) = query(dsn, "SELECT indexdef FROM pg_indexes WHERE indexname = 'tickets_embedding_hnsw'")
    return str(row[0])


@pytest.mark.parametrize("change", ["dtype", "model"])
def test_a_changed_dtype_or_model_is_a_change_too(
    server_dsn: str, tmp_path: Path, change: str, small_model: str
) -> None:
    """dtype halfvec, or a model of 128 dimensions: Alembic's ALTER COLUMN TYPE gives way to change_embedding,
    whose switch-over changes the type; its index is built for the new column."""
    options = ', dtype="halfvec"' if change == "dtype" else f", model={small_model!r}, index=HNSW(m=8)"
    wanted = ("halfvec(384)", "halfvec_cosine_ops", "m='16'") if change == "dtype" else ("vector(128)",
              "vector_cosine_ops", "m='8'")  # fmt: skip
    header = HEADER + "from pgsim.db.hnsw import HNSW\n"
    with scratch_database(server_dsn, f"alembic_change_{change}") as dsn:
        config = app_project(tmp_path, dsn, header + DTYPE.format(options=""), module=MODULE)
        generate(config, "tickets")
        command.upgrade(config, "head")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.cursor().executemany("INSERT INTO tickets VALUES (%s, %s)", [(i, t) for i, _, t, _ in ROWS])
        drain(dsn)

        write_models(tmp_path, MODULE, header + DTYPE.format(options=options))
        revision = generate(config, change)
        model = f"model={small_model!r}, dtype='vector', m=8, ef_construction=64)"
        rendered = "model='all-MiniLM-L6-v2', dtype='halfvec')" if change == "dtype" else model
        assert "op.change_embedding('tickets', 'embedding', source=['body'], " in upgrade_of(revision)
        assert rendered in upgrade_of(revision)
        assert "alter_column" not in revision and "drop_embedding(" not in revision and "hnsw_index(" not in revision
        command.upgrade(config, "head")
        assert "op." not in nothing_to_generate(config)  # the type differs until the switch: that is the change's
        assert drain(dsn).switched == 1
        (column_type,) = query(dsn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                                    "WHERE attrelid = 'tickets'::regclass AND attname = 'embedding'")[0]  # fmt: skip
        assert column_type == wanted[0]
        assert wanted[1] in index_definition(dsn) and wanted[2] in index_definition(dsn)
        assert "op." not in nothing_to_generate(config)

        command.downgrade(config, "-1")
        assert drain(dsn).switched == 1
        assert query(dsn, "SELECT model, dtype, dimension, index_m FROM pgsim.embedding") == [
            ("all-MiniLM-L6-v2", "vector", 384, 16)
        ]
        assert "vector_cosine_ops" in index_definition(dsn) and "m='16'" in index_definition(dsn)


def database_state(dsn: str) -> dict[str, Any]:
    """What an upgrade leaves: registrations, their triggers and queue, the table's columns and their grants."""
    return {
        "registry": query(
            dsn,
            "SELECT column_name, source, source_columns, key_columns, model, model_revision, dimension, dtype, "
            "index_name, index_m, index_ef_construction, created_column, replaces IS NOT NULL, stale "
            "FROM pgsim.embedding ORDER BY column_name",
        ),
        "triggers": query(
            dsn,
            "SELECT e.column_name, count(t.tgname) FROM pgsim.embedding e LEFT JOIN pg_trigger t "
            "ON t.tgrelid = e.table_oid AND t.tgname LIKE 'pgsim\\_' || e.id || '\\_%' GROUP BY 1 ORDER BY 1",
        ),
        "queued": query(dsn, "SELECT e.column_name, count(*) FROM pgsim.queue q JOIN pgsim.embedding e "
                             "ON e.id = q.embedding_id GROUP BY 1 ORDER BY 1"),  # fmt: skip
        "columns": query(dsn, "SELECT attname, format_type(atttypid, atttypmod), attacl::text[] FROM pg_attribute "
                              "WHERE attrelid = 'tickets'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY 1"),
    }  # fmt: skip


def seed(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.cursor().executemany("INSERT INTO tickets VALUES (%s, %s, %s, %s)", ROWS)
        conn.execute("GRANT SELECT (embedding) ON tickets TO PUBLIC")  # the new column takes it


def test_the_offline_script_does_what_the_online_upgrade_does(
    server_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``alembic upgrade --sql``: change_embedding is a DO block that decides when it runs, as the online
    operation decides: the change (and the drop after it), and, downgraded before a switch, its cancellation."""
    with (
        scratch_database(server_dsn, "alembic_change_online") as online,
        scratch_database(server_dsn, "alembic_change_offline") as offline,
    ):
        config = app_project(tmp_path, online, HEADER + BEFORE, module=MODULE)
        generate(config, "tickets")
        command.upgrade(config, "head")
        seed(online)
        write_models(tmp_path, MODULE, HEADER + AFTER)
        generate(config, "component")
        first, second = [script.revision for script in ScriptDirectory.from_config(config).walk_revisions()][::-1]

        def run_offline(revisions: str, downgrade: bool = False) -> str:
            capsys.readouterr()
            (command.downgrade if downgrade else command.upgrade)(config, revisions, sql=True)
            script = capsys.readouterr().out
            with psycopg.connect(offline, autocommit=True) as conn:
                conn.execute(script.encode())
            return script

        run_offline(f"base:{first}")
        seed(offline)
        script = run_offline(f"{first}:{second}")
        assert script.index("PERFORM pgsim.freeze_embedding(") < script.index("ALTER TABLE tickets DROP COLUMN legacy")
        command.upgrade(config, "head")
        assert database_state(offline) == database_state(online)
        assert [row[0] for row in database_state(online)["registry"]] == ["embedding", "embedding_next"]

        run_offline(f"{second}:{first}", downgrade=True)  # before any switch: the change is cancelled
        command.downgrade(config, first)
        assert database_state(offline) == database_state(online)
        assert [row[0] for row in database_state(online)["registry"]] == ["embedding"]
