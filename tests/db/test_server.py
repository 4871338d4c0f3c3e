"""The embedded server: start, reuse (also from a second process), stop, and clear errors."""

import fcntl
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from pgsim.db.server import EmbeddedServer
from pgsim.errors import ServerError

START_IN_SUBPROCESS = (
    "import sys; from pgsim.db.server import EmbeddedServer; print(EmbeddedServer(sys.argv[1]).start().pid)"
)


def _start_in_subprocess(data_dir: Path) -> int:
    out = subprocess.run([sys.executable, "-c", START_IN_SUBPROCESS, str(data_dir)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


@pytest.fixture
def fresh_dir(tmp_path: Path):
    server = EmbeddedServer(tmp_path / "home")
    yield server
    server.stop()


def test_start_reuse_stop_restart_keeps_data(fresh_dir: EmbeddedServer) -> None:
    first = fresh_dir.start()
    assert fresh_dir.start() == first
    assert _start_in_subprocess(fresh_dir.data_dir) == first.pid
    with psycopg.connect(first.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        assert (
            conn.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'").fetchone()
            is not None
        )
    assert fresh_dir.stop() is True
    assert fresh_dir.running() is None
    assert fresh_dir.stop() is False
    second = fresh_dir.start()
    assert second.pid != first.pid
    with psycopg.connect(second.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('kept')").fetchone() == ("kept",)


def test_two_processes_starting_one_new_directory_share_one_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "shared"
    with ThreadPoolExecutor(2) as pool:
        pids = list(pool.map(_start_in_subprocess, [data_dir, data_dir]))
    try:
        assert pids[0] == pids[1]
        running = EmbeddedServer(data_dir).running()
        assert running is not None and running.pid == pids[0]
        with psycopg.connect(running.dsn()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        EmbeddedServer(data_dir).stop()


def test_locked_directory_is_a_clear_error(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "locked", lock_timeout=0.5)
    server.data_dir.mkdir()
    with open(server.lock_file, "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("4242")
        holder.flush()
        with pytest.raises(ServerError, match=r"locked by another process \(pid 4242\)"):
            server.start()
    assert not (server.pgdata / "PG_VERSION").exists()


def test_unusable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ServerError, match="Cannot use .* as pgsim's data directory.*PGSIM_HOME"):
        EmbeddedServer(blocker / "data").start()
    with pytest.raises(ServerError, match="Cannot use"):
        EmbeddedServer("/proc/pgsim-cannot-exist").start()


def test_a_long_data_dir_gets_a_private_socket_directory_that_other_users_cannot_enter(tmp_path: Path) -> None:
    import os
    import pwd
    import stat

    server = EmbeddedServer(tmp_path / ("a-long-directory-name-" * 5) / "home")
    try:
        running = server.start()
        mode = running.socket_dir.stat()
        assert running.socket_dir != server.pgdata  # the path is too long for a socket: the socket lives elsewhere
        assert stat.S_IMODE(mode.st_mode) == 0o700
        assert running.socket_dir.name.startswith("pgsim-socket-") and len(running.socket_dir.name) > 16
        with psycopg.connect(running.dsn()) as conn:  # its owner (or root) still connects
            assert conn.execute("SELECT 1").fetchone() == (1,)
        if os.geteuid() == 0:  # as root (CI), a second OS user tries the socket: refused by the file system
            try:
                pwd.getpwnam("pgsim-intruder")
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", "pgsim-intruder"], check=True)
            from pgsim.db.server import _bin_dir

            psql = _bin_dir() / "psql"
            attempt = subprocess.run(
                ["runuser", "-u", "pgsim-intruder", "--", str(psql), "-w", running.dsn(), "-c", "SELECT 1"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert attempt.returncode != 0
            assert "Permission denied" in attempt.stderr or "No such file" in attempt.stderr
        else:
            assert mode.st_uid == os.geteuid()
    finally:
        server.stop()
    assert not running.socket_dir.exists()  # stopping removes it
