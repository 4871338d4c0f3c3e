"""The examples of README.md and docs/*.md run as written, against the test database.

A fenced block right after ``<!-- example: NAME -->`` is an example: the tests below run it (Python in a
subprocess, SQL against a copy of the demo's table, the Alembic walkthrough's commands in a scratch
project). A Python block must be an example or say why it is not: ``<!-- not-run: REASON -->``. Relative
links must resolve, and benchmark numbers stay in bench/README.md.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fixtures.database import dsn_for, scratch_database
from fixtures.forks import PGSIM_CLI, ForkServer
from fixtures.model import load_packages_table

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- (example|not-run): (.+?) -->")
FENCE = re.compile(r"^```(\w*)\s*$")
PYTHON = {"python", "py", "python3", "pycon"}

# Examples whose test below checks what they print (or, for the Alembic walkthrough, what they generate);
# every other Python example is run by test_other_python_examples_run.
CHECKED = {
    "psycopg",
    "search",
    "sync",
    "sqlalchemy",
    "quality",
    "search-where",
    "encoder",
    "orm-options",
    "alembic-models",
    "alembic-env",
    "alembic-commands",
    "alembic-generated",
    "alembic-change-before",
    "alembic-change-first",
    "alembic-change-after",
    "alembic-change-commands",
    "alembic-change-generated",
    "alembic-change-sync",
    "security",
    "long-documents",
    "long-documents-sql",
    "bit-storage",
}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    marker: tuple[str, str] | None  # ("example", name) or ("not-run", reason) from the line before


def blocks(page: Path) -> Iterator[Block]:
    """Every fenced block of ``page``, with the marker on the line before it, if any."""
    lines = page.read_text().splitlines()
    number = 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        if opening is None:
            number += 1
            continue
        end = next(i for i in range(number + 1, len(lines)) if lines[i].startswith("```"))
        found = MARKER.fullmatch(lines[number - 1].strip()) if number else None
        yield Block(
            page,
            number + 1,
            opening.group(1),
            "\n".join(lines[number + 1 : end]) + "\n",
            (found.group(1), found.group(2)) if found else None,
        )
        number = end + 1


def examples() -> dict[str, Block]:
    found: dict[str, Block] = {}
    for page in PAGES:
        for block in blocks(page):
            if block.marker and block.marker[0] == "example":
                name = block.marker[1]
                assert name not in found, f"example {name} is marked twice ({found[name].page.name}, {page.name})"
                found[name] = block
    return found


def example(name: str, language: str = "python") -> str:
    block = examples().get(name)
    assert block is not None, f"no example marked {name} in README.md or docs/"
    assert block.language == language, f"example {name} is a {block.language} block, not {language}"
    return block.code


def run_python(code: str, env: dict[str, str], timeout: int = 300) -> list[str]:
    """``code`` run as ``python -c`` runs it, in a process of its own with ``env``; its output lines (the test
    fails with its stderr if it fails). The process is forked from one that imported the heavy libraries
    (:data:`PRELOADED`) already, when ``env`` differs from this process's only where those do not look."""
    if not FORKS.serves(env):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()
    returncode, stdout, stderr = FORKS.run(code, env, timeout)
    assert returncode == 0, stderr
    return stdout.strip().splitlines()


# What an example's process spends most of its seconds on before its first line does anything: importing
# these (sentence-transformers alone takes several seconds of CPU). pgsim itself is imported by each example.
PRELOADED = (
    "torch",
    "sentence_transformers",
    "sqlalchemy",
    "sqlalchemy.ext.asyncio",
    "psycopg",
    "psycopg_pool",
    "alembic.config",
)
FORKS = ForkServer(PRELOADED)


# The alembic command (what its console script runs), as a fork server's code; its argv is the command's.
ALEMBIC = "import sys; sys.argv[0] = 'alembic'; from alembic.config import main; sys.exit(main())"


def run_command(command: str, env: dict[str, str], cwd: Path, timeout: int = 300) -> str:
    """A documented shell command run in ``cwd`` with ``env``; its output (the test fails with its stderr if
    it fails). A plain ``alembic ...`` command line is forked from :data:`FORKS` as its console script runs."""
    words = shlex.split(command)
    if words[:1] == ["alembic"] and not set("|&;<>$`*?") & set(command) and FORKS.serves(env):
        returncode, stdout, stderr = FORKS.run(ALEMBIC, env, timeout, argv=words[1:], cwd=cwd)
    else:
        out = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        returncode, stdout, stderr = out.returncode, out.stdout, out.stderr
    assert returncode == 0, f"{command}: {stderr}"
    return stdout


