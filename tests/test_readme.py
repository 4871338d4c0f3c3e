"""The README's examples run as written, against the test database."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


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
