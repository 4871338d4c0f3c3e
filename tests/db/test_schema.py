"""The SQL installer against a real server: idempotent, concurrent-safe, strict about changed numbered files,
and usable by a non-superuser who owns the database. Upgrades and function files: test_upgrade.py."""

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fixtures.database import scratch_database
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsim.db.schema import install, package_version
from pgsim.db.sqlfiles import SqlFile, function_files, sql_files
from pgsim.errors import ExtensionMissing, InstallError


@pytest.fixture
def empty_db(server_dsn: str) -> Iterator[str]:
    with scratch_database(server_dsn, "install") as dsn:
        yield dsn


def ledger(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    rows = conn.execute('SELECT name, sha256 FROM pgsim.migration ORDER BY name COLLATE "C"').fetchall()
    return [(n, s) for n, s in rows]


def all_files() -> list[SqlFile]:
    """The numbered files, then the function files: the order install applies them in."""
    return sql_files() + function_files()


def test_install_twice_applies_once(empty_db: str) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        first = install(conn)
        second = install(conn)
        files = all_files()
        assert first.applied == [f.name for f in files]
        assert second.applied == [] and second.already_applied == first.applied
        assert ledger(conn) == sorted((f.name, f.sha256) for f in files)
        assert conn.execute("SELECT pgsim.version()").fetchone() == (package_version(),)
        assert conn.execute("SELECT pgsim.cosine_similarity('[1,0]', '[1,1]')").fetchone()[0] == pytest.approx(2**-0.5)


def test_two_installs_at_once_do_not_collide(empty_db: str) -> None:
    barrier = threading.Barrier(2)
    reports, failures = [], []

    def run() -> None:
        try:
            with psycopg.connect(empty_db, autocommit=True) as conn:
                barrier.wait()
                reports.append(install(conn))
        except Exception as exc:  # collected and asserted below
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert sorted(len(r.applied) for r in reports) == [0, len(all_files())]
    with psycopg.connect(empty_db) as conn:
        assert len(ledger(conn)) == len(all_files())


def test_changed_applied_file_is_refused_by_name(empty_db: str) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        install(conn)
        name = sql_files()[0].name
        conn.execute("UPDATE pgsim.migration SET sha256 = repeat('0', 64) WHERE name = %s", [name])
        with pytest.raises(InstallError, match=f"{name} was applied with sha256 000000000000.*must never change"):
            install(conn)


def test_file_unknown_to_this_package_asks_for_an_upgrade(empty_db: str) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        install(conn)
        conn.execute(
            "INSERT INTO pgsim.migration (name, sha256, package_version) VALUES ('9999_future.sql', 'x', '9.9')"
        )
        with pytest.raises(InstallError, match="9999_future.sql.*newer pgsim.*pip install -U pgsim"):
            install(conn)


def test_non_superuser_owner_needs_extension_then_installs(server_dsn: str) -> None:
    role = f"pgsim_owner_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'owner-pw'").format(sql.Identifier(role)))
    try:
        with scratch_database(server_dsn, "owned", owner=role) as admin_db_dsn:
            db = conninfo_to_dict(admin_db_dsn)["dbname"]
            owner_dsn = make_conninfo(admin_db_dsn, user=role, password="owner-pw")
            with psycopg.connect(owner_dsn, autocommit=True) as conn:
                expected = f"Ask an administrator to run, in database '{db}':  CREATE EXTENSION vector;"
                with pytest.raises(ExtensionMissing, match=expected):
                    install(conn)
                assert conn.execute("SELECT to_regnamespace('pgsim')").fetchone() == (None,)
            with psycopg.connect(admin_db_dsn, autocommit=True) as admin:
                admin.execute("CREATE EXTENSION vector")
            with psycopg.connect(owner_dsn, autocommit=True) as conn:
                assert install(conn).applied == [f.name for f in all_files()]
                owner = conn.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'pgsim'")
                assert owner.fetchone() == (role,)
                assert conn.execute("SELECT pgsim.version()").fetchone() == (package_version(),)
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_install_inside_a_transaction_leaves_its_search_path_alone(conn: psycopg.Connection[Any]) -> None:
    from pgsim.db.schema import install as install_schema

    with conn.transaction():
        conn.execute("SET LOCAL search_path = public")
        install_schema(conn)
        assert conn.execute("SHOW search_path").fetchone() == ("public",)


def test_the_offline_script_and_install_share_the_ledger(server_dsn: str) -> None:
    from pgsim.db.schema import install_script

    with scratch_database(server_dsn, "offline") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute(install_script(upto="0001").encode())
            assert conn.execute("SHOW search_path").fetchone() == ('"$user", public',)  # left as it was
        applied = conn.execute("SELECT name FROM pgsim.migration ORDER BY name").fetchall()
        assert applied == [("0001_tables.sql",)]
        report = install(conn)
        names = [file.name for file in all_files()]
        assert report.already_applied == ["0001_tables.sql"] and report.applied == names[1:]
        conn.execute(install_script().encode())  # everything is in the ledger: the script does nothing
        assert ledger(conn) == sorted((f.name, f.sha256) for f in all_files())


def test_install_upto_names_a_file_or_its_number(server_dsn: str) -> None:
    with scratch_database(server_dsn, "upto") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        assert install(conn, upto="0001").applied == ["0001_tables.sql"]  # and no function file
        report = install(conn, upto="0001_tables.sql")
        assert report.applied == [] and report.already_applied == ["0001_tables.sql"]
        assert install(conn).applied == [file.name for file in all_files()][1:]
        with pytest.raises(InstallError, match="No pgsim SQL file '9999'"):
            install(conn, upto="9999")