@pytest.fixture(scope="module", autouse=True)
def _stop_forks() -> Iterator[None]:
    yield
    FORKS.stop()


def test_python_blocks_are_run_or_say_why_not() -> None:
    unmarked = [
        f"{block.page.relative_to(ROOT)}:{block.line}"
        for page in PAGES
        for block in blocks(page)
        if block.language in PYTHON and block.marker is None
    ]
    assert not unmarked, (
        "Python blocks without <!-- example: NAME --> (run by tests/docs) or <!-- not-run: REASON -->: "
        + ", ".join(unmarked)
    )


def test_every_example_has_a_test() -> None:
    for name, block in examples().items():
        assert block.language in (*PYTHON, "sql") or name in CHECKED, (
            f"example {name} ({block.page.name}) is a {block.language} block that no test runs"
        )


def test_relative_links_resolve() -> None:
    link = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # links in code are not links
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in link.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor on the same page
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"relative links to files that do not exist: {broken}"


def test_benchmark_numbers_stay_in_bench_readme() -> None:
    measurement = re.compile(r"\b\d+(?:\.\d+)?x\b|\b(?:rows|texts|objects|tokens)/s\b|\bQPS\b|ms/q|GFLOP")
    found = [
        f"{page.relative_to(ROOT)}: {match.group(0)}"
        for page in PAGES
        for match in measurement.finditer(page.read_text())
    ]
    assert not found, f"benchmark numbers belong in bench/README.md: {found}"


def test_psycopg_example_runs_as_written(database: str) -> None:
    code = example("psycopg")
    assert len(code.strip().splitlines()) <= 16
    env = dict(os.environ, PGSIM_DSN=database)
    for _ in range(2):  # a second run finds everything in place
        (rows,) = run_python(code, env)
        assert sorted(body for (body,) in ast.literal_eval(rows)) == [
            "Indexing JSONB columns for fast lookups",
            "Tuning Postgres for write-heavy workloads",
        ]


def test_sync_example_runs_as_written(database: str) -> None:
    code = example("sync")
    assert len(code.strip().splitlines()) <= 16
    env = dict(os.environ, PGSIM_DSN=database)
    for _ in range(2):  # it starts from a dropped table each time
        embedded, titles = run_python(code, env)
        assert embedded == "2"  # the inserted row and the updated one; ingested rows came embedded
        assert sorted(ast.literal_eval(titles)) == ["Ragù", "Sauce"]


def test_security_example_runs_as_written(server_dsn: str) -> None:
    """As docs/security.md says: the database's owner, a worker role and an application role, each logging in
    as itself (no superuser); the roles are the example's own names, made here and dropped after."""
    from psycopg import sql

    names = ("notes_owner", "notes_worker", "notes_app")
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        for name in names:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER").format(sql.Identifier(name)))
    try:
        with scratch_database(server_dsn, "security_example", owner="notes_owner") as database:
            with psycopg.connect(database, autocommit=True) as admin:
                admin.execute("CREATE EXTENSION vector")  # a superuser's, as on most servers
            env = dict(os.environ, **{f"{role.upper()}_DSN": dsn_for(database, user=f"notes_{role}")
                                      for role in ("owner", "worker", "app")})  # fmt: skip
            for _ in range(2):  # a second run finds pgsim and the grants in place
                embedded, found = run_python(example("security"), env)
                assert embedded == "2"
                assert ast.literal_eval(found) == ["Pasta sauce"]
            with psycopg.connect(database, autocommit=True) as admin:
                admin.execute("DROP OWNED BY notes_owner, notes_worker, notes_app CASCADE")
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            for name in names:
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_sqlalchemy_example_runs_as_written(database: str) -> None:
    code = example("sqlalchemy")
    env = dict(os.environ, PGSIM_DSN=database)
    for _ in range(2):  # it drops and creates its table each time
        (printed,) = run_python(code, env)
        assert ast.literal_eval(printed) == ["Fast JSON parser for C"]


