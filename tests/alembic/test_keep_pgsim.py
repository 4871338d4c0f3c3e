"""Issue 22, finding 3: pgsim's schema serves every application of a database, so no downgrade removes it
while an embedding column is registered: a generated downgrade never renders ``op.uninstall_pgsim()``, the
operation itself (hand-written) and pgsim's own branch (``pgsim@pgsim_0001``, ``pgsim@base``) leave pgsim
and the other registrations as they are, with a warning, online and in ``--sql`` scripts alike; with no
registration left they remove it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from fixtures.alembic_project import alembic_config, app_project, downgrade_of, generate
from fixtures.database import scratch_database

import pgsim

MODELS = """
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from pgsim.sqlalchemy import embedding_column


class Base(DeclarativeBase):
    pass


class Memo(Base):
    __tablename__ = "memos"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]
    embedding = embedding_column(source="body")
"""


def other_application(dsn: str) -> None:
    """Another application's table and registered column, made without Alembic."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pgsim.install(conn)
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        pgsim.add_embedding(conn, "notes", "embedding", source="body")
        conn.execute("INSERT INTO notes VALUES (1, 'kept in sync')")


def state(dsn: str) -> dict[str, Any]:
    """What another application relies on: pgsim's schema, functions, registrations and their triggers."""
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regnamespace('pgsim')").fetchone() == (None,):
            return {}
        return {
            "registered": conn.execute("SELECT table_name, column_name FROM pgsim.embedding ORDER BY 1").fetchall(),
            "functions": conn.execute(
                "SELECT count(*) > 0 FROM pg_proc WHERE pronamespace = 'pgsim'::regnamespace"
            ).fetchone(),
            "triggers": conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgsim%'").fetchone(),
            "queued": conn.execute("SELECT count(*) FROM pgsim.queue").fetchone(),
        }


OTHER = {"registered": [("notes", "embedding")], "functions": (True,), "triggers": (2,), "queued": (1,)}


def test_a_generated_downgrade_leaves_pgsim_and_the_other_applications(server_dsn: str, tmp_path: Path) -> None:
    with scratch_database(server_dsn, "alembic_keep_generated") as dsn:
        config = app_project(tmp_path, dsn, MODELS, module="keep_models")
        revision = generate(config, "memos")
        assert "op.install_pgsim()" in revision
        assert "uninstall_pgsim" not in downgrade_of(revision)
        assert "op.drop_embedding('memos', 'embedding'" in downgrade_of(revision)
        command.upgrade(config, "head")
        other_application(dsn)
        command.downgrade(config, "base")
        assert state(dsn) == OTHER


UNINSTALL = '''
"""app: memos, and a hand-written uninstall in the downgrade"""
import pgsim.alembic
from alembic import op

revision = "app_0001"
down_revision = None
branch_labels = ("app",)
depends_on = None


def upgrade():
    op.install_pgsim()
    op.execute("CREATE TABLE memos (id int PRIMARY KEY, body text)")
    op.create_embedding("memos", "embedding", source="body")


def downgrade():
    op.drop_embedding("memos", "embedding")
    op.execute("DROP TABLE memos")
    op.uninstall_pgsim()
'''


def app_revision(tmp_path: Path, dsn: str) -> Any:
    config = alembic_config(tmp_path / "alembic", dsn, pgsim_branch=False)
    (tmp_path / "alembic" / "versions" / "app_0001.py").write_text(UNINSTALL)
    return config


def test_uninstall_pgsim_keeps_pgsim_while_a_column_is_registered(
    server_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with scratch_database(server_dsn, "alembic_keep_uninstall") as dsn:
        config = app_revision(tmp_path, dsn)
        command.upgrade(config, "head")
        other_application(dsn)
        with caplog.at_level(logging.WARNING, logger="pgsim.alembic"):
            command.downgrade(config, "base")
        assert state(dsn) == OTHER
        assert "uninstall_pgsim skipped: pgsim stays, embedding columns are registered: notes.embedding" in caplog.text

        with psycopg.connect(dsn, autocommit=True) as conn:  # the last registration goes: uninstall removes pgsim
            pgsim.remove_embedding(conn, "notes", "embedding")
        command.upgrade(config, "head")
        command.downgrade(config, "base")  # drop_embedding and the uninstall in one transaction
        assert state(dsn) == {}


def test_uninstall_pgsim_offline_checks_when_the_script_runs(
    server_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with scratch_database(server_dsn, "alembic_keep_offline") as dsn:
        config = app_revision(tmp_path, dsn)
        command.upgrade(config, "head")
        other_application(dsn)
        capsys.readouterr()
        command.downgrade(config, "app_0001:base", sql=True)
        script = capsys.readouterr().out
        with psycopg.connect(dsn, autocommit=True) as conn:
            notices: list[str] = []
            conn.add_notice_handler(lambda notice: notices.append(str(notice.message_primary)))
            conn.execute(script.encode())
        assert state(dsn) == OTHER
        assert notices[-1:] == ["pgsim: uninstall_pgsim skipped: pgsim stays, embedding columns are registered: "
                           "notes.embedding"]  # fmt: skip


def test_pgsims_branch_goes_down_only_without_registrations(
    server_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with scratch_database(server_dsn, "alembic_keep_branch") as dsn:
        config = alembic_config(tmp_path / "alembic", dsn)
        command.upgrade(config, "heads")
        other_application(dsn)
        with caplog.at_level(logging.WARNING, logger="pgsim.alembic"):
            command.downgrade(config, "pgsim@base")  # its functions (and the triggers), then its schema
        assert state(dsn) == OTHER
        assert "dropping pgsim's functions skipped" in caplog.text and "dropping schema pgsim skipped" in caplog.text

        capsys.readouterr()
        command.downgrade(config, "pgsim_0002:base", sql=True)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(capsys.readouterr().out.encode())
        assert state(dsn) == OTHER

        with psycopg.connect(dsn, autocommit=True) as conn:
            pgsim.remove_embedding(conn, "notes", "embedding")
        command.upgrade(config, "heads")  # the ledger lists every file: nothing to apply
        command.downgrade(config, "pgsim@base")
        assert state(dsn) == {}
