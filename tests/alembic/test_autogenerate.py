"""Autogenerate in a throwaway Alembic project against the real server: the generated file, as
generated, upgrades, downgrades and upgrades again; unchanged models generate nothing."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from fixtures.alembic_project import alembic_config
from fixtures.database import scratch_database

MODELS = """
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pgsim.db.hnsw import HNSW
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


# The reviewer's cases: each runs autogenerate -> the rendered file -> upgrade -> the database ->
# autogenerate again renders nothing -> downgrade.
HEADER = """
from sqlalchemy import Index
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from pgvector.sqlalchemy import SPARSEVEC, Vector

from pgsim.sqlalchemy import embedding_column


class Base(DeclarativeBase):
    pass
"""
DOC = """
class Doc(Base):
    __tablename__ = "ag_docs"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]
"""
EMBEDDING = '    embedding = embedding_column(source="body"{options})\n'
OTHER = """
class Other(Base):
    __tablename__ = "ag_other"
    id: Mapped[int] = mapped_column(primary_key=True)
"""


def models(tmp_path: Path, text: str) -> None:
    """Replace the models module (the next autogenerate imports it afresh)."""
    (tmp_path / "ag_models.py").write_text(HEADER + text)
    sys.modules.pop("ag_models", None)


def app(tmp_path: Path, dsn: str, text: str, *, include_schemas: bool = False) -> tuple[Path, Any]:
    directory, config = project(tmp_path, dsn, env_import="import pgsim.alembic")
    models(tmp_path, text)
    if include_schemas:
        env = directory / "env.py"
        env.write_text(
            env.read_text().replace(
                "target_metadata=target_metadata", "target_metadata=target_metadata, include_schemas=True"
            )
        )
    return directory, config


def assert_nothing_to_generate(config: Any, directory: Path) -> None:
    script = command.revision(config, message="nothing", autogenerate=True)
    path = Path(script.path)  # type: ignore[union-attr]
    text = path.read_text()
    path.unlink()  # a later downgrade "-1" steps over the last real revision
    assert "op." not in upgrade_section(text), upgrade_section(text)