def test_orm_options_example_runs_as_written(database: str) -> None:
    code = example("orm-options")
    env = dict(os.environ, PGSIM_DSN=database)
    for _ in range(2):  # it drops and creates its table each time
        titles, version = run_python(code, env)
        assert sorted(ast.literal_eval(titles)) == ["Indexes", "Vacuum"]
        assert version == "True"
    with psycopg.connect(database) as conn:  # the declared index, not the default one, is the registered one
        assert conn.execute(
            "SELECT index_name, index_m, index_ef_construction, dtype FROM pgsim.embedding WHERE table_name = %s",
            ["orm_notes"],
        ).fetchall() == [("orm_notes_embedding_hnsw", 32, 128, "halfvec")]


def test_search_example_runs_as_written(tmp_path: Path) -> None:
    """Against the demo's table, as the README says; the embedded server in a fresh home."""
    env = dict(os.environ, PGSIM_HOME=str(tmp_path / "home"))
    env.pop("PGSIM_DSN", None)
    try:
        returncode, _, stderr = FORKS.run(PGSIM_CLI, env, 600, argv=["demo", "--rows", "200"])  # python -m pgsim.cli
        assert returncode == 0, stderr
        lines = run_python(example("search"), env)
        assert 1 <= len(lines) <= 5 and all(": " in line for line in lines)
    finally:
        FORKS.run(PGSIM_CLI, env, 120, argv=["server", "stop"])


def test_search_where_example_runs_as_written(database: str) -> None:
    env = dict(os.environ, PGSIM_DSN=database)
    small, photos = run_python(example("search-where"), env)
    assert ast.literal_eval(small) == ["jq", "ujson"]  # the only rows under 1000 KiB: k rows when k match
    assert photos.split()[0] == "gimp"


def test_long_documents_examples_run_as_written(database: str) -> None:
    env = dict(os.environ, PGSIM_DSN=database)
    *printed, sql_rows = run_python(example("long-documents") + example("long-documents-sql"), env)
    shown = next(b for b in blocks(ROOT / "docs" / "long_documents.md") if b.language == "text")
    assert printed == shown.code.strip().splitlines()  # the page shows what the example prints
    assert [(row[0], row[2]) for row in ast.literal_eval(sql_rows)] == [(1, True), (2, False)]  # the answer's chunk


def test_bit_storage_example_runs_as_written(database: str) -> None:
    index, found = run_python(example("bit-storage"), dict(os.environ, PGSIM_DSN=database))
    assert index == "runbooks_embedding_hnsw"  # the binary index pgsim built
    assert found == "[1, 2]"  # the firewall first, and only the filter's rows


def test_encoder_example_runs_as_written() -> None:
    shape, stats, similar = run_python(example("encoder"), dict(os.environ))
    assert shape == "(384,) float32 None None"
    assert stats == "1 1 2"  # one text encoded, one duplicate, two empty
    assert similar == "True"


def test_other_python_examples_run(database: str) -> None:
    env = dict(os.environ, PGSIM_DSN=database)
    for name, block in sorted(examples().items()):
        if block.language in PYTHON and name not in CHECKED:
            run_python(block.code, env)


@pytest.fixture(scope="module")
def demo_table(database: str, packages: list[Any], package_vectors: Any) -> str:
    """The demo's table, pgsim_demo.packages, with the first rows of the Debian sample and their embeddings."""
    import pgsim

    with psycopg.connect(database, autocommit=True) as conn:
        pgsim.install(conn)
        conn.execute("CREATE SCHEMA IF NOT EXISTS pgsim_demo")
        conn.execute("SET search_path = pgsim_demo, public")
        conn.execute("DROP TABLE IF EXISTS packages")
        load_packages_table(conn, packages, package_vectors)
    return database


SQL_EXAMPLES = sorted(name for name, block in examples().items() if block.language == "sql")


@pytest.mark.parametrize("name", SQL_EXAMPLES)
def test_sql_example_runs_as_written(demo_table: str, name: str) -> None:
    with psycopg.connect(demo_table, autocommit=True) as conn:
        rows = conn.execute(example(name, "sql").encode()).fetchall()
    assert rows, f"example {name} returned no rows"


def test_alembic_walkthrough_runs_as_written(server_dsn: str, tmp_path: Path) -> None:
    """In a database of its own: autogenerate compares the models with every table it finds."""
    with scratch_database(server_dsn, "readme_alembic") as database:
        alembic_walkthrough(database, tmp_path)


