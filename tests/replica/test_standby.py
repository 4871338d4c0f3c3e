"""pgsim on a hot standby: a real streaming replica of the session's server, made with the embedded server's
own ``pg_basebackup -R`` (and a replication slot), started from a temporary directory with a socket of its
own. Every read path runs there and returns what the primary returns once the standby has replayed; every
write path says it must run on the primary and writes nothing; rows the worker embeds on the primary, and a
model switch, reach the standby's searches by replay.

The roles are the shared-database ones (tests/fixtures/roles.py): a non-superuser owner who installs pgsim
and owns the table, an application role that searches and a worker role that embeds, each acting through
``SET ROLE`` on a superuser connection (the roles are replicated with the cluster)."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fixtures.alembic_project import sqlalchemy_url
from fixtures.database import scratch_database
from fixtures.roles import Roles, acting
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy import String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pgsim.columns.adding import add_embedding
from pgsim.columns.bulk_load import ingest
from pgsim.columns.grants import grant
from pgsim.columns.model_change import change_model
from pgsim.columns.registry import remove_embedding
from pgsim.columns.worker import Worker, backfill, sync
from pgsim.db.connection import connect
from pgsim.db.schema import install
from pgsim.db.server import PORT, EmbeddedServer
from pgsim.demo.corpus import Package
from pgsim.errors import InstallError, PgsimError, ReadOnlyStandby
from pgsim.knn.filtered import explain, search, search_with_plan
from pgsim.knn.planner import Tuning, plan
from pgsim.psycopg import Text, register
from pgsim.quality.diversity import diverse_search
from pgsim.quality.duplicates import near_duplicates
from pgsim.quality.hubness import corrected_search, set_query_bank
from pgsim.quality.hybrid import hybrid_search
from pgsim.quality.index_calibration import calibrate
from pgsim.quality.labels import label_rows
from pgsim.quality.relevance import relevant_search
from pgsim.sqlalchemy import Embedding

REPLAY_TIMEOUT = 30.0
SLOT_PREFIX = "pgsim_test_standby_"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class Replica:
    primary: str  # the module database's DSN on the primary (superuser)
    standby: str  # the same database on the standby (superuser)

    def wait_for_replay(self, timeout: float = REPLAY_TIMEOUT) -> None:
        """Return once the standby has replayed everything the primary has written so far."""
        wait_for_replay(self.primary, self.standby, timeout)


def wait_for_replay(primary: str, standby: str, timeout: float = REPLAY_TIMEOUT) -> None:
    with psycopg.connect(primary, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        assert row is not None
        target = row[0]
    deadline = time.monotonic() + timeout
    with psycopg.connect(standby, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [target]).fetchone()
            if row is not None and row[0]:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the standby has not replayed {target} after {timeout:.0f}s")
            time.sleep(0.02)


def _local_or_skip(server_dsn: str) -> None:
    """pg_basebackup copies the primary's files onto this machine and the embedded server's binaries run the
    copy: a server elsewhere, or of another major version, cannot be replicated here."""
    host = conninfo_to_dict(server_dsn).get("host") or ""
    if host and not host.startswith("/") and host not in LOCAL_HOSTS:
        pytest.skip(f"the test server ({host}) is not on this machine: its standby cannot be made here")
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        major = conn.info.server_version // 10000
    if major != 18:
        pytest.skip(f"the test server is PostgreSQL {major}; the embedded server that runs the standby is 18")


def _allow_replication(conn: psycopg.Connection[Any]) -> None:
    """The primary's settings a streaming standby needs (PostgreSQL's defaults give them)."""
    wal_level, senders, slots = (
        conn.execute(f"SELECT current_setting('{name}')").fetchone()[0]  # type: ignore[index]
        for name in ("wal_level", "max_wal_senders", "max_replication_slots")
    )
    if wal_level == "minimal" or int(senders) < 1 or int(slots) < 1:
        pytest.fail(
            f"the test server has wal_level={wal_level}, max_wal_senders={senders}, max_replication_slots={slots}: "
            "a standby needs wal_level=replica and at least one of each (PostgreSQL's defaults)"
        )
    rules = conn.execute("SELECT count(*) FROM pg_hba_file_rules WHERE 'replication' = ANY(database)").fetchone()
    if rules is not None and rules[0] == 0:
        # a replication line for local connections, with the authentication the server's first local rule uses
        method = conn.execute(
            "SELECT coalesce((SELECT auth_method FROM pg_hba_file_rules WHERE type = 'local' ORDER BY rule_number "
            "LIMIT 1), 'trust')"
        ).fetchone()
        hba = Path(conn.execute("SELECT current_setting('hba_file')").fetchone()[0])  # type: ignore[index]
        with hba.open("a") as handle:
            handle.write(f"\nlocal replication all {method[0] if method else 'trust'}\n")
        conn.execute("SELECT pg_reload_conf()")


@pytest.fixture(scope="module")
def standby_server(server_dsn: str) -> Iterator[str]:
    """A hot standby of the session's server, streaming through a replication slot; its superuser DSN."""
    _local_or_skip(server_dsn)
    slot = f"{SLOT_PREFIX}{uuid.uuid4().hex[:8]}"
    directory = Path(tempfile.mkdtemp(prefix="pgsim-test-standby-"))
    server = EmbeddedServer(directory)
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        _allow_replication(conn)
        conn.execute(  # a killed run's slot would keep the primary's WAL for ever
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name LIKE %s AND NOT active",
            [f"{SLOT_PREFIX}%"],
        )
    try:
        server.make_standby(server_dsn, slot=slot, durable=False)
        running = server.start()
        yield make_conninfo(server_dsn, host=str(running.socket_dir), port=str(PORT), dbname="postgres")
    finally:
        server.stop()
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", [slot]
            )
        shutil.rmtree(directory, ignore_errors=True)


