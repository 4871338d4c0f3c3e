"""The pgsim command, run as a user runs it (``python -m pgsim.cli`` in a process of its own), against the
test database. The processes are forked from one that imported torch, sentence-transformers and pgsim
already (:mod:`fixtures.forks`): each would otherwise spend seconds of CPU on those imports."""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fixtures.forks import PGSIM_CLI, ForkServer

from pgsim.cli.common import format_table
from pgsim.cli.main import main

FORKS = ForkServer(("torch", "sentence_transformers", "tqdm", "psycopg", "pgsim", "pgsim.cli.main"))


@pytest.fixture(scope="module", autouse=True)
def _stop_forks() -> Iterator[None]:
    yield
    FORKS.stop()


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m pgsim.cli ARGS`` with ``env``, forked from :data:`FORKS`."""
    returncode, stdout, stderr = FORKS.run(PGSIM_CLI, env, timeout=600, argv=args)
    return subprocess.CompletedProcess(["pgsim", *args], returncode, stdout, stderr)


def pgsim(*args: str, dsn: str | None = None, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PGSIM_DSN", None)
    if home is not None:
        env["PGSIM_HOME"] = str(home)
    return run_cli((["--dsn", dsn] if dsn else []) + list(args), env)


def test_demo_loads_encodes_indexes_searches_then_reuses(database: str) -> None:
    first = pgsim("demo", "--rows", "150", dsn=database)
    assert first.returncode == 0, first.stderr
    assert "150 rows loaded now; 150 embedded now" in first.stdout
    assert "HNSW index built" in first.stdout
    assert "filter: section = 'games'" in first.stdout
    assert "embedding: 100%" in first.stderr and "150/150" in first.stderr  # the progress bar
    second = pgsim("demo", "--rows", "150", dsn=database)
    assert second.returncode == 0, second.stderr
    assert "0 rows loaded now; 0 embedded now; HNSW index already there" in second.stdout
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*), count(embedding) FROM pgsim_demo.packages").fetchone() == (150, 150)
        assert conn.execute("SELECT to_regclass('pgsim_demo.packages_embedding_hnsw')").fetchone() is not None


def test_install_status_search(database: str) -> None:
    assert pgsim("demo", "--rows", "150", dsn=database).returncode == 0
    installed = pgsim("install", dsn=database)
    assert installed.returncode == 0 and "pgsim schema up to date" in installed.stdout
    assert installed.stdout.startswith("pgsim schema up to date")  # nothing new to apply
    status = pgsim("status", dsn=database)
    assert status.returncode == 0, status.stderr
    assert "pgvector 0.8" in status.stdout and "SQL files applied" in status.stdout
    with psycopg.connect(database) as conn:
        section, count = conn.execute(
            "SELECT section, count(*) FROM pgsim_demo.packages GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1"
        ).fetchone()  # type: ignore[misc]
    assert count >= 3
    found = pgsim("search", "a small utility", "-k", "3", "--filter", f"section={section}", dsn=database)
    assert found.returncode == 0, found.stderr
    *table, trailer = found.stdout.strip().splitlines()
    assert trailer.startswith("3 rows in")
    assert len(table) == 5 and all(f" {section} " in line for line in table[2:])
    doctor = pgsim("doctor", "a small utility", "--filter", f"section={section}", dsn=database)
    assert doctor.returncode == 0, doctor.stderr
    assert doctor.stdout.startswith("encoder: all-MiniLM-L6-v2 on backend torch (requested); ")  # PGSIM_BACKEND
    assert "forward pass" in doctor.stdout.splitlines()[0] and doctor.stdout.splitlines()[1].startswith("path: ")


def test_add_embedding_backfill_worker_status_remove(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, title text, body text)")
        conn.execute("INSERT INTO notes VALUES (1, 'json', 'parse JSON fast'), (2, 'chess', 'play chess')")
    added = pgsim("add-embedding", "notes", "embedding", "--source", "title", "body", "--m", "8", dsn=database)
    assert added.returncode == 0, added.stderr
    assert "public.notes.embedding: vector(384)" in added.stdout and "2 existing rows queued" in added.stdout
    status = pgsim("status", dsn=database)
    assert status.returncode == 0, status.stderr
    line = next(line for line in status.stdout.splitlines() if line.startswith("public.notes.embedding"))
    assert line.split()[1:5] == ["all-MiniLM-L6-v2", "2", "0", "0"]  # queued, retrying, dead letters
    filled = pgsim("backfill", dsn=database)
    assert filled.returncode == 0, filled.stderr
    assert "2 rows embedded" in filled.stdout and "2/2" in filled.stderr  # summary, and the bar with its rate
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("INSERT INTO notes VALUES (3, 'images', 'resize images')")
    worker = pgsim("worker", "notes", "--once", dsn=database)
    assert worker.returncode == 0, worker.stderr
    assert worker.stdout.strip().splitlines()[-1].startswith("1 rows embedded")
    with psycopg.connect(database, autocommit=True) as conn:  # 40 rows for two worker processes
        conn.execute("UPDATE notes SET embedding = NULL")
        conn.execute("INSERT INTO notes SELECT n, 'topic ' || n, 'note number ' || n FROM generate_series(4, 40) n")
    pooled = pgsim("backfill", "notes", "embedding", "--processes", "2", "--batch-size", "8", "--cache", dsn=database)
    assert pooled.returncode == 0, pooled.stderr
    assert "40 queued rows done by 2 processes" in pooled.stdout and "40/40" in pooled.stderr
    assert pooled.stdout.count("rows embedded") == 2  # each worker's own summary
    with psycopg.connect(database, autocommit=True) as conn:  # the workers filled the cache: nothing to encode
        assert conn.execute("SELECT count(*) FROM pgsim.embedding_cache").fetchone() == (40,)
        conn.execute("UPDATE notes SET embedding = NULL")
    cached = pgsim("backfill", "notes", "--cache", dsn=database)
    assert cached.returncode == 0, cached.stderr
    assert "40 rows embedded" in cached.stdout and "40 texts came from the cache" in cached.stdout
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM notes WHERE embedding IS NULL").fetchone() == (0,)
    assert pgsim("worker", "--processes", "0", dsn=database).returncode == 2
    removed = pgsim("remove-embedding", "notes", "embedding", dsn=database)
    assert removed.returncode == 0, removed.stderr
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM pgsim.embedding WHERE table_name = 'notes'").fetchone() == (0,)
        assert conn.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'notes'"
        ).fetchone() == (3,)
    again = pgsim("remove-embedding", "notes", "embedding", dsn=database)
    assert again.returncode == 2 and "is not a registered embedding column" in again.stderr


def test_add_embedding_with_bit_storage_and_search_from_the_shell(database: str) -> None:
    """--dtype bit: full vectors in the column, the binary index pgsim searches by re-ranked candidates."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE bit_notes (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO bit_notes VALUES (1, 'bake sourdough bread'), (2, 'configure a firewall')")
    added = pgsim("add-embedding", "bit_notes", "embedding", "--source", "body", "--dtype", "bit", dsn=database)
    assert added.returncode == 0, added.stderr
    assert "public.bit_notes.embedding: vector(384) with a bit index of" in added.stdout, added.stdout
    assert pgsim("backfill", "bit_notes", dsn=database).returncode == 0
    found = pgsim("search", "baking bread", "--table", "bit_notes", "-k", "1", dsn=database)
    assert found.returncode == 0, found.stderr
    assert "sourdough" in found.stdout
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT pgsim.bit_index('bit_notes', 'embedding')").fetchone() == (
            "bit_notes_embedding_hnsw",
        )
    assert pgsim("remove-embedding", "bit_notes", "embedding", dsn=database).returncode == 0


