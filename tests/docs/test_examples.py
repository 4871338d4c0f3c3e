"""The README's examples run as written, against the test database."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
from fixtures.database import scratch_database

README = Path(__file__).resolve().parents[2] / "README.md"


def example(name: str) -> str:
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no example marked {name}"
    return match.group(1)


def test_psycopg_example_runs_as_written(database: str) -> None:
    code = example("psycopg")
    assert len(code.strip().splitlines()) <= 16
    env = dict(os.environ, PGSIM_DSN=database)
    for _ in range(2):  # a second run finds everything in place
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        rows = ast.literal_eval(out.stdout.strip())
        assert sorted(body for (body,) in rows) == [
            "Indexing JSONB columns for fast lookups",
            "Tuning Postgres for write-heavy workloads",
        ]


def test_sync_example_runs_as_written(database: str) -> None:
    code = example("sync")
    assert len(code.strip().splitlines()) <= 16
    env = dict(os.environ, PGSIM_DSN=database)
    for _ in range(2):  # it starts from a dropped table each time
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        embedded, titles = out.stdout.strip().splitlines()
        assert embedded == "2"  # the inserted row and the updated one; ingested rows came embedded
        assert sorted(ast.literal_eval(titles)) == ["Ragù", "Sauce"]


def test_sqlalchemy_example_runs_as_written(database: str) -> None:
    code = example("sqlalchemy")
    env = dict(os.environ, PGSIM_DSN=database)
    for _ in range(2):  # it drops and creates its table each time
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert ast.literal_eval(out.stdout.strip()) == ["Fast JSON parser for C"]


def test_search_example_runs_as_written(tmp_path: Path) -> None:
    """Against the demo's table, as the README says; the embedded server in a fresh home."""
    env = dict(os.environ, PGSIM_HOME=str(tmp_path / "home"))
    env.pop("PGSIM_DSN", None)
    try:
        demo = subprocess.run(
            [sys.executable, "-m", "pgsim.cli", "demo", "--rows", "400"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert demo.returncode == 0, demo.stderr
        out = subprocess.run(
            [sys.executable, "-c", example("search")], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.strip().splitlines()
        assert 1 <= len(lines) <= 5 and all(": " in line for line in lines)
    finally:
        subprocess.run([sys.executable, "-m", "pgsim.cli", "server", "stop"], env=env, capture_output=True, timeout=120)


def shell_example(name: str) -> list[str]:
    match = re.search(rf"<!-- example: {name} -->\n```bash\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no example marked {name}"
    return [line for line in match.group(1).splitlines() if line.strip()]


def test_alembic_walkthrough_runs_as_written(server_dsn: str, tmp_path: Path) -> None:
    """In a database of its own: autogenerate compares the models with every table it finds."""
    with scratch_database(server_dsn, "readme_alembic") as database:
        alembic_walkthrough(database, tmp_path)


def alembic_walkthrough(database: str, tmp_path: Path) -> None:
    env = dict(os.environ, PGSIM_DSN=database, HF_HUB_OFFLINE="1")
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")

    def run(command: str) -> str:
        out = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{command}: {out.stderr}"
        return out.stdout

    (tmp_path / "models.py").write_text(example("alembic-models"))
    run("alembic init migrations")
    env_py = tmp_path / "migrations" / "env.py"
    assert env_py.read_text().count("target_metadata = None") == 1
    env_py.write_text(env_py.read_text().replace("target_metadata = None", example("alembic-env")))
    commands = shell_example("alembic-commands")
    for command in commands[:2]:  # autogenerate, upgrade
        run(command)
    (first,) = (tmp_path / "migrations" / "versions").glob("*_memos.py")
    generated = first.read_text()
    readme = README.read_text()
    shown = readme[readme.index("The first revision's `upgrade()`") :].split("```python\n", 1)[1].split("```")[0]
    assert all(line in generated for line in shown.splitlines())  # the README shows what is generated
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT column_name FROM pgsim.embedding WHERE table_name = 'memos'").fetchall() == [
            ("embedding",)
        ]
    for command in commands[2:4]:  # an empty revision, applied
        run(command)
    (empty,) = (tmp_path / "migrations" / "versions").glob("*_no_change.py")
    upgrade = empty.read_text().split("def upgrade()")[1].split("def downgrade()")[0]
    assert "op." not in upgrade and "pass" in upgrade
    run(commands[4])  # downgrade base
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT to_regclass('memos')").fetchone() == (None,)
        assert conn.execute("SELECT to_regclass('pgsim.embedding')").fetchone() == (None,)  # uninstall_pgsim


def test_quality_example_runs_as_written(database: str) -> None:
    code = example("quality")
    env = dict(os.environ, PGSIM_DSN=database)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    hybrid, relevant, irrelevant, diverse, duplicates, labels = out.stdout.strip().splitlines()
    assert len(ast.literal_eval(hybrid)) == 3 and len(ast.literal_eval(diverse)) == 3
    assert 1 <= len(ast.literal_eval(relevant)) <= 10 and ast.literal_eval(irrelevant) == []
    assert len(ast.literal_eval(duplicates)) >= 2
    assert sum(ast.literal_eval(labels.removeprefix("Counter(").removesuffix(")")).values()) == 300
