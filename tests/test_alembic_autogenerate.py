"""Autogenerate in a throwaway Alembic project against the real server: the generated file, as
generated, upgrades, downgrades and upgrades again; unchanged models generate nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from alembic import command
from fixtures.alembic_project import alembic_config
from fixtures.database import scratch_database

MODELS = """
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pgsim.index import HNSW
from pgsim.sqlalchemy import embedding_column


class Base(DeclarativeBase):
    pass


class Doc(Base):
    __tablename__ = "ag_docs"
    id: Mapped[int] = mapped_column(primary_key=True)
    section: Mapped[str]
    body: Mapped[str]
    embedding = embedding_column(source=["section", "body"], index=HNSW(m={m}))
"""


def project(tmp_path: Path, dsn: str, *, env_import: str, m: int = 16) -> tuple[Path, object]:
    """An Alembic project whose env.py targets MODELS' metadata; ``env_import`` is env.py's first line."""
    directory = tmp_path / "alembic"
    config = alembic_config(directory, dsn, pgsim_branch=False)
    (tmp_path / "ag_models.py").write_text(MODELS.format(m=m))
    env = directory / "env.py"
    text = env.read_text()
    if "ag_models" not in text:
        text = text.replace(
            "target_metadata = None",
            f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n{env_import}\nfrom ag_models import Base\n"
            "target_metadata = Base.metadata",
        )
        env.write_text(text)
    return directory, config


def generate(config: object, directory: Path, message: str) -> str:
    """Autogenerate a revision and return its text."""
    script = command.revision(config, message=message, autogenerate=True)  # type: ignore[arg-type]
    return Path(script.path).read_text()  # type: ignore[union-attr]


def upgrade_section(revision: str) -> str:
    return revision[revision.index("def upgrade()") : revision.index("def downgrade()")]


def registry(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('pgsim.embedding')").fetchone() == (None,):
            return []
        return conn.execute("SELECT column_name, index_name, index_m FROM pgsim.embedding").fetchall()


def index_options(dsn: str) -> list[str] | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT reloptions FROM pg_class WHERE relname = 'ag_docs_embedding_hnsw'").fetchone()
        return row[0] if row else None


def test_autogenerate_renders_pgsim_operations_that_run_as_generated(server_dsn: str, tmp_path: Path) -> None:
    with scratch_database(server_dsn, "alembic_autogenerate") as dsn:
        directory, config = project(tmp_path, dsn, env_import="import pgsim.alembic")
        first = generate(config, directory, "docs")
        assert "import pgsim.alembic" in first and "import pgsim.sqlalchemy.types" in first
        assert "pgsim.sqlalchemy.types.Embedding(dim=384, model='all-MiniLM-L6-v2')" in first
        assert (
            "op.create_embedding('ag_docs', 'embedding', source=['section', 'body'], model='all-MiniLM-L6-v2', "
            "dtype='vector', m=16, ef_construction=64)"
        ) in upgrade_section(first)
        assert "create_index" not in first  # create_embedding builds the index
        command.upgrade(config, "head")  # type: ignore[arg-type]
        assert registry(dsn) == [("embedding", "ag_docs_embedding_hnsw", 16)]
        assert index_options(dsn) == ["m=16", "ef_construction=64"]

        unchanged = generate(config, directory, "nothing")
        assert "op." not in upgrade_section(unchanged) and "    pass" in upgrade_section(unchanged)
        command.upgrade(config, "head")  # type: ignore[arg-type]

        (tmp_path / "ag_models.py").write_text(MODELS.format(m=32))
        for name in [name for name in sys.modules if name == "ag_models"]:
            del sys.modules[name]
        rebuilt = generate(config, directory, "m 32")
        assert (
            "op.drop_hnsw_index('ag_docs_embedding_hnsw', 'ag_docs', column_name='embedding', m=16, "
            "ef_construction=64, ops='vector_cosine_ops')\n"
            "    op.create_hnsw_index('ag_docs_embedding_hnsw', 'ag_docs', 'embedding', m=32, ef_construction=64, "
            "ops='vector_cosine_ops')"
        ) in upgrade_section(rebuilt)
        command.upgrade(config, "head")  # type: ignore[arg-type]
        assert index_options(dsn) == ["m=32", "ef_construction=64"]
        assert registry(dsn) == [("embedding", "ag_docs_embedding_hnsw", 32)]

        command.downgrade(config, "base")  # type: ignore[arg-type]
        assert registry(dsn) == [] and index_options(dsn) is None
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT to_regclass('ag_docs')").fetchone() == (None,)
        command.upgrade(config, "head")  # type: ignore[arg-type]
        assert registry(dsn) == [("embedding", "ag_docs_embedding_hnsw", 32)]
        assert index_options(dsn) == ["m=32", "ef_construction=64"]


def test_the_alembic_plugin_entry_point_renders_them_without_an_import(server_dsn: str, tmp_path: Path) -> None:
    """In a fresh process, env.py names the plugin instead of importing pgsim.alembic."""
    with scratch_database(server_dsn, "alembic_plugin") as dsn:
        directory, _ = project(tmp_path, dsn, env_import="")
        env = directory / "env.py"
        env.write_text(
            env.read_text().replace(
                "target_metadata=target_metadata",
                'target_metadata=target_metadata, autogenerate_plugins=["alembic.autogenerate.*", "pgsim"]',
            )
        )
        ini = tmp_path / "alembic.ini"  # the one `alembic init` wrote, with the test database's URL
        url = str(alembic_config(directory, dsn, pgsim_branch=False).get_main_option("sqlalchemy.url"))
        url_line = "sqlalchemy.url = " + url.replace("%", "%%")  # the ini file's interpolation
        lines = [url_line if line.startswith("sqlalchemy.url") else line for line in ini.read_text().splitlines()]
        ini.write_text("\n".join(lines))
        result = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ini), "revision", "--autogenerate", "-m", "docs"],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        (generated,) = (directory / "versions").glob("*_docs.py")
        assert "op.create_embedding('ag_docs', 'embedding'" in generated.read_text()
        assert "import pgsim.alembic" in generated.read_text()


@pytest.fixture(autouse=True)
def _forget_models() -> None:
    sys.modules.pop("ag_models", None)