def test_add_embedding_with_prefix_storage_and_search_from_the_shell(database: str) -> None:
    """--prefix 64 with a Matryoshka-trained model: full vectors in the column, an index of their first 64
    values; a prefix the model was not trained for is one line that says which it was."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE TABLE prefix_notes (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO prefix_notes VALUES (1, 'bake sourdough bread'), (2, 'configure a firewall')")
    command = ("add-embedding", "prefix_notes", "embedding", "--source", "body", "--model", "wordllama-l2-supercat")
    refused = pgsim(*command, "--prefix", "100", dsn=database)
    assert refused.returncode == 2 and "was trained for prefixes of 64, 128 dimensions" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    added = pgsim(*command, "--prefix", "64", dsn=database)
    assert added.returncode == 0, added.stderr
    assert "vector(256) with an index of their first 64 values of" in added.stdout, added.stdout
    assert pgsim("backfill", "prefix_notes", dsn=database).returncode == 0
    found = pgsim("search", "baking bread", "--table", "prefix_notes", "-k", "1", dsn=database)
    assert found.returncode == 0 and "sourdough" in found.stdout, found.stderr
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT pgsim.prefix_index('prefix_notes', 'embedding')").fetchone() == (
            "prefix_notes_embedding_hnsw",
        )
    assert pgsim("remove-embedding", "prefix_notes", "embedding", dsn=database).returncode == 0


def test_errors_are_one_line_with_what_to_do(database: str) -> None:
    bad = pgsim("search", "x", "--filter", "nosuchcolumn=1", dsn=database)
    assert bad.returncode == 2
    assert bad.stderr.startswith("pgsim: ") and "check its column names" in bad.stderr
    unreachable = pgsim("status", dsn="postgresql://nobody@/none?host=/nonexistent-socket-dir")
    assert unreachable.returncode == 2 and "Cannot connect to PostgreSQL" in unreachable.stderr


def test_embedded_server_is_the_default(tmp_path: Path) -> None:
    home = tmp_path / "home"
    try:
        started = pgsim("server", "start", home=home)
        assert started.returncode == 0, started.stderr
        status = pgsim("status", home=home)
        assert status.returncode == 0, status.stderr
        assert f"embedded server: {home} - running" in status.stdout
        assert "PostgreSQL 18" in status.stdout
    finally:
        stopped = pgsim("server", "stop", home=home)
    assert stopped.stdout.strip() == "stopped"
    assert pgsim("server", "status", home=home).stdout.startswith("not running")


@pytest.mark.parametrize(
    ("cell", "shown"), [(0.123456, "0.1235"), (None, ""), ("a\nb", "a b"), ("x" * 70, "x" * 59 + "…")]
)
def test_format_table_cells(cell: object, shown: str) -> None:
    lines = format_table(["h"], [[cell]]).splitlines()
    assert lines[2].rstrip() == shown


def test_dsn_after_the_command_and_bad_arguments(database: str) -> None:
    after = run_cli(["status", "--dsn", database], dict(os.environ))
    assert after.returncode == 0, after.stderr
    assert "pgvector 0.8" in after.stdout
    for option, value in [("--poll-interval", "0"), ("--poll-interval", "-1"), ("--batch-size", "0")]:
        refused = pgsim("worker", option, value, dsn=database)
        assert refused.returncode == 2 and f"argument {option}: must be" in refused.stderr


def test_a_query_that_is_not_utf8_is_a_clear_error(database: str) -> None:
    assert pgsim("demo", "--rows", "150", dsn=database).returncode == 0
    env = {key: value for key, value in os.environ.items() if key != "PGSIM_DSN"}
    # what Python makes of the bytes when it decodes argv (surrogateescape), as a process started with them has
    found = run_cli(["--dsn", database, "search", os.fsdecode(b"\xff\xfe parser")], env)
    assert found.returncode == 2
    assert "pgsim: Text #0 is not valid Unicode" in found.stderr and "Traceback" not in found.stderr


def test_encoder_says_which_backend_runs_the_model_here(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["encoder"]) == 0  # the suite pins PGSIM_BACKEND=torch (tests/conftest.py)
    assert capsys.readouterr().out.startswith("encoder: all-MiniLM-L6-v2 on backend torch (")
    assert main(["encoder", "--model", "/no/such/model"]) == 2
    assert "Cannot load model '/no/such/model'" in capsys.readouterr().err