ROWS = 120
QUERY = "compress files into an archive"


class Base(DeclarativeBase):
    pass


class Pkg(Base):
    __tablename__ = "pkgs"
    package: Mapped[str] = mapped_column(String, primary_key=True)
    section: Mapped[str] = mapped_column(String)
    embedding = mapped_column(Embedding(384, "all-MiniLM-L6-v2"))


def login(dsn: str, role: str) -> psycopg.Connection[Any]:
    """A connection that logs in as ``role`` itself (a worker refuses a session that may become a superuser)."""
    conn = psycopg.connect(make_conninfo(dsn, user=role), autocommit=True)
    register(conn)
    return conn


def make_table(admin: psycopg.Connection[Any], roles: Roles, name: str, rows: list[tuple[str, str, str]]) -> None:
    """``name`` (the owner's): package, section, synopsis and a full-text column holding ``rows``; registered,
    searchable by the application role, worked by the worker role."""
    table = sql.Identifier(name)
    with acting(admin, roles.owner):
        admin.execute(
            sql.SQL(
                "CREATE TABLE {} (package text PRIMARY KEY, section text, synopsis text, "
                "fts tsvector GENERATED ALWAYS AS (to_tsvector('english', coalesce(synopsis, ''))) STORED)"
            ).format(table)
        )
        with admin.cursor() as cur:
            cur.executemany(
                sql.SQL("INSERT INTO {} (package, section, synopsis) VALUES (%s, %s, %s)").format(table),
                rows,
            )
        add_embedding(admin, name, "embedding", source="synopsis", queue_existing=True)
        grant(admin, "worker", roles.worker, tables=[name])
        grant(admin, "search", roles.app, tables=[name])


@pytest.fixture(scope="module")
def replica(server_dsn: str, standby_server: str, roles: Roles, packages: list[Package]) -> Iterator[Replica]:
    """The module's database on the primary, with ``pkgs`` embedded by the worker role, and on the standby."""
    with scratch_database(server_dsn, "replica", owner=roles.owner) as dsn:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("CREATE EXTENSION vector")
            with acting(admin, roles.owner):
                install(admin)
            rows = [(p.package, p.section, p.synopsis) for p in packages[:ROWS]]
            rows += [(f"{name}-copy", section, text) for name, section, text in rows[:3]]  # near-duplicates
            make_table(admin, roles, "pkgs", rows)
            admin.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(roles.worker)))
            admin.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(roles.owner)))
            with login(dsn, roles.worker) as worker:
                assert sync(worker, table="pkgs").embedded == len(rows)
            with acting(admin, roles.owner):
                set_query_bank(admin, "pkgs", "embedding", [p.synopsis for p in packages[ROWS : ROWS + 20]])
                admin.execute("ANALYZE pkgs")
        found = Replica(dsn, make_conninfo(standby_server, dbname=conninfo_to_dict(dsn)["dbname"]))
        found.wait_for_replay()
        yield found


@pytest.fixture(scope="module")
def on_both(replica: Replica, roles: Roles) -> Iterator[tuple[psycopg.Connection[Any], psycopg.Connection[Any]]]:
    """Connections to the primary and (through pgsim.connect) the standby, each acting as the application role."""
    with psycopg.connect(replica.primary, autocommit=True) as primary, connect(replica.standby) as standby:
        register(primary)
        for conn in (primary, standby):
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(roles.app)))
        yield primary, standby


