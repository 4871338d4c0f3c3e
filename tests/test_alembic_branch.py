"""pgsim's schema as an Alembic branch, in a throwaway Alembic project against the real server."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from fixtures.database import scratch_database
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import URL

from pgsim.install import install
from pgsim.sqlfiles import sql_files


def alembic_config(project: Path, dsn: str) -> Config:
    if not (project / "env.py").exists():
        command.init(Config(str(project.parent / "alembic.ini")), str(project))
    from pgsim.alembic import version_location

    params = conninfo_to_dict(dsn)
    url = URL.create(
        "postgresql+psycopg",
        username=str(params["user"]),
        database=str(params["dbname"]),
        query={"host": str(params["host"]), "port": str(params.get("port", 5432))},
    )
    config = Config()
    config.set_main_option("script_location", str(project))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", os.pathsep.join([str(project / "versions"), version_location()]))
    config.set_main_option("sqlalchemy.url", url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def ledger(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('pgsim.migration')").fetchone() == (None,):
            return []
        return [name for (name,) in conn.execute("SELECT name FROM pgsim.migration ORDER BY name").fetchall()]


def test_upgrade_heads_installs_pgsim_and_downgrade_removes_it(server_dsn: str, tmp_path: Path) -> None:
    names = [file.name for file in sql_files()]
    with scratch_database(server_dsn, "alembic_branch") as dsn:
        config = alembic_config(tmp_path / "alembic", dsn)
        command.upgrade(config, "heads")
        assert ledger(dsn) == names
        command.downgrade(config, "pgsim@pgsim_0002")
        assert ledger(dsn) == names[:2]
        command.upgrade(config, "heads")
        assert ledger(dsn) == names
        command.downgrade(config, "pgsim@base")
        assert ledger(dsn) == []


def test_the_branch_and_pgsim_install_share_one_ledger(server_dsn: str, tmp_path: Path) -> None:
    with scratch_database(server_dsn, "alembic_shared") as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            install(conn, upto="0002")
            applied_at: Any = conn.execute("SELECT array_agg(applied_at ORDER BY name) FROM pgsim.migration").fetchone()
        command.upgrade(alembic_config(tmp_path / "alembic", dsn), "heads")  # applies only what is missing
        with psycopg.connect(dsn, autocommit=True) as conn:
            again: Any = conn.execute("SELECT array_agg(applied_at ORDER BY name) FROM pgsim.migration").fetchone()
            assert again[0][:2] == applied_at[0] and len(again[0]) == len(sql_files())
            assert install(conn).applied == []  # and the other way round


def test_offline_upgrade_renders_guarded_sql(
    server_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with scratch_database(server_dsn, "alembic_offline") as dsn:
        config = alembic_config(tmp_path / "alembic", dsn)
        capsys.readouterr()  # what `alembic init` printed
        command.upgrade(config, "heads", sql=True)
        script = capsys.readouterr().out
        assert script.count("IF NOT EXISTS (SELECT 1 FROM pgsim.migration WHERE name = ") == len(sql_files())
        with psycopg.connect(dsn, autocommit=True) as conn:  # the rendered SQL runs as rendered
            conn.execute(script.encode())
        assert ledger(dsn) == [file.name for file in sql_files()]
