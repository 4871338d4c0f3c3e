"""Attacks from a review of the standby and calibration changes: a primary's password in pg_basebackup's
command line (any local user reads it in /proc, and a timeout's message repeats it), a standby copy that
removes files it did not make, and a query log encoded unlike the queries it stands for."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.roles import Roles, acting

from pgsim.columns.adding import add_embedding
from pgsim.db.server import EmbeddedServer
from pgsim.encoding.encoder import encoder_for
from pgsim.errors import InvalidInput, ServerError
from pgsim.quality.index_calibration import query_log_vectors

SECRET = "s3cret-Passw0rd"


@pytest.fixture
def silent_primary() -> Iterator[int]:
    """A port that accepts connections and never answers (a primary that hangs)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


def spied_runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every subprocess.run of pgsim.db.server, as called (the real one still runs)."""
    calls: list[dict[str, Any]] = []
    real = subprocess.run

    def run(args: list[str], **options: Any) -> Any:
        calls.append({"args": list(args), **options})
        return real(args, **options)

    monkeypatch.setattr("pgsim.db.server.subprocess.run", run)
    return calls


def test_make_standby_keeps_the_primarys_password_off_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DSN went to pg_basebackup as ``-d postgresql://user:PASSWORD@...``: /proc/PID/cmdline shows it to
    every local user while the copy runs (minutes to hours), and a TimeoutExpired's message names the
    command, password included."""
    calls = spied_runs(monkeypatch)
    server = EmbeddedServer(tmp_path / "standby")
    dsn = f"postgresql://replicator:{SECRET}@127.0.0.1:1/postgres?connect_timeout=2"
    with pytest.raises(ServerError) as raised:
        server.make_standby(dsn, durable=False)
    basebackups = [call for call in calls if Path(call["args"][0]).name == "pg_basebackup"]
    assert basebackups, "pg_basebackup was not run"
    for call in basebackups:
        assert not any(SECRET in arg for arg in call["args"])
        assert (call.get("env") or {}).get("PGPASSWORD") == SECRET  # libpq still gets it, from the environment
    assert SECRET not in str(raised.value)


def test_make_standby_does_not_time_a_copy_out_after_five_minutes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, silent_primary: int
) -> None:
    """A base backup takes as long as the primary is big: the 300 s every other command of the server gets
    killed the copy of any primary past a few gigabytes (and its message carried the DSN). The connection's
    own connect_timeout bounds a primary that does not answer."""
    calls = spied_runs(monkeypatch)
    server = EmbeddedServer(tmp_path / "standby")
    with pytest.raises(ServerError):
        server.make_standby(f"host=127.0.0.1 port={silent_primary} connect_timeout=2 user=r", durable=False)
    basebackups = [call for call in calls if Path(call["args"][0]).name == "pg_basebackup"]
    assert basebackups and all(call.get("timeout") is None for call in basebackups)


def test_a_failed_standby_copy_removes_only_what_it_made(tmp_path: Path) -> None:
    """On a failed copy every file of the data directory was removed, those that were there before too (the
    check above it only looked for PG_VERSION)."""
    server = EmbeddedServer(tmp_path / "standby")
    server.pgdata.mkdir(parents=True)
    kept = server.pgdata / "notes.txt"
    kept.write_text("mine")
    with pytest.raises(ServerError):
        server.make_standby("host=127.0.0.1 port=1 connect_timeout=2 user=r", durable=False)
    assert kept.read_text() == "mine"


@pytest.fixture
def registered(shared: str, roles: Roles) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(shared, autocommit=True) as admin, acting(admin, roles.owner):
        admin.execute("DROP TABLE IF EXISTS logged")
        admin.execute("CREATE TABLE logged (id int PRIMARY KEY, body text)")
        add_embedding(admin, "logged", "embedding", source="body")
        yield admin


def test_a_query_log_is_encoded_as_the_queries_it_stands_for(registered: psycopg.Connection[Any]) -> None:
    """For a model with a query prefix (e5, bge, nomic: pgsim.encoding's PREFIXES), calibration measured
    documents, not queries: its curve is of another distribution than the searches that follow it."""
    encoder = encoder_for("all-MiniLM-L6-v2")
    saved = encoder.query_prefix
    encoder.query_prefix = "query: "  # the registered model, as one with a query prefix would be
    try:
        logged = query_log_vectors(registered, "logged", "embedding", ["fast json parser"])
        expected = encoder.encode_query("fast json parser")
    finally:
        encoder.query_prefix = saved
    assert float(np.abs(logged[0] - expected).max()) < 1e-5


def test_a_query_log_is_not_encoded_with_another_revision_of_the_model(
    registered: psycopg.Connection[Any], roles: Roles
) -> None:
    """A registration made with another revision of the model: its vectors do not compare with this one's, so
    a curve measured with this one's queries is wrong; searches refuse the text, calibration should too."""
    changed = registered.execute("UPDATE pgsim.embedding SET model_revision = 'another' WHERE table_name = 'logged'")
    assert changed.rowcount == 1
    with pytest.raises(InvalidInput, match="revision"):
        query_log_vectors(registered, "logged", "embedding", ["fast json parser"])


def test_a_long_query_log_is_sampled_before_it_is_encoded(registered: psycopg.Connection[Any]) -> None:
    """A log of every query users sent (thousands to millions of lines) was encoded whole, minutes to hours
    before the 60 s budget began, and a curve's first level then measured queries until the budget ran out."""
    from pgsim.quality.index_calibration import calibrate

    encoder = encoder_for("all-MiniLM-L6-v2")
    before = encoder.stats.texts
    log = [f"query number {i} about packages" for i in range(1500)]
    calibrate(registered, "logged", "embedding", queries=log, seconds=5, relevance=False)
    assert encoder.stats.texts - before <= 1000


def test_one_query_text_is_not_taken_for_a_log_of_its_characters(registered: psycopg.Connection[Any]) -> None:
    """calibrate(..., queries="queries.log"), the log file's path as the CLI's --query-log takes it (or one query
    without a space), encoded every character as a query of its own and measured the curve with them, without
    a word (a text with a space was refused only by chance: its space is a blank query)."""
    from pgsim.quality.index_calibration import calibrate

    encoder = encoder_for("all-MiniLM-L6-v2")
    before = encoder.stats.texts
    with pytest.raises(InvalidInput, match="quer"):
        calibrate(registered, "logged", "embedding", queries="queries.log", seconds=5, relevance=False)
    assert encoder.stats.texts == before
