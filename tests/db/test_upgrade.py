"""Upgrading gives the schema a fresh install gives, from every earlier state; function files follow their text.

An earlier state is a directory in ``states/``: the ``pgsim/db/sql`` files of a release (or, for
``pre-squash``, of the databases made before the numbered files were squashed), verbatim. A release adds
its own directory; it is installed with the current installer reading its files, unless its installer
differed (``INSTALLERS``).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fixtures.database import scratch_database

from pgsim.db.schema import install, install_script
from pgsim.db.server import _bin_dir
from pgsim.db.sqlfiles import function_files, sql_dir, sql_files
from pgsim.errors import InstallError

STATES = Path(__file__).parent / "states"


def install_numbered_only(conn: psycopg.Connection[Any], directory: Path) -> None:
    """What ``pgsim install`` did before function files: each numbered file once, in order, recorded in a
    ledger that had no objects column."""
    with conn.transaction():
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(
            "CREATE SCHEMA pgsim; CREATE TABLE pgsim.migration (name text PRIMARY KEY, sha256 text NOT NULL, "
            "package_version text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute("SET LOCAL search_path = pgsim, public, pg_catalog")
        for path in sorted(directory.glob("[0-9][0-9][0-9][0-9]_*.sql")):
            text = path.read_text(encoding="utf-8")
            conn.execute(text.encode())
            conn.execute(
                "INSERT INTO pgsim.migration (name, sha256, package_version) VALUES (%s, %s, '0.1.0')",
                [path.name, hashlib.sha256(text.encode()).hexdigest()],
            )


def install_release(conn: psycopg.Connection[Any], directory: Path) -> None:
    install(conn, directory=directory)


INSTALLERS: dict[str, Callable[[psycopg.Connection[Any], Path], None]] = {"pre-squash": install_numbered_only}


def install_state(conn: psycopg.Connection[Any], state: str) -> None:
    INSTALLERS.get(state, install_release)(conn, STATES / state)


def schema_dump(dsn: str) -> str:
    """``pg_dump --schema-only --schema=pgsim``, without the random key of its ``\\restrict`` lines."""
    dump = subprocess.run(
        [str(_bin_dir() / "pg_dump"), "--schema-only", "--schema=pgsim", "--dbname", dsn],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return re.sub(r"^\\(un)?restrict \S+$", r"\\\1restrict", dump, flags=re.MULTILINE)


def ledger(conn: psycopg.Connection[Any]) -> list[tuple[str, str, list[str] | None]]:
    """What the ledger says was applied (not when, nor by which package version)."""
    rows = conn.execute('SELECT name, sha256, objects FROM pgsim.migration ORDER BY name COLLATE "C"')
    return [(name, digest, objects) for name, digest, objects in rows.fetchall()]


@pytest.fixture(scope="module")
def fresh(server_dsn: str) -> Iterator[tuple[str, list[tuple[str, str, list[str] | None]]]]:
    """The schema dump and the ledger of a fresh install."""
    with scratch_database(server_dsn, "fresh") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        install(conn)
        yield schema_dump(dsn), ledger(conn)


REGISTER = (
    "SELECT pgsim.register_embedding('notes'::regclass, 'embedding', 'body', 'some-model', 'r1', 3, "
    "source_columns => '{body}')"
)


def test_a_table_renamed_before_the_upgrade_keeps_its_registration(server_dsn: str) -> None:
    with scratch_database(server_dsn, "renamed") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        install_state(conn, "pre-squash")
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        conn.execute(REGISTER)
        conn.execute("ALTER TABLE notes RENAME TO kept_notes")  # the registry still says notes
        install(conn)
        assert conn.execute("SELECT table_oid = 'kept_notes'::regclass FROM pgsim.embedding").fetchone() == (True,)
        conn.execute("INSERT INTO kept_notes VALUES (1, 'still queued')")
        assert conn.execute("SELECT count(*) FROM pgsim.queue").fetchone() == (1,)


@pytest.mark.parametrize("route", ["install", "script"])
@pytest.mark.parametrize("state", sorted(path.name for path in STATES.iterdir() if path.is_dir()))
def test_upgrade_from_an_earlier_state_equals_a_fresh_install(
    server_dsn: str, fresh: tuple[str, list[Any]], state: str, route: str
) -> None:
    fresh_dump, fresh_ledger = fresh
    with scratch_database(server_dsn, f"from_{state}") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        install_state(conn, state)
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        conn.execute(REGISTER)  # a registered column: its triggers use pgsim.enqueue
        if route == "install":
            assert install(conn).applied
        else:
            with conn.transaction():
                conn.execute(install_script().encode())
        assert schema_dump(dsn) == fresh_dump
        assert ledger(conn) == fresh_ledger
        assert install(conn).applied == []
        conn.execute("INSERT INTO notes VALUES (1, 'queued by the trigger, through the upgraded pgsim.enqueue')")
        assert conn.execute("SELECT count(*) FROM pgsim.queue").fetchone() == (1,)


def test_an_incomplete_pre_squash_ledger_is_refused_clearly(server_dsn: str, tmp_path: Path) -> None:
    for path in sorted((STATES / "pre-squash").glob("000[1-7]_*.sql")):
        shutil.copy(path, tmp_path)
    with scratch_database(server_dsn, "incomplete") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        install_numbered_only(conn, tmp_path)
        with pytest.raises(InstallError, match="not the complete set as released.*0007_quality.sql"):
            install(conn)
        assert conn.execute("SELECT count(*) FROM pgsim.migration").fetchone() == (7,)  # nothing changed


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A copy of the package's SQL files, to change."""
    copy = tmp_path / "sql"
    shutil.copytree(str(sql_dir()), copy)
    return copy


