"""Drain pgsim's queue: claim rows, encode their text, write their embeddings. Crash-safe by construction.

One batch is one transaction: claim up to ``batch_size`` queue entries with ``FOR UPDATE SKIP LOCKED`` (so
workers side by side never take the same entry, and there is one entry per row), read the rows' current
text, encode it in one call, binary-COPY the vectors into a temp table, write them with one
``UPDATE … FROM``, and delete the entries done. A worker that dies mid-batch (SIGKILL, a lost connection)
leaves no trace: its transaction rolls back and the entries are claimable again.

The UPDATE writes a vector only where the row's text still hashes as it did when it was read. A row
changed while its batch was being encoded keeps its queue entry (the writer's trigger found it there and
added none), so it is encoded again from its new text: an older text's embedding never lands last.

With a second connection (``overlap_with``), two batches are in flight, each its own transaction on its own
connection: one is claimed, read and written while the other is encoded (one forward pass at a time). This
pays where the database does not share the model's cores (bench/ingest.py --parts overlap), so the worker
and ``pgsim backfill`` open it only when the database is not on this machine (:func:`database_is_remote`).
A worker, sync or backfill pointed at a hot standby stops at once with :class:`pgsim.ReadOnlyStandby` (a DSN
with ``target_session_attrs=read-write`` makes the worker wait for a primary instead).

A batch that fails (an error from the database or the model) is not lost either: its entries count an
attempt and are retried one row at a time at once, so one bad row cannot take its neighbours down; a row
that fails alone waits ``retry_delay * 2**attempts`` seconds before its next attempt, and after
``max_attempts`` its entry moves to ``pgsim.dead_letter``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from psycopg import sql

from pgsim.columns.batches import SyncReport, TableMoved, checked_encoder, claim_and_encode
from pgsim.columns.model_change import switch_over
from pgsim.columns.recalibration import recalibrate_if_stale
from pgsim.columns.registry import Registration, queue_rows, registration_by_id
from pgsim.columns.worker_role import qualified_table, worker_targets
from pgsim.db.catalog import is_local_host, pin_search_path, vector_schema
from pgsim.db.connection import notifications_reach
from pgsim.db.standby import require_primary
from pgsim.encoding.encoder import Encoder
from pgsim.errors import InvalidInput, PgsimError, ServerError
from pgsim.psycopg import register

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 256  # rows per claim; fewer when fewer are queued (bench/ingest.py tunes it)
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_RETRY_DELAY = 1.0  # seconds before the first retry; doubles with each attempt
MAX_IDLE_BATCHES = 3  # batches in a row that finish no entry (every row changed meanwhile) end a drain
WORKER_APPLICATION_NAME = "pgsim worker"

LISTEN_LOST = (
    "No notification reaches the worker's LISTEN connection (behind a pooler in transaction mode, such as "
    "PgBouncer, LISTEN lasts one transaction): it looks for queued rows every %.1fs (poll_interval) instead. "
    "Connect the worker to PostgreSQL directly to have it woken at once."
)


Progress = Callable[[SyncReport, int], None]  # (report so far, entries queued when the drain started)


def sync(
    conn: psycopg.Connection[Any],
    *,
    table: str | None = None,
    column: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    retry_delay: float = DEFAULT_RETRY_DELAY,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    cache: bool = False,
    overlap_with: psycopg.Connection[Any] | None = None,
    allow_superuser: bool = False,
    owners: Sequence[str] | None = None,
    calibrate: bool = True,
) -> SyncReport:
    """Drain the queue of every registered column (or of ``table.column``) until no entry is ready, then
    complete model changes whose new column is full. ``conn`` must be an autocommit connection outside a
    transaction: each batch is its own transaction. With ``cache``, text already in pgsim.embedding_cache is
    not encoded again, and what is encoded is added to it (:mod:`pgsim.columns.cache`). ``overlap_with``, a second
    such connection to the same database, writes one batch while the next is encoded (see the module's text).
    It drains only what the current role works for, of one owner or of ``owners``; a session that is or may
    become a superuser or BYPASSRLS role refuses other roles' code unless ``allow_superuser``
    (:mod:`pgsim.columns.worker_role`). Every statement runs in a transaction that pins search_path (never
    the session's: behind a pooler in transaction mode that would reach other clients). With ``calibrate``, a
    column that received vectors and whose index calibration is missing or stale is measured again once its
    queue is empty, when this session owns the table (:mod:`pgsim.columns.recalibration`)."""
    if batch_size < 1 or max_attempts < 1 or retry_delay < 0:
        raise InvalidInput("batch_size and max_attempts must be at least 1, retry_delay at least 0.")
    if overlap_with is conn:
        raise InvalidInput("overlap_with must be a second connection, not the one passed as conn.")
    connections = [conn] if overlap_with is None else [conn, overlap_with]
    for connection in connections:
        if not connection.autocommit or connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raise InvalidInput(
                "pgsim.sync commits each batch on its own: pass autocommit connections outside a transaction "
                "(psycopg.connect(..., autocommit=True); pgsim.connect() gives one)."
            )
    if overlap_with is not None and _server_and_database(conn) != _server_and_database(overlap_with):
        raise InvalidInput("overlap_with reaches another server or database than conn; it must reach the same one.")
    require_primary(conn, "pgsim.sync")
    table = qualified_table(conn, table)
    for connection in connections:
        _register_pinned(connection)
    return _sync(conn, connections, table, column, batch_size, max_attempts, retry_delay, progress, stop, cache,
                 overlap_with, allow_superuser, owners, calibrate)  # fmt: skip


def _sync(
    conn: psycopg.Connection[Any],
    connections: list[psycopg.Connection[Any]],
    table: str | None,
    column: str | None,
    batch_size: int,
    max_attempts: int,
    retry_delay: float,
    progress: Progress | None,
    stop: threading.Event | None,
    cache: bool,
    overlap_with: psycopg.Connection[Any] | None,
    allow_superuser: bool,
    owners: Sequence[str] | None,
    calibrate: bool,
) -> SyncReport:
    report = SyncReport()
    started = time.perf_counter()
    targets = worker_targets(conn, table, column, owners=owners, allow_superuser=allow_superuser)
    total = _queued(conn, [target.id for target in targets]) if progress else 0
    lock = threading.Lock()  # guards the report and progress
    failed = threading.Event()  # one lane's error stops the other
    model: contextlib.AbstractContextManager[Any] = threading.Lock() if overlap_with else contextlib.nullcontext()

    def drain(lane: psycopg.Connection[Any], registration: Registration, encoder: Encoder) -> None:
        idle_batches = 0
        while (stop is None or not stop.is_set()) and not failed.is_set() and idle_batches < MAX_IDLE_BATCHES:
            try:
                done = _batch(lane, registration, encoder, batch_size)
                if isinstance(done, Registration):  # its table was renamed: on under its new name
                    registration = done
                    continue
                if done is None:
                    break
                with lock:
                    report.add(done)
                    report.seconds = time.perf_counter() - started
                    if progress:
                        progress(report, total)
            except BaseException:  # the database's, the model's or the progress callback's error
                failed.set()
                raise
            # Rows that change under every batch (a source that is not a function of the row, such as one
            # calling random()) would keep a drain busy for ever; they stay queued for the next one.
            idle_batches = idle_batches + 1 if done.done + done.failed == 0 else 0

    def _batch(
        lane: psycopg.Connection[Any], registration: Registration, encoder: Encoder, limit: int
    ) -> SyncReport | Registration | None:
        """One batch (or, when none is ready, one retry of a single failed entry); the registration read
        again when its table's name changed under the batch, None when nothing is ready."""
        try:
            for size, retried in ((limit, False), (1, True)):
                done = claim_and_encode(lane, registration, encoder, size, retried=retried,
                                        max_attempts=max_attempts, retry_delay=retry_delay, cache=cache,
                                        encoding=model)  # fmt: skip
                if done is not None:
                    return done
            return None
        except (psycopg.errors.UndefinedTable, TableMoved):
            with lane.transaction():
                pin_search_path(lane)
                moved = registration_by_id(lane, registration.id)
            if moved is None or moved.table_sql == registration.table_sql:
                raise
            log.info("%s was renamed %s; draining on", registration.table, moved.table)
            return moved

    for registration in targets:
        encoder = checked_encoder(registration)
        embedded_before = report.done
        if len(connections) == 1:
            drain(conn, registration, encoder)
        else:
            with ThreadPoolExecutor(len(connections), thread_name_prefix="pgsim-sync") as lanes:
                running = [lanes.submit(drain, c, registration, encoder) for c in connections]
                try:
                    for lane in running:
                        lane.result()
                except BaseException:  # a lane's error, or Ctrl-C here: the other lane ends after its batch
                    failed.set()
                    raise
        if registration.replaces is not None and (stop is None or not stop.is_set()):
            report.switched += int(switch_over(conn, registration))
        elif calibrate and report.done > embedded_before and (stop is None or not stop.is_set()):
            recalibrate_if_stale(conn, registration, stop)
    report.seconds = time.perf_counter() - started
    return report


def backfill(
    conn: psycopg.Connection[Any],
    table: str | None = None,
    column: str | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    cache: bool = False,
    overlap_with: psycopg.Connection[Any] | None = None,
    allow_superuser: bool = False,
    owners: Sequence[str] | None = None,
) -> SyncReport:
    """Queue every row that has text but no embedding, then drain the queue. Interrupted, it resumes where it
    stopped: the queue is in the database, and each batch commits on its own. ``cache``, ``overlap_with``
    and ``allow_superuser`` as for :func:`sync`."""
    require_primary(conn, "pgsim.backfill")
    queue_backfill(conn, table, column, allow_superuser=allow_superuser)
    return sync(conn, table=table, column=column, batch_size=batch_size, progress=progress, stop=stop, cache=cache,
                overlap_with=overlap_with, allow_superuser=allow_superuser, owners=owners)  # fmt: skip


def queue_backfill(
    conn: psycopg.Connection[Any],
    table: str | None,
    column: str | None,
    *,
    allow_superuser: bool = False,
    owners: Sequence[str] | None = None,
) -> list[Registration]:
    """Queue the rows of ``table.column`` (or of every registered column) that have text but no embedding;
    the registrations, for whoever drains the queue. Queueing evaluates the source: the role check of
    :func:`sync` applies."""
    table = qualified_table(conn, table)
    targets = worker_targets(conn, table, column, owners=owners, allow_superuser=allow_superuser)
    for registration in targets:
        queue_rows(conn, registration)
    return targets


def _queued(conn: psycopg.Connection[Any], ids: list[int]) -> int:
    with conn.transaction():
        pin_search_path(conn)
        row = conn.execute("SELECT count(*) FROM pgsim.queue WHERE embedding_id = ANY(%s)", [ids]).fetchone()
    return int(row[0]) if row else 0


def _register_pinned(conn: psycopg.Connection[Any]) -> None:
    """pgsim's adapters, looked up with pg_catalog first and pgvector's schema next (the session's path is
    pinned to pg_catalog alone while a drain runs)."""
    with conn.transaction():
        pin_search_path(conn)  # vector_schema's own query too
        path = f"pg_catalog, {sql.Identifier(vector_schema(conn)).as_string(conn)}, pg_temp"
        conn.execute("SELECT pg_catalog.set_config('search_path', %s, true)", [path])
        register(conn)


def _server_and_database(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    row = conn.execute("SELECT pg_catalog.pg_postmaster_start_time(), pg_catalog.current_database()").fetchone()
    return tuple(row or ())


def database_is_remote(conn: psycopg.Connection[Any]) -> bool:
    """Whether ``conn`` reaches its server at an address other than this machine's socket or loopback."""
    return not is_local_host(conn.info.host)


class Worker:
    """Keeps registered columns in sync: drains the queue, then sleeps until a NOTIFY on channel ``pgsim`` (or
    ``poll_interval`` seconds, in case a notification was missed). Reconnects with backoff when the database
    goes away; what was in flight is rolled back and done again."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        table: str | None = None,
        column: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        poll_interval: float = 5.0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        reconnect_delay: float = 1.0,
        cache: bool = False,
        overlap: bool | None = None,
        allow_superuser: bool = False,
        owners: Sequence[str] | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInput(f"batch_size must be a whole number >= 1; got {batch_size!r}.")
        if not poll_interval > 0 or poll_interval == float("inf"):  # 0 or less would poll in a busy loop
            raise InvalidInput(f"poll_interval must be a number of seconds above 0; got {poll_interval!r}.")
        self.dsn = dsn
        self.table, self.column = table, column
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.reconnect_delay = reconnect_delay
        self.cache = cache
        self.allow_superuser = allow_superuser
        self.owners = owners  # whose tables it keeps in sync (None: those of the one owner it works for)
        # a second connection, one batch written while the next encodes; None: when the database is remote
        self.overlap = overlap
        self.report = SyncReport()
        self.reconnects = 0
        self.stop = threading.Event()
        self.on_batch: Progress | None = None

    def run(self, *, until_empty: bool = False) -> SyncReport:
        """Work until :attr:`stop` is set (or, with ``until_empty``, until the queue has nothing ready)."""
        delay = self.reconnect_delay
        while not self.stop.is_set():
            try:
                with contextlib.ExitStack() as connections:
                    work = connections.enter_context(self._connect())
                    require_primary(work, "the pgsim worker")
                    overlap = database_is_remote(work) if self.overlap is None else self.overlap
                    second = connections.enter_context(self._connect()) if overlap else None
                    listen = connections.enter_context(self._connect())
                    if not until_empty and not notifications_reach(listen, work):
                        log.warning(LISTEN_LOST, self.poll_interval)
                    listen.execute("LISTEN pgsim")  # last: what the connection runs while the worker waits
                    delay = self.reconnect_delay
                    while not self.stop.is_set():
                        self.report.add(self._drain(work, second))
                        if until_empty:
                            return self.report
                        self._wait(listen)
            except (psycopg.OperationalError, ServerError) as exc:
                if self.stop.is_set():
                    break
                self.reconnects += 1
                log.warning("lost the database (%s); reconnecting in %.1fs", str(exc).strip(), delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 30.0)
        return self.report

    def _connect(self) -> psycopg.Connection[Any]:
        from pgsim.db.connection import resolve_dsn

        # No prepared statements: through a pooler in transaction mode (PgBouncer) the next transaction may run
        # on another server connection, which has none of them.
        return psycopg.connect(resolve_dsn(self.dsn), autocommit=True, application_name=WORKER_APPLICATION_NAME,
                               connect_timeout=10, prepare_threshold=None)  # fmt: skip

    def _drain(self, conn: psycopg.Connection[Any], second: psycopg.Connection[Any] | None) -> SyncReport:
        """Every target in turn; one this worker cannot serve (its model is missing here, say) is logged and
        skipped, and the others go on."""
        report = SyncReport()
        try:
            table = qualified_table(conn, self.table)
            targets = worker_targets(conn, table, self.column, owners=self.owners,
                                     allow_superuser=self.allow_superuser)  # fmt: skip
        except InvalidInput as exc:
            log.error("%s", exc)
            return report
        for registration in targets:
            if registration.replaces is not None:
                continue  # drained with the column it replaces
            try:
                report.add(
                    sync(
                        conn,
                        table=registration.table,
                        column=registration.column,
                        batch_size=self.batch_size,
                        max_attempts=self.max_attempts,
                        retry_delay=self.retry_delay,
                        progress=self.on_batch,
                        stop=self.stop,
                        cache=self.cache,
                        overlap_with=second,
                        allow_superuser=self.allow_superuser,
                        owners=self.owners,
                    )
                )
            except (PgsimError, psycopg.Error) as exc:
                if conn.broken or (second is not None and second.broken):
                    raise  # reconnect
                log.error("%s.%s: %s", registration.table, registration.column, exc)
        return report

    def _wait(self, listen: psycopg.Connection[Any]) -> None:
        """Until a notification, the poll interval, or stop; in short slices so stop is prompt."""
        deadline = time.monotonic() + self.poll_interval
        while not self.stop.is_set() and time.monotonic() < deadline:
            woken = False
            for _ in listen.notifies(timeout=min(0.5, max(deadline - time.monotonic(), 0.01)), stop_after=1):
                woken = True
            if woken:
                for _ in listen.notifies(timeout=0):  # fold the burst into this one wake-up
                    pass
                return