def everything_read(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Every read path's answer to the same questions, as plain values."""
    hnsw = Tuning(exact_below_rows=1, min_hnsw_selectivity=0.0)  # the walk, with its settings and savepoint
    names = ["package"]
    hits, chosen = search_with_plan(conn, "pkgs", "embedding", QUERY, k=5, columns=names, tuning=hnsw)
    explained, analyzed = explain(conn, "pkgs", "embedding", QUERY, k=5, tuning=hnsw)
    assert "Execution Time" in analyzed
    in_sql = sql.SQL("SELECT r.row ->> 'package', round(r.distance::numeric, 6) FROM pgsim.knn({}) AS r")
    return {
        "search": [(h.row["package"], round(h.distance, 6)) for h in search(conn, "pkgs", "embedding", QUERY, k=5)],
        "filtered": [
            h.row for h in search(conn, "pkgs", "embedding", QUERY, k=3, where={"section": "utils"}, columns=names)
        ],
        "walked": [h.row["package"] for h in hits],
        "plan": (chosen.path, chosen.index_name, explained.path),
        "planned": plan(conn, "pkgs", "embedding", k=5).path,
        "hybrid": [h.row["package"] for h in hybrid_search(conn, "pkgs", "embedding", QUERY, k=5, columns=names)],
        "relevant": [h.row["package"] for h in relevant_search(conn, "pkgs", "embedding", QUERY, k=5, columns=names)],
        "diverse": [h.row["package"] for h in diverse_search(conn, "pkgs", "embedding", QUERY, k=5, columns=names)],
        "corrected": [h.row["package"] for h in corrected_search(conn, "pkgs", "embedding", QUERY, k=5)],
        "duplicates": near_duplicates(conn, "pkgs", "embedding", threshold=0.99, columns=names),
        "sql": conn.execute(in_sql.format(sql.SQL("'pkgs', 'embedding', %s, 5")), [Text(QUERY)]).fetchall(),
        "sql walked": conn.execute(
            in_sql.format(sql.SQL("'pkgs', 'embedding', %s, 5, $$section <> 'x'$$, 1, 200, 0.0")), [Text(QUERY)]
        ).fetchall(),
        "sql plan": conn.execute("SELECT path FROM pgsim.knn_plan('pkgs', 'embedding', 5)").fetchall(),
        "sql prepared": prepared_path(conn),
        "sql relevant": conn.execute(
            "SELECT r.row ->> 'package' FROM pgsim.relevant_search('pkgs', 'embedding', %s, 5) AS r", [Text(QUERY)]
        ).fetchall(),
        "sql hybrid": conn.execute(
            "SELECT r.row ->> 'package' FROM pgsim.hybrid_search('pkgs', 'embedding', %s, %s, 5) AS r",
            [Text(QUERY), QUERY],
        ).fetchall(),
    }


def prepared_path(conn: psycopg.Connection[Any]) -> Any:
    """pgsim.prepare_knn's path and the settings it applied, in a transaction that is rolled back."""
    with conn.transaction(force_rollback=True):
        row = conn.execute("SELECT (pgsim.prepare_knn('pkgs', 'embedding', 5, NULL, 1, 200, 0.0)).path").fetchone()
        return row, conn.execute("SELECT current_setting('hnsw.iterative_scan')").fetchone()


def orm_nearest(dsn: str, role: str) -> list[str]:
    engine = create_engine(sqlalchemy_url(dsn))
    event.listen(engine, "connect", lambda dbapi, _: dbapi.execute(f'SET ROLE "{role}"'))
    try:
        with Session(engine) as session:
            statement = select(Pkg.package).order_by(Pkg.embedding.nearest(QUERY)).limit(5)
            return list(session.scalars(statement).all())
    finally:
        engine.dispose()


def test_every_read_path_runs_on_the_standby_and_answers_as_the_primary(
    replica: Replica, roles: Roles, on_both: tuple[psycopg.Connection[Any], psycopg.Connection[Any]]
) -> None:
    primary, standby = on_both
    assert standby.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    on_primary = everything_read(primary)
    on_standby = everything_read(standby)
    assert on_standby == on_primary
    assert len(on_standby["search"]) == 5 and on_standby["plan"][0] == "hnsw"
    assert on_standby["duplicates"], "the copied rows make groups"
    assert orm_nearest(replica.standby, roles.app) == orm_nearest(replica.primary, roles.app)
    assert orm_nearest(replica.standby, roles.app) == [name for name, _ in on_standby["search"]]


def state(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    """What the write paths below would change."""
    return tuple(
        conn.execute(query).fetchall()
        for query in (
            "SELECT id, table_name, column_name, model FROM pgsim.embedding ORDER BY id",
            "SELECT attname FROM pg_attribute WHERE attrelid = 'pkgs'::regclass AND attnum > 0 ORDER BY attnum",
            "SELECT count(*) FROM pkgs",
            "SELECT count(*) FROM pgsim.queue",
            "SELECT count(*) FROM pgsim.query_bank",
            "SELECT count(*) FROM pgsim.calibration",
        )
    )


def test_writes_on_the_standby_say_to_run_them_on_the_primary_and_write_nothing(
    replica: Replica, roles: Roles, small_model: str
) -> None:
    refused = "this server is a read-only standby; run it on the primary"
    with psycopg.connect(replica.standby, autocommit=True) as admin:
        register(admin)
        before = state(admin)
        with acting(admin, roles.owner):
            owners_writes = {
                "add_embedding": lambda: add_embedding(admin, "pkgs", "summary_embedding", source="synopsis"),
                "change_model": lambda: change_model(admin, "pkgs", "embedding", small_model),
                "calibrate": lambda: calibrate(admin, "pkgs", "embedding", seconds=1),
                "ingest": lambda: ingest(admin, "pkgs", [{"package": "new", "section": "x", "synopsis": "a new tool"}]),
                "set_query_bank": lambda: set_query_bank(admin, "pkgs", "embedding", [f"query {i}" for i in range(12)]),
                "label_rows": lambda: label_rows(admin, "pkgs", "embedding", {"a": "archives"}, into="section"),
            }
            for call in owners_writes.values():
                with pytest.raises(ReadOnlyStandby, match=refused):
                    call()
            # pgsim's SQL functions that write say so too (remove_embedding, the worker, backfill and registration
            # run them first)
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match=refused):
                remove_embedding(admin, "pkgs", "embedding")
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                grant(admin, "search", roles.tenant, tables=["pkgs"])
            with pytest.raises(InstallError, match="read-only transaction"):
                install(admin)
        with login(replica.standby, roles.worker) as worker:
            for drain in (sync, backfill):
                with pytest.raises(ReadOnlyStandby, match=refused):
                    drain(worker, table="pkgs")
        # a worker pointed at a standby stops, saying why, instead of retrying forever
        with pytest.raises(ReadOnlyStandby, match="the pgsim worker writes to the database"):
            Worker(dsn=make_conninfo(replica.standby, user=roles.worker), table="pkgs").run(until_empty=True)
        assert state(admin) == before


def test_rows_the_worker_embeds_on_the_primary_are_found_on_the_standby_once_replayed(
    replica: Replica, roles: Roles, on_both: tuple[psycopg.Connection[Any], psycopg.Connection[Any]]
) -> None:
    _, standby = on_both
    text = "a tool that restores photographs damaged by water"
    with login(replica.primary, roles.owner) as owner:
        owner.execute("INSERT INTO pkgs (package, section, synopsis) VALUES ('photo-rescue', 'graphics', %s)", [text])
    with login(replica.primary, roles.worker) as worker:
        assert sync(worker, table="pkgs").embedded == 1
    replica.wait_for_replay()
    hits = search(standby, "pkgs", "embedding", text, k=3, columns=["package"])
    assert hits[0].row == {"package": "photo-rescue"} and hits[0].distance < 0.01
    found = standby.execute("SELECT r.row ->> 'package' FROM pgsim.knn('pkgs', 'embedding', %s, 1) AS r", [Text(text)])
    assert found.fetchall() == [("photo-rescue",)]


def test_a_standby_behind_the_primary_answers_from_what_it_has_replayed_and_says_how_far_behind(
    replica: Replica, roles: Roles, on_both: tuple[psycopg.Connection[Any], psycopg.Connection[Any]]
) -> None:
    """docs/architecture.md#read-replicas: the lag check a caller runs on the standby."""
    _, standby = on_both
    lag = (
        "SELECT pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn(), "
        "extract(epoch FROM now() - pg_last_xact_replay_timestamp())"
    )
    text = "a daemon that keeps two directories in sync over the network"
    with psycopg.connect(replica.standby, autocommit=True) as admin:
        admin.execute("SELECT pg_wal_replay_pause()")
        try:
            with login(replica.primary, roles.owner) as owner:
                owner.execute("INSERT INTO pkgs (package, section, synopsis) VALUES ('dirsync', 'net', %s)", [text])
            with login(replica.primary, roles.worker) as worker:
                assert sync(worker, table="pkgs").embedded == 1
            deadline = time.monotonic() + REPLAY_TIMEOUT
            while (row := admin.execute(lag).fetchone()) is not None and not row[0]:  # received, not replayed
                assert time.monotonic() < deadline, "the standby did not receive the primary's WAL"
                time.sleep(0.02)
            hits = search(standby, "pkgs", "embedding", text, k=5, columns=["package"])
            assert len(hits) == 5 and {"package": "dirsync"} not in [hit.row for hit in hits]
        finally:
            admin.execute("SELECT pg_wal_replay_resume()")
    replica.wait_for_replay()
    assert search(standby, "pkgs", "embedding", text, k=1, columns=["package"])[0].row == {"package": "dirsync"}


def test_a_model_switch_replayed_to_the_standby_while_it_searches(
    replica: Replica, roles: Roles, packages: list[Package], small_model: str
) -> None:
    """Searches on the standby during a model change on the primary: each returns k rows, or at worst a pgsim
    error that says to search again; once the switch is replayed, they use the new model."""
    rows = [(p.package, p.section, p.synopsis) for p in packages[ROWS + 20 : ROWS + 80]]
    with psycopg.connect(replica.primary, autocommit=True) as admin:
        make_table(admin, roles, "switching", rows)
    with login(replica.primary, roles.worker) as worker:
        assert sync(worker, table="switching").embedded == len(rows)
    replica.wait_for_replay()

    stop = threading.Event()
    outcomes: list[int | Exception] = []

    def searching() -> None:
        with psycopg.connect(replica.standby, autocommit=True) as conn:
            register(conn)
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(roles.app)))
            while not stop.is_set():
                try:
                    outcomes.append(len(search(conn, "switching", "embedding", QUERY, k=5)))
                except Exception as exc:  # every outcome is counted, whatever it is
                    outcomes.append(exc)

    thread = threading.Thread(target=searching)
    thread.start()
    try:
        with login(replica.primary, roles.owner) as owner:
            change_model(owner, "switching", "embedding", small_model)
        with login(replica.primary, roles.worker) as worker:
            assert sync(worker, table="switching").embedded == len(rows)  # the new column, on the primary
        with login(replica.primary, roles.owner) as owner:
            assert sync(owner, table="switching").switched == 1  # index built, columns swapped
        replica.wait_for_replay()
        replayed = len(outcomes)
        deadline = time.monotonic() + REPLAY_TIMEOUT
        while len(outcomes) < replayed + 5 and thread.is_alive():
            assert time.monotonic() < deadline, "the searches on the standby stopped"
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join()
    failures = [outcome for outcome in outcomes if not isinstance(outcome, int)]
    assert all(isinstance(failure, PgsimError) for failure in failures), failures
    assert len(failures) <= 2, failures
    assert [outcome for outcome in outcomes if isinstance(outcome, int)] == [5] * (len(outcomes) - len(failures))
    assert all(outcome == 5 for outcome in outcomes[replayed:])
    with psycopg.connect(replica.standby, autocommit=True) as conn:
        assert len(search(conn, "switching", "embedding", QUERY, k=5, model=small_model)) == 5


