"""pgsim's schema as an Alembic branch, in a throwaway Alembic project against the real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from fixtures.alembic_project import alembic_config
from fixtures.database import scratch_database

from pgsim.db.schema import install
from pgsim.db.sqlfiles import function_files, sql_files


def ledger(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('pgsim.migration')").fetchone() == (None,):
            return []
        rows = conn.execute('SELECT name FROM pgsim.migration ORDER BY name COLLATE "C"').fetchall()
        return [name for (name,) in rows]


def all_names() -> list[str]:
    """Every numbered and function file, as the ledger sorts them."""
    return sorted(file.name for file in sql_files() + function_files())


def test_upgrade_heads_installs_pgsim_and_downgrade_removes_it(server_dsn: str, tmp_path: Path) -> None:
    names, numbered = all_names(), [file.name for file in sql_files()]
    with scratch_database(server_dsn, "alembic_branch") as dsn:
        config = alembic_config(tmp_path / "alembic", dsn)
        command.upgrade(config, "heads")
        assert ledger(dsn) == names
        command.downgrade(config, "pgsim@pgsim_0001")  # the functions go, the tables stay
        assert ledger(dsn) == numbered
        with psycopg.connect(dsn) as conn:
            functions = conn.execute("SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgsim'::regnamespace")
            assert functions.fetchone() == (0,)
            assert conn.execute("SELECT to_regclass('pgsim.embedding')").fetchone() != (None,)
        command.upgrade(config, "heads")
        assert ledger(dsn) == names
        command.downgrade(config, "pgsim@base")
        assert ledger(dsn) == []


def test_the_branch_and_pgsim_install_share_one_ledger(server_dsn: str, tmp_path: Path) -> None:
    with scratch_database(server_dsn, "alembic_shared") as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            install(conn, upto="0001")
            applied_at: Any = conn.execute("SELECT array_agg(applied_at ORDER BY name) FROM pgsim.migration").fetchone()
        command.upgrade(alembic_config(tmp_path / "alembic", dsn), "heads")  # applies only what is missing
        with psycopg.connect(dsn, autocommit=True) as conn:
            again: Any = conn.execute("SELECT array_agg(applied_at ORDER BY name) FROM pgsim.migration").fetchone()
            assert again[0][:1] == applied_at[0] and len(again[0]) == len(all_names())
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
        guard = "IF EXISTS (SELECT 1 FROM pgsim.migration WHERE name = {} AND sha256 = {} AND objects <@ ARRAY("
        for file in function_files():
            assert script.count(guard.format(f"'{file.name}'", f"'{file.sha256}'")) == 1
        with psycopg.connect(dsn, autocommit=True) as conn:  # the rendered SQL runs as rendered
            conn.execute(script.encode())
        assert ledger(dsn) == all_names()


APP_REVISION = '''
"""app: a table with a vector column and two HNSW indexes"""
import pgsim.alembic  # registers pgsim's operations
from alembic import op

revision = "app_0001"
down_revision = None
branch_labels = ("app",)
depends_on = None


def upgrade():
    op.install_pgsim()
    op.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, embedding vector(3))")
    op.create_hnsw_index("docs_embedding_hnsw", "docs", "embedding", m=8, ef_construction=32)
    op.create_hnsw_index("docs_embedding_hnsw_online", "docs", "embedding", concurrently=True)


def downgrade():
    op.drop_hnsw_index("docs_embedding_hnsw_online", concurrently=True)
    op.drop_hnsw_index("docs_embedding_hnsw")
    op.execute("DROP TABLE docs")
'''


def offline_upgrade(tmp_path: Path, dsn: str, revision: str, capsys: pytest.CaptureFixture[str]) -> tuple[Any, str]:
    """A project whose app branch is ``revision``, and the SQL `alembic upgrade app@head --sql` prints."""
    config = alembic_config(tmp_path / "alembic", dsn)
    (tmp_path / "alembic" / "versions" / "app_0001.py").write_text(revision)
    capsys.readouterr()  # what `alembic init` printed
    command.upgrade(config, "app@head", sql=True)
    return config, capsys.readouterr().out


def indexes(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'docs'").fetchall())


def test_hnsw_operations_upgrade_downgrade_and_render_offline(
    server_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with scratch_database(server_dsn, "alembic_ops") as dsn:
        config, script = offline_upgrade(tmp_path, dsn, APP_REVISION, capsys)
        assert "COMMIT;\n\nCREATE INDEX CONCURRENTLY docs_embedding_hnsw_online" in script.replace('"', "")
        command.upgrade(config, "app@head")
        found = indexes(dsn)
        assert "m='8'" in found["docs_embedding_hnsw"] and "ef_construction='32'" in found["docs_embedding_hnsw"]
        assert "hnsw (embedding vector_cosine_ops)" in found["docs_embedding_hnsw_online"]
        assert ledger(dsn) == all_names()  # install_pgsim
        command.downgrade(config, "app@base")
        assert indexes(dsn) == {}


def test_bad_index_operations_fail_clearly_and_change_nothing(server_dsn: str, tmp_path: Path) -> None:
    from pgsim.alembic.ops import CreateHnswIndexOp
    from pgsim.errors import InvalidInput

    with pytest.raises(InvalidInput, match="PostgreSQL keeps 63"):
        CreateHnswIndexOp("x" * 64, "docs", "embedding")
    with pytest.raises(InvalidInput, match="plain name"):
        CreateHnswIndexOp('docs_hnsw"; DROP TABLE docs; --', "docs", "embedding")
    with pytest.raises(InvalidInput, match="ops must be"):
        CreateHnswIndexOp("docs_hnsw", "docs", "embedding", ops="text_ops")
    revision = APP_REVISION.replace(
        'op.create_hnsw_index("docs_embedding_hnsw", "docs", "embedding", m=8, ef_construction=32)',
        'op.create_hnsw_index("docs_body_hnsw", "docs", "body")',
    )
    with scratch_database(server_dsn, "alembic_bad") as dsn:
        config = alembic_config(tmp_path / "alembic", dsn)
        (tmp_path / "alembic" / "versions" / "app_0001.py").write_text(revision)
        with pytest.raises(InvalidInput, match="docs.body is text, and an HNSW index with vector_cosine_ops"):
            command.upgrade(config, "app@head")
        with psycopg.connect(dsn) as conn:  # the migration's transaction rolled back: no table, no index
            assert conn.execute("SELECT to_regclass('docs')").fetchone() == (None,)


EMBEDDING_REVISION = '''
"""app: notes with an embedding column kept in sync"""
import pgsim.alembic
from alembic import op

revision = "app_0001"
down_revision = None
branch_labels = ("app",)
depends_on = None


def upgrade():
    op.install_pgsim()
    op.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    op.create_embedding("notes", "embedding", source="body", m=8, ef_construction=32)


def downgrade():
    op.drop_embedding("notes", "embedding")
    op.execute("DROP TABLE notes")
'''


def test_create_and_drop_embedding(server_dsn: str, tmp_path: Path) -> None:
    from pgsim.errors import InvalidInput

    with scratch_database(server_dsn, "alembic_embedding") as dsn:
        config = alembic_config(tmp_path / "alembic", dsn)
        (tmp_path / "alembic" / "versions" / "app_0001.py").write_text(EMBEDDING_REVISION)
        command.upgrade(config, "app@head")
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT column_name, index_m FROM pgsim.embedding").fetchall() == [("embedding", 8)]
            assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'notes'::regclass").fetchone() == (2,)
            conn.execute("CREATE VIEW note_vectors AS SELECT id, embedding FROM notes")
        with pytest.raises(InvalidInput, match=r"Cannot drop public.notes.embedding: .*view (public\.)?note_vectors"):
            command.downgrade(config, "app@base")
        with psycopg.connect(dsn, autocommit=True) as conn:  # unchanged: still registered, triggers in place
            assert conn.execute("SELECT count(*) FROM pgsim.embedding").fetchone() == (1,)
            assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'notes'::regclass").fetchone() == (2,)
            conn.execute("DROP VIEW note_vectors")
        command.downgrade(config, "app@base")
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT count(*) FROM pgsim.embedding").fetchone() == (0,)
            assert conn.execute("SELECT to_regclass('notes')").fetchone() == (None,)


def test_create_and_drop_embedding_render_offline_sql_that_runs(
    server_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with scratch_database(server_dsn, "alembic_embedding_offline") as dsn:
        config, upgrade = offline_upgrade(tmp_path, dsn, EMBEDDING_REVISION, capsys)
        assert "SELECT pgsim.register_embedding(target => '\"notes\"'::regclass, column_name => 'embedding'" in upgrade
        assert "CREATE INDEX notes_embedding_hnsw ON notes USING hnsw" in upgrade.replace('"', "")
        with psycopg.connect(dsn, autocommit=True) as conn:  # the rendered SQL runs as rendered, on its own
            conn.execute(upgrade.encode())
            registered = conn.execute(
                "SELECT column_name, source, key_columns, index_m, dimension FROM pgsim.embedding"
            )
            assert registered.fetchall() == [("embedding", '"body"', ["id"], 8, 384)]
            triggers = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'notes'::regclass")
            assert triggers.fetchone() == (2,)
            conn.execute("INSERT INTO notes VALUES (1, 'a chess engine')")  # queued by the trigger
            assert conn.execute("SELECT count(*) FROM pgsim.queue").fetchone() == (1,)
        capsys.readouterr()
        command.downgrade(config, "app@head:base", sql=True)
        downgrade = capsys.readouterr().out
        assert "SELECT pgsim.remove_embedding('\"notes\"'::regclass, 'embedding')" in downgrade
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(downgrade.encode())
            assert conn.execute("SELECT count(*) FROM pgsim.embedding").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM pgsim.queue").fetchone() == (0,)
            assert conn.execute("SELECT to_regclass('notes')").fetchone() == (None,)


def test_register_embedding_forgets_the_registrations_of_dropped_tables(server_dsn: str) -> None:
    """A table dropped with plain DROP TABLE and made again: registering its column again works in SQL too
    (as an offline migration does), and the old row goes."""
    register = (
        "SELECT pgsim.register_embedding('notes'::regclass, 'embedding', 'body', 'some-model', 'r1', 3, "
        "source_columns => '{body}')"
    )
    with scratch_database(server_dsn, "alembic_forget_dropped") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        install(conn)
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        conn.execute(register)
        conn.execute("INSERT INTO notes VALUES (1, 'queued')")
        conn.execute("DROP TABLE notes")
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        (registration,) = conn.execute(register).fetchone()  # type: ignore[misc]
        assert conn.execute("SELECT id FROM pgsim.embedding").fetchall() == [(registration,)]
        assert conn.execute("SELECT count(*) FROM pgsim.queue").fetchone() == (0,)
