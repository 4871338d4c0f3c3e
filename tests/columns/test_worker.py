"""Keeping embeddings in sync: the queue drained by sync/Worker/backfill, races with writers, failures,
dead letters, killed workers and lost connections. Real PostgreSQL, real model, real subprocesses."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.database import installed_without_registrations, packages_table
from fixtures.forks import PGSIM_CLI, ForkServer

from pgsim.columns.adding import add_embedding
from pgsim.columns.batches import SyncReport
from pgsim.columns.registry import registrations, remove_embedding
from pgsim.columns.worker import WORKER_APPLICATION_NAME, Worker, backfill, sync
from pgsim.db.catalog import is_local_host
from pgsim.demo.corpus import Package
from pgsim.encoding.encoder import Encoder, encoder_for
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.errors import InvalidInput
from pgsim.psycopg import register

SOURCE = "concat_ws(E'\\n\\n', synopsis, nullif(description, ''))"  # = Package.text
ROWS = 60  # enough for several batches on two lanes; each test encodes them
# Two fork servers, one per ``pgsim worker`` process that runs at the same time as the other: each child
# starts as ``python -m pgsim.cli`` does but without seconds of CPU importing torch (:mod:`fixtures.forks`),
# imported once per server for the module's tests instead of once per worker process.
WORKER_FORKS = tuple(
    ForkServer(("torch", "sentence_transformers", "tqdm", "psycopg", "pgsim", "pgsim.cli.main")) for _ in range(2)
)


@pytest.fixture(scope="module", autouse=True)
def _stop_forks() -> Iterator[None]:
    yield
    for forks in WORKER_FORKS:
        forks.stop()


@pytest.fixture
def pkgs(conn: psycopg.Connection[Any], packages: list[Package]) -> psycopg.Connection[Any]:
    """Table ``pkgs`` with the first ROWS sample packages, registered, every row queued, nothing embedded."""
    installed_without_registrations(conn)
    packages_table(conn, packages[:ROWS], ("section", "synopsis", "description"))
    add_embedding(conn, "pkgs", "embedding", source=SOURCE)
    register(conn)
    return conn


def stored(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """package -> its embedding as a numpy array (or None)."""
    rows = conn.execute("SELECT package, embedding FROM pkgs").fetchall()
    return {package: None if vector is None else np.asarray(vector.to_list()) for package, vector in rows}


def queued(conn: psycopg.Connection[Any]) -> int:
    return int(conn.execute("SELECT count(*) FROM pgsim.queue").fetchone()[0])  # type: ignore[index]


def assert_matches_encoder(
    conn: psycopg.Connection[Any], packages: list[Package], vectors: np.ndarray[Any, Any]
) -> None:
    """Every row holds exactly the vector the encoder gives for its text."""
    rows = stored(conn)
    expected = {p.package: v for p, v in zip(packages, vectors, strict=True) if p.package in rows}
    assert len(expected) == len(rows)
    for package, vector in rows.items():
        assert vector is not None, package
        assert float(np.abs(vector - expected[package]).max()) < 1e-5, package


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def encoding_backend(admin: psycopg.Connection[Any], application_name: str | None = None) -> int | None:
    """The pid of a sync connection that has read its batch's text and is encoding it (idle in transaction
    after the read), or None."""
    row = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE state = 'idle in transaction' AND query LIKE '%%LEFT JOIN LATERAL%%' "
        "AND (%s::text IS NULL OR application_name = %s) LIMIT 1",
        [application_name, application_name],
    ).fetchone()
    return int(row[0]) if row else None


def test_sync_embeds_every_queued_row_with_the_encoders_vector(
    pkgs: Any, packages: list[Package], package_vectors: Any
) -> None:
    assert queued(pkgs) == ROWS
    report = sync(pkgs, batch_size=25)
    assert (report.embedded, report.failed, report.stale, report.batches) == (ROWS, 0, 0, 3)
    assert report.encode_seconds > report.write_seconds > 0
    assert queued(pkgs) == 0
    assert_matches_encoder(pkgs, packages[:ROWS], package_vectors[:ROWS])
    assert sync(pkgs).batches == 0  # nothing left, nothing redone


def test_sync_with_a_second_connection_writes_one_batch_while_the_next_encodes(
    pkgs: Any, database: str, packages: list[Package], package_vectors: Any
) -> None:
    lanes: set[str] = set()
    with psycopg.connect(database, autocommit=True) as second:
        report = sync(
            pkgs, batch_size=20, overlap_with=second, progress=lambda r, t: lanes.add(threading.current_thread().name)
        )
    assert (report.embedded, report.failed, report.stale, report.batches) == (ROWS, 0, 0, ROWS // 20)
    assert len(lanes) == 2  # both connections claimed and wrote batches
    assert queued(pkgs) == 0
    assert_matches_encoder(pkgs, packages[:ROWS], package_vectors[:ROWS])


def test_losing_one_of_two_connections_mid_drain_loses_no_row(pkgs: Any, database: str) -> None:
    with psycopg.connect(database, autocommit=True) as second, psycopg.connect(database, autocommit=True) as admin:
        doomed = second.info.backend_pid

        def kill_second(report: SyncReport, total: int) -> None:
            if report.batches == 1:
                admin.execute("SELECT pg_terminate_backend(%s)", [doomed])

        with pytest.raises(psycopg.OperationalError):
            sync(pkgs, batch_size=10, overlap_with=second, progress=kill_second)
    assert 0 < queued(pkgs) < ROWS  # the other lane's batches landed; the lost batch rolled back
    embedded = pkgs.execute("SELECT count(*) FROM pkgs WHERE embedding IS NOT NULL").fetchone()[0]
    assert embedded + queued(pkgs) == ROWS
    left = queued(pkgs)
    assert sync(pkgs).embedded == left and queued(pkgs) == 0
    assert all(vector is not None for vector in stored(pkgs).values())


def test_an_error_in_one_lane_stops_the_other_after_its_batch(pkgs: Any, database: str) -> None:
    def failing_progress(report: SyncReport, total: int) -> None:
        if report.batches == 2:
            raise RuntimeError("the progress display is gone")

    with psycopg.connect(database, autocommit=True) as second, pytest.raises(RuntimeError, match="display is gone"):
        sync(pkgs, batch_size=10, overlap_with=second, progress=failing_progress)
    embedded = pkgs.execute("SELECT count(*) FROM pkgs WHERE embedding IS NOT NULL").fetchone()[0]
    assert 20 <= embedded <= 40 and embedded + queued(pkgs) == ROWS  # not drained on by the other lane


def test_overlap_with_must_reach_the_same_database(pkgs: Any, database: str) -> None:
    pkgs.execute("DROP DATABASE IF EXISTS pgsim_elsewhere")
    pkgs.execute("CREATE DATABASE pgsim_elsewhere")
    elsewhere = psycopg.conninfo.make_conninfo(database, dbname="pgsim_elsewhere")
    try:
        with psycopg.connect(elsewhere, autocommit=True) as other, pytest.raises(InvalidInput, match="same one"):
            sync(pkgs, overlap_with=other)
    finally:
        pkgs.execute("DROP DATABASE pgsim_elsewhere")
    assert queued(pkgs) == ROWS


@pytest.mark.parametrize(("overlap", "connections"), [(None, 2), (True, 3), (False, 2)])
def test_the_worker_opens_a_second_work_connection_only_for_a_remote_database_unless_told(
    pkgs: Any, database: str, overlap: bool | None, connections: int
) -> None:
    worker = Worker(database, overlap=overlap, poll_interval=600)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: queued(pkgs) == 0, timeout=120)
        count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        assert pkgs.execute(count, [WORKER_APPLICATION_NAME]).fetchone() == (connections,)
    finally:
        worker.stop.set()
        thread.join(timeout=30)
    assert worker.report.embedded == ROWS


def test_remote_means_neither_a_socket_nor_loopback() -> None:
    assert [is_local_host(h) for h in ("/tmp/pg", "localhost", "127.0.0.1", "::1", "")] == [True] * 5
    assert [is_local_host(h) for h in ("db.internal", "10.0.0.7", "2001:db8::1")] == [False] * 3


def test_empty_text_and_deleted_rows_end_their_entries(pkgs: Any) -> None:
    sync(pkgs)
    pkgs.execute("UPDATE pkgs SET synopsis = '', description = NULL WHERE package = %s", [first(pkgs)])
    pkgs.execute("INSERT INTO pkgs (package, synopsis) VALUES ('gone-soon', 'a row deleted before its turn')")
    pkgs.execute("DELETE FROM pkgs WHERE package = 'gone-soon'")
    pkgs.execute("INSERT INTO pkgs (package, synopsis) VALUES ('blank', '   ')")
    report = sync(pkgs)
    # the insert trigger queues 'blank' too (it cannot evaluate the source); the worker ends it unencoded
    assert (report.emptied, report.missing, report.embedded) == (2, 1, 0)
    assert queued(pkgs) == 0
    assert stored(pkgs)[first(pkgs)] is None  # the old text's vector is gone with the text
    assert pkgs.execute("SELECT count(*) FROM pgsim.dead_letter").fetchone() == (0,)


def first(conn: psycopg.Connection[Any]) -> str:
    return str(conn.execute("SELECT min(package) FROM pkgs").fetchone()[0])  # type: ignore[index]


def test_very_long_text_is_truncated_like_the_encoder_does(pkgs: Any, encoder: Encoder) -> None:
    sync(pkgs)
    long_text = " ".join(f"word{i}" for i in range(5000))
    pkgs.execute("INSERT INTO pkgs (package, synopsis) VALUES ('long', %s)", [long_text])
    assert sync(pkgs).embedded == 1
    expected = encoder.encode([long_text])[0]
    assert float(np.abs(stored(pkgs)["long"] - expected).max()) < 1e-5


def test_a_row_changed_while_its_batch_encodes_ends_with_its_new_texts_vector(
    pkgs: Any, database: str, encoder: Encoder
) -> None:
    target = first(pkgs)
    reports: list[SyncReport] = []
    with psycopg.connect(database, autocommit=True, application_name="racing sync") as worker_conn:
        thread = threading.Thread(target=lambda: reports.append(sync(worker_conn, batch_size=ROWS)))
        thread.start()
        wait_for(lambda: encoding_backend(pkgs, "racing sync") is not None)
        pkgs.execute(
            "UPDATE pkgs SET synopsis = 'a completely new text about chess engines' WHERE package = %s", [target]
        )
        still_encoding = encoding_backend(pkgs, "racing sync") is not None
        thread.join()
    # the writer's UPDATE returned while the worker still held its batch: writers never wait for workers
    assert still_encoding, "the update should land while the batch is being encoded"
    # the first batch skipped the changed row (its text no longer hashed as read) and kept its entry; the
    # second batch took the entry again and encoded the new text
    assert (reports[0].stale, reports[0].embedded, reports[0].batches) == (1, ROWS, 2)
    assert queued(pkgs) == 0
    new_text = pkgs.execute(
        f"SELECT {SOURCE} FROM pkgs WHERE package = %s",  # noqa: S608 - constant test expression
        [target],
    ).fetchone()[0]
    expected = encoder.encode([new_text])[0]
    assert float(np.abs(stored(pkgs)[target] - expected).max()) < 1e-5


def test_failures_back_off_then_go_to_dead_letters_and_can_be_requeued(pkgs: Any) -> None:
    sync(pkgs)
    with pytest.raises(psycopg.errors.DependentObjectsStillExist):  # the update trigger guards its column
        pkgs.execute("ALTER TABLE pkgs DROP COLUMN description")
    pkgs.execute("ALTER TABLE pkgs DROP COLUMN description CASCADE")
    pkgs.execute("INSERT INTO pkgs (package, synopsis) VALUES ('after-drop', 'queued by the insert trigger')")
    first_try = sync(pkgs, max_attempts=2, retry_delay=60)
    assert (first_try.failed, first_try.dead) == (1, 0)
    attempts, error, waits = pkgs.execute(
        "SELECT attempts, last_error, not_before > now() + interval '50 seconds' FROM pgsim.queue"
    ).fetchone()
    assert attempts == 1 and waits and 'column "description" does not exist' in error and "Restore it" in error
    assert sync(pkgs, max_attempts=2).batches == 0  # backing off: not retried yet
    pkgs.execute("UPDATE pgsim.queue SET not_before = now() - interval '1 second'")
    second_try = sync(pkgs, max_attempts=2)
    assert (second_try.failed, second_try.dead) == (0, 1)
    status = pkgs.execute("SELECT queued, dead_letters FROM pgsim.sync_status").fetchone()
    assert status == (0, 1)
    assert pkgs.execute("SELECT pgsim.requeue_dead_letters()").fetchone() == (1,)
    assert queued(pkgs) == 1


def test_one_bad_row_does_not_take_its_batch_to_the_dead_letters(pkgs: Any) -> None:
    """A failing batch is retried row by row: only the row that fails again is buried."""
    sync(pkgs)
    pkgs.execute("CREATE FUNCTION fussy(t text) RETURNS text LANGUAGE plpgsql AS $$ BEGIN "
                 "IF t LIKE '%poison%' THEN RAISE EXCEPTION 'cannot read %', t; END IF; RETURN t; END $$")  # fmt: skip
    remove_embedding(pkgs, "pkgs", "embedding")
    add_embedding(pkgs, "pkgs", "embedding", source="public.fussy(synopsis)", queue_existing=False)
    pkgs.execute("INSERT INTO pkgs (package, synopsis) VALUES ('a', 'fine'), ('b', 'poison'), ('c', 'also fine')")
    report = sync(pkgs, max_attempts=2, retry_delay=60)  # the healthy rows are retried at once, alone
    assert (report.embedded, report.dead) == (2, 1)
    dead = pkgs.execute("SELECT key, last_error FROM pgsim.dead_letter").fetchone()
    assert dead[0] == {"package": "b"} and "cannot read poison" in dead[1]


def test_backfill_resumes_after_an_interrupt_and_encodes_each_row_once(
    pkgs: Any, packages: list[Package], package_vectors: Any
) -> None:
    stop = threading.Event()
    worker_encoder = encoder_for(DEFAULT_MODEL)  # the process-wide encoder sync uses
    encoded_before = worker_encoder.stats.encoded

    def interrupt_after_two_batches(report: SyncReport, total: int) -> None:
        assert total == ROWS
        if report.batches == 2:
            stop.set()

    first_run = backfill(pkgs, "pkgs", batch_size=15, progress=interrupt_after_two_batches, stop=stop)
    assert first_run.embedded == 30 and queued(pkgs) == ROWS - 30
    second_run = backfill(pkgs, "pkgs", "embedding", batch_size=15)
    assert second_run.embedded == ROWS - 30 and queued(pkgs) == 0
    assert worker_encoder.stats.encoded - encoded_before == ROWS  # interrupted work was not redone
    assert_matches_encoder(pkgs, packages[:ROWS], package_vectors[:ROWS])


def worker_command(database: str, *arguments: str) -> list[str]:
    return [sys.executable, "-m", "pgsim.cli", "--dsn", database, "worker", *arguments]


def forked_children(forks: ForkServer) -> list[int]:
    """The pids of the processes ``forks``'s server is running now (Linux's /proc); none before it started."""
    if forks.process is None:
        return []
    tasks = Path(f"/proc/{forks.process.pid}/task")
    return [int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()]


@pytest.mark.parametrize("route", ["one DSN", "own DSNs"])
def test_two_worker_processes_share_the_queue_without_encoding_a_row_twice(
    pkgs: Any, database: str, route: str, request: pytest.FixtureRequest
) -> None:
    """Two ``pgsim worker --once`` processes on one queue: with one DSN, and as workers on two hosts would run,
    each with its own (the Unix socket, and TCP through PgBouncer in transaction pooling)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    dsns = [database, database if route == "one DSN" else request.getfixturevalue("pgbouncer_dsn")]
    done: dict[int, tuple[int, str, str]] = {}

    def run_worker(number: int, dsn: str) -> None:  # a process of its own, forked from a preloaded one
        argv = worker_command(dsn, "--once", "--batch-size", "8")[3:]  # what follows `python -m pgsim.cli`
        done[number] = WORKER_FORKS[number].run(PGSIM_CLI, environment, timeout=300, argv=argv)

    workers = [threading.Thread(target=run_worker, args=(number, dsn)) for number, dsn in enumerate(dsns)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    outputs = [done[number][1] for number in range(len(dsns))]
    assert len(done) == 2 and all(status == 0 for status, _, _ in done.values()), done
    embedded = [int(output.strip().splitlines()[-1].split(" rows embedded")[0]) for output in outputs]
    assert sum(embedded) == ROWS, outputs  # each queued row encoded by exactly one worker
    assert queued(pkgs) == 0 and all(vector is not None for vector in stored(pkgs).values())


def test_a_worker_killed_mid_batch_loses_nothing(
    pkgs: Any, database: str, packages: list[Package], package_vectors: Any
) -> None:
    forks, ended = WORKER_FORKS[0], []
    argv = worker_command(database, "--batch-size", "20")[3:]  # what follows `python -m pgsim.cli`
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    worker = threading.Thread(target=lambda: ended.append(forks.run(PGSIM_CLI, environment, timeout=300, argv=argv)))
    worker.start()  # a `pgsim worker` process of its own, forked from a preloaded one
    try:
        wait_for(lambda: encoding_backend(pkgs, WORKER_APPLICATION_NAME) is not None, timeout=120)
        done_before_kill = ROWS - queued(pkgs)
        (child,) = forked_children(forks)
        os.kill(child, signal.SIGKILL)
        worker.join(timeout=30)
    finally:
        for child in forked_children(forks):
            os.kill(child, signal.SIGKILL)
        worker.join(timeout=30)
    assert ended and ended[0][0] == -signal.SIGKILL  # the worker process died of the SIGKILL
    wait_for(lambda: encoding_backend(pkgs, WORKER_APPLICATION_NAME) is None)  # the server saw it go
    assert queued(pkgs) == ROWS - done_before_kill  # the batch in flight is still queued
    assert sum(vector is not None for vector in stored(pkgs).values()) == done_before_kill
    assert sync(pkgs).embedded == ROWS - done_before_kill
    assert_matches_encoder(pkgs, packages[:ROWS], package_vectors[:ROWS])


def test_worker_reconnects_when_the_database_drops_its_connection_mid_batch(pkgs: Any, database: str) -> None:
    worker = Worker(database, batch_size=40, reconnect_delay=0.1, poll_interval=0.2)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(lambda: encoding_backend(pkgs, WORKER_APPLICATION_NAME) is not None)
        pid = encoding_backend(pkgs, WORKER_APPLICATION_NAME)
        pkgs.execute("SELECT pg_terminate_backend(%s)", [pid])
        wait_for(lambda: queued(pkgs) == 0, timeout=120)
        pkgs.execute("INSERT INTO pkgs (package, synopsis) VALUES ('late', 'woken by NOTIFY after the reconnect')")
        wait_for(lambda: stored(pkgs)["late"] is not None)
    finally:
        worker.stop.set()
        thread.join(timeout=30)
    assert worker.reconnects >= 1
    assert worker.report.embedded >= 1
    assert all(vector is not None for vector in stored(pkgs).values())


def test_worker_wakes_on_notify_and_polls_for_what_it_missed(pkgs: Any, database: str) -> None:
    sync(pkgs)
    listening = Worker(database, poll_interval=600)  # only a NOTIFY can wake it within the test's time
    thread = threading.Thread(target=listening.run)
    thread.start()
    try:
        wait_for(
            lambda: pkgs.execute("SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN pgsim'").fetchone()[0]
        )
        pkgs.execute("INSERT INTO pkgs (package, synopsis) VALUES ('notified', 'woken by the trigger')")
        wait_for(lambda: stored(pkgs)["notified"] is not None, timeout=60)
    finally:
        listening.stop.set()
        thread.join(timeout=30)
    # an entry that arrives without a notification (queued by hand here) is found by the poll
    pkgs.execute("ALTER TABLE pkgs DISABLE TRIGGER USER")
    pkgs.execute("INSERT INTO pkgs (package, synopsis) VALUES ('unannounced', 'no trigger, no NOTIFY')")
    pkgs.execute("ALTER TABLE pkgs ENABLE TRIGGER USER")
    pkgs.execute(
        "INSERT INTO pgsim.queue (embedding_id, key, reason) SELECT id, '{\"package\": \"unannounced\"}', 'test' "
        "FROM pgsim.embedding"
    )
    polling = Worker(database, poll_interval=0.3)
    thread = threading.Thread(target=polling.run)
    thread.start()
    try:
        wait_for(lambda: stored(pkgs)["unannounced"] is not None, timeout=60)
    finally:
        polling.stop.set()
        thread.join(timeout=30)


def test_sync_needs_an_autocommit_connection(pkgs: Any, database: str) -> None:
    with psycopg.connect(database) as conn, pytest.raises(InvalidInput, match="autocommit"):
        sync(conn)
    with psycopg.connect(database) as conn, pytest.raises(InvalidInput, match="autocommit"):
        sync(pkgs, overlap_with=conn)
    with pytest.raises(InvalidInput, match="a second connection"):
        sync(pkgs, overlap_with=pkgs)
    assert queued(pkgs) == ROWS


def test_a_writer_that_clears_the_embedding_or_moves_a_queued_row_requeues_it(pkgs: Any) -> None:
    sync(pkgs)
    target = first(pkgs)
    pkgs.execute("UPDATE pkgs SET embedding = NULL WHERE package = %s", [target])
    pkgs.execute("INSERT INTO pkgs (package, synopsis) VALUES ('before-move', 'queued, then renamed')")
    pkgs.execute("UPDATE pkgs SET package = 'after-move' WHERE package = 'before-move'")
    keys = sorted(key["package"] for (key,) in pkgs.execute("SELECT key FROM pgsim.queue").fetchall())
    assert keys == sorted(["after-move", "before-move", target])
    report = sync(pkgs)
    assert (report.embedded, report.missing) == (2, 1)
    assert stored(pkgs)[target] is not None and stored(pkgs)["after-move"] is not None


def test_a_renamed_table_keeps_its_registration(pkgs: Any) -> None:
    sync(pkgs)
    pkgs.execute("ALTER TABLE pkgs RENAME TO packages_renamed")
    try:
        pkgs.execute("INSERT INTO packages_renamed (package, synopsis) VALUES ('renamed', 'still in sync')")
        assert sync(pkgs).embedded == 1
        assert [r.table for r in registrations(pkgs)] == ["public.packages_renamed"]
    finally:
        pkgs.execute("ALTER TABLE packages_renamed RENAME TO pkgs")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"poll_interval": 0}, "poll_interval must be"),
        ({"poll_interval": -1.0}, "poll_interval must be"),
        ({"poll_interval": float("nan")}, "poll_interval must be"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"batch_size": 2.5}, "batch_size must be"),
    ],
)
def test_a_worker_that_would_spin_or_never_claim_is_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        Worker("postgresql:///nowhere", **options)


def test_deadlocks_and_serialization_failures_are_retried_not_counted_against_the_rows() -> None:
    import psycopg

    from pgsim.columns.batches import TRANSIENT

    for error in (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
        assert issubclass(error, TRANSIENT)