def test_a_worker_that_asks_for_a_primary_waits_and_works_on_the_standby_once_it_is_promoted(
    replica: Replica, roles: Roles
) -> None:
    """A failover: the worker's DSN asks for a writable server (target_session_attrs=read-write), so against a
    standby it keeps reconnecting, and once the standby is promoted it keeps the table in sync there. (Last:
    it ends the module's standby.)"""
    dsn = make_conninfo(replica.standby, user=roles.worker, target_session_attrs="read-write")
    worker = Worker(dsn=dsn, table="pkgs", poll_interval=0.2, reconnect_delay=0.1)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        deadline = time.monotonic() + REPLAY_TIMEOUT
        while worker.reconnects < 1:  # refused: the standby is read-only
            assert time.monotonic() < deadline and thread.is_alive(), "the worker did not retry"
            time.sleep(0.02)
        with psycopg.connect(replica.standby, autocommit=True) as admin:
            assert admin.execute("SELECT pg_promote(wait => true)").fetchone() == (True,)
        text = "a command that converts subtitles between formats"
        with login(replica.standby, roles.owner) as owner:  # the new primary
            owner.execute("INSERT INTO pkgs (package, section, synopsis) VALUES ('subconv', 'video', %s)", [text])
            while owner.execute("SELECT embedding IS NULL FROM pkgs WHERE package = 'subconv'").fetchone() == (True,):
                assert time.monotonic() < deadline + REPLAY_TIMEOUT and thread.is_alive(), "the worker did not embed"
                time.sleep(0.05)
            assert search(owner, "pkgs", "embedding", text, k=1, columns=["package"])[0].row == {"package": "subconv"}
    finally:
        worker.stop.set()
        thread.join()