def alembic_walkthrough(database: str, tmp_path: Path) -> None:
    env = dict(os.environ, PGSIM_DSN=database, HF_HUB_OFFLINE="1")
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")

    def run(command: str) -> str:
        return run_command(command, env, tmp_path)

    (tmp_path / "models.py").write_text(example("alembic-models"))
    run("alembic init migrations")
    env_py = tmp_path / "migrations" / "env.py"
    assert env_py.read_text().count("target_metadata = None") == 1
    env_py.write_text(env_py.read_text().replace("target_metadata = None", example("alembic-env")))
    commands = [line for line in example("alembic-commands", "bash").splitlines() if line.strip()]
    for command in commands[:2]:  # autogenerate, upgrade
        run(command)
    (first,) = (tmp_path / "migrations" / "versions").glob("*_memos.py")
    generated = first.read_text()
    shown = example("alembic-generated")
    assert all(line in generated for line in shown.splitlines())  # the docs show what is generated
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT column_name FROM pgsim.embedding WHERE table_name = 'memos'").fetchall() == [
            ("embedding",)
        ]
    for command in commands[2:4]:  # an empty revision, applied
        run(command)
    (empty,) = (tmp_path / "migrations" / "versions").glob("*_no_change.py")
    upgrade = empty.read_text().split("def upgrade()")[1].split("def downgrade()")[0]
    assert "op." not in upgrade and "pass" in upgrade
    assert "uninstall_pgsim" not in generated  # pgsim is the whole database's: the downgrade leaves it
    run(commands[4])  # downgrade base
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT to_regclass('memos')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM pgsim.embedding").fetchone() == (0,)  # pgsim stays, memos' goes


def test_alembic_change_walkthrough_runs_as_written(server_dsn: str, tmp_path: Path) -> None:
    """docs/alembic.md's change of source: models before, autogenerate, upgrade; models after (a new source
    column, a dropped one); autogenerate renders change_embedding before drop_column; upgrade; pgsim.sync
    fills the new column and switches over."""
    import pgsim

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")

    def run(command: str) -> str:
        return run_command(command, env, tmp_path)

    with scratch_database(server_dsn, "docs_alembic_change") as database:
        env["PGSIM_DSN"] = database
        before = example("alembic-change-before")
        (tmp_path / "models.py").write_text(before)
        run("alembic init migrations")
        env_py = tmp_path / "migrations" / "env.py"
        env_py.write_text(env_py.read_text().replace("target_metadata = None", example("alembic-env")))
        for command in example("alembic-change-first", "bash").splitlines():
            run(command)
        with psycopg.connect(database, autocommit=True) as conn:  # the application's rows, embedded
            conn.execute("INSERT INTO tickets VALUES (1, 'Login fails', 'The password field rejects emoji', 'T-17')")
            assert pgsim.sync(conn).embedded == 1
        (tmp_path / "models.py").write_text(before[: before.index("class Ticket")] + example("alembic-change-after"))
        for command in example("alembic-change-commands", "bash").splitlines():
            run(command)
        (revision,) = (tmp_path / "migrations" / "versions").glob("*_component.py")
        generated = revision.read_text()
        upgrade = generated[generated.index("def upgrade()") : generated.index("def downgrade()")]
        shown = [line for line in example("alembic-change-generated").splitlines() if line]
        assert [line.strip() for line in upgrade.splitlines() if line.strip() in shown] == shown  # in that order
        with psycopg.connect(database) as conn:
            assert conn.execute("SELECT to_regclass('pgsim.embedding')").fetchone() != (None,)
            columns = conn.execute("SELECT column_name FROM pgsim.embedding ORDER BY 1").fetchall()
            assert columns == [("embedding",), ("embedding_next",)]  # the change is under way
        (printed,) = run_python(example("alembic-change-sync"), env)
        assert printed == "1 ['body', 'component', 'title']"


def test_quality_example_runs_as_written(database: str) -> None:
    code = example("quality")
    env = dict(os.environ, PGSIM_DSN=database)
    lines = run_python(code, env, timeout=600)
    hybrid, relevant, irrelevant, diverse, duplicates, labels = lines
    assert len(ast.literal_eval(hybrid)) == 3 and len(ast.literal_eval(diverse)) == 3
    assert 1 <= len(ast.literal_eval(relevant)) <= 10 and ast.literal_eval(irrelevant) == []
    assert len(ast.literal_eval(duplicates)) >= 2
    assert sum(ast.literal_eval(labels.removeprefix("Counter(").removesuffix(")")).values()) == 300