def query(dsn: str, statement: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(statement, params).fetchall()  # type: ignore[arg-type]


def column_type(dsn: str, table: str, column: str) -> list[tuple[Any, ...]]:
    return query(
        dsn,
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = to_regclass(%s) AND attname = %s AND NOT attisdropped",
        [table, column],
    )


def triggers(dsn: str, table: str) -> int:
    return int(query(dsn, "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s)", [table])[0][0])


def test_removing_an_embedding_column_drops_the_column_too(server_dsn: str, tmp_path: Path) -> None:
    """op.create_table made the column, so unregistering keeps it: Alembic's drop_column follows."""
    with scratch_database(server_dsn, "alembic_drop_column") as dsn:
        directory, config = app(tmp_path, dsn, DOC + EMBEDDING.format(options=""))
        generate(config, directory, "docs")
        command.upgrade(config, "head")
        assert query(dsn, "SELECT column_name, created_column FROM pgsim.embedding") == [("embedding", False)]

        models(tmp_path, DOC)
        revision = generate(config, directory, "no embedding")
        assert (
            "op.drop_embedding('ag_docs', 'embedding', source=['body'], model='all-MiniLM-L6-v2', dtype='vector', "
            "m=16, ef_construction=64)\n    op.drop_column('ag_docs', 'embedding')"
        ) in upgrade_section(revision)
        downgrade = revision[revision.index("def downgrade()") :]
        assert downgrade.index("op.add_column('ag_docs'") < downgrade.index("op.create_embedding('ag_docs'")
        assert "import pgvector.sqlalchemy.vector" in revision  # the add_column's VECTOR(dim=384)
        command.upgrade(config, "head")
        assert column_type(dsn, "ag_docs", "embedding") == [] and registry(dsn) == []
        assert triggers(dsn, "ag_docs") == 0
        assert_nothing_to_generate(config, directory)

        command.downgrade(config, "-1")
        assert column_type(dsn, "ag_docs", "embedding") == [("vector(384)",)]
        assert registry(dsn) == [("embedding", "ag_docs_embedding_hnsw", 16)] and triggers(dsn, "ag_docs") == 2
        command.downgrade(config, "base")
        assert query(dsn, "SELECT to_regclass('ag_docs')") == [(None,)]


def test_dropping_a_table_forgets_its_registrations(server_dsn: str, tmp_path: Path) -> None:
    with scratch_database(server_dsn, "alembic_drop_table") as dsn:
        directory, config = app(tmp_path, dsn, OTHER + DOC + EMBEDDING.format(options=""))
        generate(config, directory, "docs")
        command.upgrade(config, "head")

        models(tmp_path, OTHER)
        revision = generate(config, directory, "no docs")
        assert (
            "op.drop_embedding('ag_docs', 'embedding', source=['body'], model='all-MiniLM-L6-v2', dtype='vector', "
            "m=16, ef_construction=64, drop_column=False)\n    op.drop_table('ag_docs')"
        ) in upgrade_section(revision)
        assert "drop_index" not in revision and "drop_hnsw_index" not in revision  # drop_embedding drops it
        downgrade = revision[revision.index("def downgrade()") :]
        assert downgrade.index("op.create_table('ag_docs'") < downgrade.index("op.create_embedding('ag_docs'")
        command.upgrade(config, "head")
        assert registry(dsn) == [] and query(dsn, "SELECT to_regclass('ag_docs')") == [(None,)]
        assert_nothing_to_generate(config, directory)

        command.downgrade(config, "-1")  # the table again, registered: triggers and index
        assert registry(dsn) == [("embedding", "ag_docs_embedding_hnsw", 16)] and triggers(dsn, "ag_docs") == 2
        assert query(dsn, "SELECT count(*) FROM pg_indexes WHERE indexname = 'ag_docs_embedding_hnsw'") == [(1,)]
        command.downgrade(config, "base")
        assert registry(dsn) == []


def test_pgsims_own_schema_is_left_alone_with_include_schemas(server_dsn: str, tmp_path: Path) -> None:
    with scratch_database(server_dsn, "alembic_include_schemas") as dsn:
        directory, config = app(tmp_path, dsn, DOC + EMBEDDING.format(options=""), include_schemas=True)
        first = generate(config, directory, "docs")
        assert "schema='pgsim'" not in first
        command.upgrade(config, "head")
        assert_nothing_to_generate(config, directory)  # not op.drop_index(op.f('queue_claim'), ... schema='pgsim')
        command.downgrade(config, "base")
        assert query(dsn, "SELECT to_regclass('ag_docs')") == [(None,)]


VECTORS = """
class Point(Base):
    __tablename__ = "ag_points"
    id: Mapped[int] = mapped_column(primary_key=True)
    v = mapped_column(Vector({dim}))
"""


def test_alter_column_of_a_vector_type_imports_it(server_dsn: str, tmp_path: Path) -> None:
    with scratch_database(server_dsn, "alembic_alter_vector") as dsn:
        directory, config = app(tmp_path, dsn, VECTORS.format(dim=3))
        generate(config, directory, "points")
        command.upgrade(config, "head")

        models(tmp_path, VECTORS.format(dim=4))
        revision = generate(config, directory, "4 dimensions")
        assert (
            "op.alter_column('ag_points', 'v'" in revision
            and "type_=pgvector.sqlalchemy.vector.VECTOR(dim=4)" in revision
        )
        assert "\nimport pgvector.sqlalchemy.vector\n" in revision
        command.upgrade(config, "head")  # no NameError
        assert column_type(dsn, "ag_points", "v") == [("vector(4)",)]
        assert_nothing_to_generate(config, directory)
        command.downgrade(config, "-1")
        assert column_type(dsn, "ag_points", "v") == [("vector(3)",)]
        command.downgrade(config, "base")


POINTS = """
class Point(Base):
    __tablename__ = "ag_points"
    id: Mapped[int] = mapped_column(primary_key=True)
    v = mapped_column(Vector(3))
    s = mapped_column(SPARSEVEC(5))
    __table_args__ = (
        Index("ag_points_v_l1", "v", postgresql_using="hnsw", postgresql_ops={"v": "vector_l1_ops"}),
    )
"""


def test_hnsw_indexes_of_every_pgvector_operator_class(server_dsn: str, tmp_path: Path) -> None:
    with scratch_database(server_dsn, "alembic_opclasses") as dsn:
        directory, config = app(tmp_path, dsn, POINTS)
        first = generate(config, directory, "points")
        assert "op.create_hnsw_index('ag_points_v_l1', 'ag_points', 'v', m=16, ef_construction=64, " in first
        assert "ops='vector_l1_ops')" in first
        command.upgrade(config, "head")
        with psycopg.connect(dsn, autocommit=True) as conn:  # an index the models do not have
            conn.execute("CREATE INDEX ag_points_s_hnsw ON ag_points USING hnsw (s sparsevec_l2_ops) WITH (m = 8)")

        revision = generate(config, directory, "no sparse index")
        assert (
            "op.drop_hnsw_index('ag_points_s_hnsw', 'ag_points', column_name='s', m=8, ef_construction=64, "
            "ops='sparsevec_l2_ops')"
        ) in upgrade_section(revision)
        command.upgrade(config, "head")
        assert query(dsn, "SELECT to_regclass('ag_points_s_hnsw')") == [(None,)]
        assert_nothing_to_generate(config, directory)
        command.downgrade(config, "-1")
        (definition,) = query(dsn, "SELECT indexdef FROM pg_indexes WHERE indexname = 'ag_points_s_hnsw'")[0]
        assert "hnsw (s sparsevec_l2_ops) WITH (m='8', ef_construction='64')" in definition
        command.downgrade(config, "base")


def test_a_bit_embedding_migrates_with_its_binary_index(server_dsn: str, tmp_path: Path) -> None:
    """dtype="bit": the revision adds a vector(384) column and create_embedding builds the Hamming index over
    binary_quantize (online, and in the offline SQL); autogenerate then finds nothing to change."""
    with scratch_database(server_dsn, "alembic_bit") as dsn:
        directory, config = app(tmp_path, dsn, DOC + EMBEDDING.format(options=', dtype="bit"'))
        revision = generate(config, directory, "docs")
        assert "dtype='bit'" in upgrade_section(revision)
        offline = io.StringIO()
        config.output_buffer = offline
        command.upgrade(config, "head", sql=True)
        assert 'USING hnsw ((binary_quantize("embedding")::bit(384)) bit_hamming_ops)' in offline.getvalue()
        config.output_buffer = None
        command.upgrade(config, "head")
        assert column_type(dsn, "ag_docs", "embedding") == [("vector(384)",)]
        assert query(dsn, "SELECT dtype, pgsim.bit_index('ag_docs', 'embedding') FROM pgsim.embedding") == [
            ("bit", "ag_docs_embedding_hnsw")
        ]
        assert_nothing_to_generate(config, directory)
        command.downgrade(config, "base")
        assert query(dsn, "SELECT to_regclass('ag_docs')") == [(None,)]


def test_a_prefix_embedding_migrates_with_its_prefix_index(server_dsn: str, tmp_path: Path) -> None:
    """prefix=64 with a Matryoshka-trained model: the revision adds a vector(256) column and create_embedding
    builds the cosine index over its first 64 values (online, and in the offline SQL); autogenerate then finds
    nothing to change, and the downgrade removes it."""
    with scratch_database(server_dsn, "alembic_prefix") as dsn:
        options = ', model="wordllama-l2-supercat", prefix=64'
        directory, config = app(tmp_path, dsn, DOC + EMBEDDING.format(options=options))
        revision = generate(config, directory, "docs")
        assert "prefix=64" in upgrade_section(revision) and "model='wordllama-l2-supercat'" in revision
        offline = io.StringIO()
        config.output_buffer = offline
        command.upgrade(config, "head", sql=True)
        assert 'USING hnsw ((subvector("embedding", 1, 64)::vector(64)) vector_cosine_ops)' in offline.getvalue()
        assert "prefix => 64" in offline.getvalue()
        config.output_buffer = None
        command.upgrade(config, "head")
        assert column_type(dsn, "ag_docs", "embedding") == [("vector(256)",)]
        assert query(dsn, "SELECT prefix, pgsim.prefix_index('ag_docs', 'embedding') FROM pgsim.embedding") == [
            (64, "ag_docs_embedding_hnsw")
        ]
        assert_nothing_to_generate(config, directory)
        check_prefix_changes(tmp_path, dsn, directory, config)
        command.downgrade(config, "base")
        assert query(dsn, "SELECT to_regclass('ag_docs')") == [(None,)]


def check_prefix_changes(tmp_path: Path, dsn: str, directory: Path, config: Any) -> None:
    """The models' prefix changed (128, then none, then 64): autogenerate renders a change_embedding of the
    prefix alone, reversed by one back; upgrading rebuilds the index under its name and nothing is queued;
    downgrading puts the old prefix back."""
    held = (
        "SELECT prefix, pgsim.prefix_index('ag_docs', 'embedding'), (SELECT count(*) FROM pgsim.queue) "
        "FROM pgsim.embedding"
    )
    model = "model='wordllama-l2-supercat', "
    steps = ((", prefix=128", model + "prefix=128", 128), ("", model + "prefix=False", None),
             (", prefix=64", model + "prefix=64", 64))  # fmt: skip
    for declared, rendered, expected in steps:
        models(tmp_path, DOC + EMBEDDING.format(options=', model="wordllama-l2-supercat"' + declared))
        revision = generate(config, directory, f"prefix {expected}")
        upgrade, downgrade = upgrade_section(revision), revision.split("def downgrade()")[1]
        assert f"op.change_embedding('ag_docs', 'embedding', {rendered})" in upgrade, upgrade
        assert "nothing is re-embedded" in upgrade and "source=" not in upgrade, upgrade
        back = model + {128: "prefix=64", None: "prefix=128", 64: "prefix=False"}[expected]
        assert f"op.change_embedding('ag_docs', 'embedding', {back})" in downgrade, downgrade
        command.upgrade(config, "head")
        index = "ag_docs_embedding_hnsw" if expected else None
        assert query(dsn, held) == [(expected, index, 0)]
        assert query(
            dsn, "SELECT count(*) FROM pg_indexes WHERE tablename = 'ag_docs' AND indexname LIKE '%hnsw%'"
        ) == [(1,)]
        assert_nothing_to_generate(config, directory)
    command.downgrade(config, "-1")
    assert query(dsn, held) == [(None, None, 0)]
    command.downgrade(config, "-1")
    assert query(dsn, held) == [(128, "ag_docs_embedding_hnsw", 0)]
    command.downgrade(config, "-1")
    assert query(dsn, held) == [(64, "ag_docs_embedding_hnsw", 0)]