@pytest.fixture
def db(server_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with scratch_database(server_dsn, "functions") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


def overloads(conn: psycopg.Connection[Any], name: str) -> list[str]:
    rows = conn.execute(
        "SELECT oid::regprocedure::text FROM pg_proc WHERE pronamespace = 'pgsim'::regnamespace AND proname = %s "
        "ORDER BY 1",
        [name],
    )
    return [signature for (signature,) in rows.fetchall()]


def test_a_changed_function_file_is_applied_again_and_an_unchanged_one_skipped(
    db: psycopg.Connection[Any], files: Path
) -> None:
    install(db, directory=files)
    db.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    db.execute(REGISTER)
    enqueue = files / "functions" / "enqueue.sql"
    enqueue.write_text(enqueue.read_text().replace("lower(TG_OP)", "'changed ' || lower(TG_OP)"))
    report = install(db, directory=files)
    assert report.applied == ["functions/enqueue.sql"]
    unchanged = len(sql_files()) + len(function_files()) - 1
    assert "0001_tables.sql" in report.already_applied and len(report.already_applied) == unchanged
    db.execute("INSERT INTO notes VALUES (1, 'a')")  # the trigger made before the change runs the new body
    assert db.execute("SELECT reason FROM pgsim.queue").fetchone() == ("changed insert",)
    (digest,) = db.execute("SELECT sha256 FROM pgsim.migration WHERE name = 'functions/enqueue.sql'").fetchone() or ()
    assert digest == hashlib.sha256(enqueue.read_text().encode()).hexdigest()
    assert install(db, directory=files).applied == []


def test_a_changed_signature_leaves_no_old_overload(db: psycopg.Connection[Any], files: Path) -> None:
    install(db, directory=files)
    assert overloads(db, "rrf") == ["pgsim.rrf(bigint,integer)"]
    rrf = files / "functions" / "rrf.sql"
    rrf.write_text(rrf.read_text().replace("k integer DEFAULT 60", "k double precision DEFAULT 60").replace(
        "pgsim.rrf(bigint, integer)", "pgsim.rrf(bigint, double precision)"))  # fmt: skip
    assert install(db, directory=files).applied == ["functions/rrf.sql"]
    assert overloads(db, "rrf") == ["pgsim.rrf(bigint,double precision)"]
    objects = db.execute("SELECT objects FROM pgsim.migration WHERE name = 'functions/rrf.sql'").fetchone()
    assert objects == (["function pgsim.rrf(bigint,double precision)"],)
    # an overload added to the file is made, and recorded; taken out again, it goes
    added = "CREATE OR REPLACE FUNCTION pgsim.rrf(rank integer) RETURNS double precision\nLANGUAGE sql RETURN 1;\n"
    rrf.write_text(rrf.read_text() + added)
    install(db, directory=files)
    assert overloads(db, "rrf") == ["pgsim.rrf(bigint,double precision)", "pgsim.rrf(integer)"]
    rrf.write_text(rrf.read_text().replace(added, ""))
    install(db, directory=files)
    assert overloads(db, "rrf") == ["pgsim.rrf(bigint,double precision)"]


def test_a_function_no_longer_shipped_is_dropped(db: psycopg.Connection[Any], files: Path) -> None:
    install(db, directory=files)
    (files / "functions" / "nearest_label.sql").unlink()
    (files / "functions" / "sync_status.sql").unlink()
    report = install(db, directory=files)
    assert report.applied == [] and report.dropped == ["functions/nearest_label.sql", "functions/sync_status.sql"]
    assert overloads(db, "nearest_label") == []
    assert db.execute("SELECT to_regclass('pgsim.sync_status')").fetchone() == (None,)
    names = db.execute("SELECT name FROM pgsim.migration WHERE name LIKE 'functions/n%'").fetchall()
    assert names == [("functions/near_duplicates.sql",)]


def test_a_function_file_makes_again_what_is_gone(db: psycopg.Connection[Any]) -> None:
    """A numbered file may drop a view to change a table; the view's file, unchanged, makes it again."""
    install(db)
    db.execute("DROP VIEW pgsim.sync_status")
    assert install(db).applied == ["functions/sync_status.sql"]
    assert db.execute("SELECT count(*) FROM pgsim.sync_status").fetchone() == (0,)


def test_a_changed_numbered_file_is_still_refused(db: psycopg.Connection[Any], files: Path) -> None:
    install(db, directory=files)
    tables = files / "0001_tables.sql"
    tables.write_text(tables.read_text() + "\nCREATE TABLE pgsim.extra (id int);\n")
    with pytest.raises(InstallError, match="0001_tables.sql was applied with sha256 .*must never change"):
        install(db, directory=files)
    assert db.execute("SELECT to_regclass('pgsim.extra')").fetchone() == (None,)


def test_every_function_and_view_is_recorded_by_the_file_named_after_it(db: psycopg.Connection[Any]) -> None:
    install(db)
    made = db.execute(
        "SELECT o.type || ' ' || o.identity FROM (SELECT 'pg_proc'::regclass, oid FROM pg_proc "
        "WHERE pronamespace = 'pgsim'::regnamespace UNION ALL SELECT 'pg_class'::regclass, oid FROM pg_class "
        "WHERE relnamespace = 'pgsim'::regnamespace AND relkind = 'v') AS m(classid, objid), "
        "pg_identify_object(m.classid, m.objid, 0) AS o"
    ).fetchall()
    recorded = db.execute("SELECT name, unnest(objects) FROM pgsim.migration WHERE name LIKE 'functions/%'").fetchall()
    assert sorted(object for (object,) in made) == sorted(object for _, object in recorded)
    for name, object in recorded:  # functions/knn.sql makes pgsim.knn
        assert re.match(rf"(function|view) pgsim\.{name.removeprefix('functions/').removesuffix('.sql')}\b", object)
    assert len(recorded) == len(function_files()) and sql_files()
