"""Issue 22, finding 4: neither autogenerate nor upgrade (online or ``--sql``) loads the model, whatever they
render or apply (create_embedding, change_embedding); and every pgsim operation documents itself:
``help(op.X)`` and ``inspect.signature(op.X)`` show its docstring and typed parameters."""

from __future__ import annotations

import inspect
import json
import os
import pydoc
import subprocess
import sys
from pathlib import Path

import psycopg
from alembic.operations import Operations
from fixtures.alembic_project import sqlalchemy_url
from fixtures.database import scratch_database

import pgsim.alembic

EXPECTED = {
    "install_pgsim",
    "uninstall_pgsim",
    "create_embedding",
    "drop_embedding",
    "change_embedding",
    "create_hnsw_index",
    "drop_hnsw_index",
}


def pgsims_operations() -> list[str]:
    """Every operation on Alembic's Operations that one of pgsim's classes implements."""
    found = []
    for name in dir(Operations):
        implementation = getattr(getattr(Operations, name), "__globals__", {}).get("op_cls")
        if implementation is not None and implementation.__module__.startswith("pgsim."):
            found.append(name)
    return found


def test_every_operation_has_a_docstring_and_a_typed_signature() -> None:
    from alembic import op

    names = pgsims_operations()
    assert EXPECTED <= set(names), names
    for name in names:
        proxy = getattr(op, name)
        signature = inspect.signature(proxy)
        parameters = list(signature.parameters.values())
        assert all(p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters), (name, signature)
        assert all(p.annotation is not p.empty for p in parameters), (name, signature)
        assert signature.return_annotation is not signature.empty, name
        assert [p.name for p in parameters[:1]] != ["self"], name
        doc = inspect.getdoc(proxy) or ""
        assert len(doc) > 80 and "proxied" not in doc, (name, doc)
        shown = pydoc.render_doc(proxy, renderer=pydoc.plaintext)
        assert f"{name}{signature}" in shown, shown  # help(op.X)
        assert doc.splitlines()[0] in shown
    assert "source: 'str | list[str] | None' = None" in str(inspect.signature(op.change_embedding))


# Run in a fresh interpreter: autogenerate and upgrade a table with an embedding column, then a change of
# its source, online and as an --sql script; print the modules that loading a model imports, if any.
SCRIPT = """
import json, sys
from pathlib import Path
from alembic import command
from alembic.config import Config

project, url, models = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
config = Config()
config.set_main_option("script_location", str(project / "alembic"))
config.set_main_option("path_separator", "os")
config.set_main_option("sqlalchemy.url", url)
command.init(Config(str(project / "alembic.ini")), str(project / "alembic"))
env = project / "alembic" / "env.py"
env.write_text(env.read_text().replace(
    "target_metadata = None",
    f"import sys\\nsys.path.insert(0, {str(project)!r})\\nimport pgsim.alembic\\nfrom nm_models import Base\\n"
    "target_metadata = Base.metadata"))
for number, text in enumerate(models):
    (project / "nm_models.py").write_text(text)
    sys.modules.pop("nm_models", None)
    command.revision(config, message=f"step {number}", autogenerate=True)
    command.upgrade(config, "head")
command.upgrade(config, "base:head", sql=True)
model_modules = ("torch", "sentence_transformers", "transformers", "onnxruntime")
loaded = sorted(name for name in model_modules if name in sys.modules)
print(json.dumps(loaded))
"""
MODELS = """
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from pgsim.sqlalchemy import embedding_column


class Base(DeclarativeBase):
    pass


class Memo(Base):
    __tablename__ = "memos"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    body: Mapped[str]
    embedding = embedding_column(source={source!r})
"""


def test_autogenerate_and_upgrade_never_load_the_model(server_dsn: str, tmp_path: Path) -> None:
    with scratch_database(server_dsn, "alembic_no_model") as dsn:
        url = sqlalchemy_url(dsn).render_as_string(hide_password=False).replace("%", "%%")
        steps = [MODELS.format(source=["body"]), MODELS.format(source=["title", "body"])]
        with psycopg.connect(dsn, autocommit=True) as conn:  # rows to queue: the first step makes the table
            conn.execute("CREATE TABLE memos (id int PRIMARY KEY, title varchar NOT NULL, body varchar NOT NULL)")
            conn.execute("INSERT INTO memos SELECT i, 'title ' || i, 'body ' || i FROM generate_series(1, 5) i")
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path), url, *steps],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        script = out.stdout
        assert "SELECT pgsim.register_embedding(" in script and "PERFORM pgsim.freeze_embedding(" in script
        assert json.loads(script.strip().splitlines()[-1]) == []  # no model was loaded
        with psycopg.connect(dsn) as conn:  # and both steps ran: the change is under way
            registered = conn.execute("SELECT column_name, source FROM pgsim.embedding ORDER BY id").fetchall()
            assert registered == [
                ("embedding", '"body"'),
                ("embedding_next", 'concat_ws(\'\n\n\', "title", "body")'),
            ]
            assert conn.execute("SELECT count(*) FROM pgsim.queue").fetchone() == (5,)  # the new column's rows
    assert pgsim.alembic.ops.pgsim_operations() == pgsims_operations()
