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
connection: one is claimed, read and written while the other is encoded, so the model does not wait for
the database. One forward pass runs at a time. This pays where the database's work does not take the
model's cores (1.05-1.10x with the local server pinned to a core of its own, standing in for a database on
another machine; bench/ingest.py --parts overlap) and costs a little where both share few cores (0.95x on
2 cores), so the worker and ``pgsim backfill`` open the second connection only when the database is not on
this machine (:func:`database_is_remote`).

A batch that fails (an error from the database or the model) is not lost either: its entries count an
attempt, wait ``retry_delay * 2**attempts`` seconds, and are then retried one row at a time, so one bad row
cannot take its neighbours down; after ``max_attempts`` an entry moves to ``pgsim.dead_letter``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pgsim.columns.cache import lookup, merged, missing, store
from pgsim.columns.model_change import switch_over
from pgsim.columns.registry import Registration, forget_dropped, key_match, queue_rows, registrations
from pgsim.db.catalog import is_local_host
from pgsim.encoding.encoder import Encoder, encoder_for
from pgsim.errors import InvalidInput, PgsimError, ServerError
from pgsim.psycopg import register

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 256  # rows per claim; fewer when fewer are queued (measured: see README, bench/ingest.py)
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_RETRY_DELAY = 1.0  # seconds before the first retry; doubles with each attempt
MAX_RETRY_DELAY = 300.0
MAX_IDLE_BATCHES = 3  # batches in a row that finish no entry (every row changed meanwhile) end a drain
WORKER_APPLICATION_NAME = "pgsim worker"
# Errors that say nothing about the rows (a deadlock, a lock or statement timeout, an interrupted query).
TRANSIENT = (
    psycopg.errors.TransactionRollback,
    psycopg.errors.QueryCanceled,
    psycopg.errors.LockNotAvailable,
    MemoryError,
)

CLAIM = """
SELECT id, key FROM pgsim.queue
WHERE embedding_id = %(registration)s AND (attempts > 0) = %(retried)s
    AND (not_before IS NULL OR not_before <= now())
ORDER BY id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED
"""
RECORD_FAILURE = """
UPDATE pgsim.queue
SET attempts = attempts + 1, last_error = %(error)s,
    not_before = now() + make_interval(secs => least(%(delay)s * 2 ^ attempts, %(max_delay)s))
WHERE id = ANY(%(ids)s)
"""
BURY = """
WITH dead AS (
    DELETE FROM pgsim.queue WHERE id = ANY(%(ids)s) AND attempts >= %(max_attempts)s
    RETURNING embedding_id, key, reason, attempts, last_error, enqueued_at
)
INSERT INTO pgsim.dead_letter (embedding_id, key, reason, attempts, last_error, enqueued_at)
SELECT embedding_id, key, reason, attempts, last_error, enqueued_at FROM dead
"""
TEMP_TABLE = """
CREATE TEMP TABLE IF NOT EXISTS pgsim_sync (
    _pgsim_qid bigint, _pgsim_key jsonb, _pgsim_hash text, _pgsim_vector vector
) ON COMMIT DELETE ROWS
"""


@dataclass
class SyncReport:
    """What a drain did. Every claimed entry ends in exactly one of the first six counts."""

    embedded: int = 0  # rows that got their vector
    emptied: int = 0  # rows whose text is NULL or blank: embedding set to NULL, not retried
    missing: int = 0  # rows deleted since they were queued
    stale: int = 0  # rows changed while encoding: left queued for their new text
    failed: int = 0  # entries of failed batches, queued for a retry
    dead: int = 0  # entries moved to pgsim.dead_letter
    batches: int = 0
    switched: int = 0  # model changes completed
    cached: int = 0  # texts found in pgsim.embedding_cache instead of encoded (with cache=True)
    encode_seconds: float = 0.0
    write_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return self.embedded + self.emptied + self.missing + self.dead

    def add(self, other: SyncReport) -> None:
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


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
) -> SyncReport:
    """Drain the queue of every registered column (or of ``table.column``) until no entry is ready, then
    complete model changes whose new column is full. ``conn`` must be an autocommit connection outside a
    transaction: each batch is its own transaction. With ``cache``, text already in pgsim.embedding_cache is
    not encoded again, and what is encoded is added to it (:mod:`pgsim.cache`). ``overlap_with``, a second
    such connection to the same database, writes one batch while the next is encoded (see the module's text)."""
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
    for connection in connections:
        register(connection)
    report = SyncReport()
    started = time.perf_counter()
    targets = _targets(conn, table, column)
    total = _queued(conn, [target.id for target in targets]) if progress else 0
    lock = threading.Lock()  # guards the report and progress
    failed = threading.Event()  # one lane's error stops the other
    model: contextlib.AbstractContextManager[Any] = threading.Lock() if overlap_with else contextlib.nullcontext()

    def drain(lane: psycopg.Connection[Any], registration: Registration, encoder: Encoder) -> None:
        def batch(limit: int, retried: bool) -> SyncReport | None:
            return _batch(lane, registration, encoder, limit, retried=retried, max_attempts=max_attempts,
                          retry_delay=retry_delay, cache=cache, encoding=model)  # fmt: skip

        idle_batches = 0
        while (stop is None or not stop.is_set()) and not failed.is_set() and idle_batches < MAX_IDLE_BATCHES:
            try:
                done = batch(batch_size, retried=False) or batch(1, retried=True)
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

    for registration in targets:
        encoder = checked_encoder(registration)
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
) -> SyncReport:
    """Queue every row that has text but no embedding, then drain the queue. Interrupted, it resumes where it
    stopped: the queue is in the database, and each batch commits on its own. ``cache`` and ``overlap_with``
    as for :func:`sync`."""
    queue_backfill(conn, table, column)
    return sync(conn, table=table, column=column, batch_size=batch_size, progress=progress, stop=stop, cache=cache,
                overlap_with=overlap_with)  # fmt: skip


def queue_backfill(conn: psycopg.Connection[Any], table: str | None, column: str | None) -> list[Registration]:
    """Queue the rows of ``table.column`` (or of every registered column) that have text but no embedding;
    the registrations, for whoever drains the queue."""
    targets = _targets(conn, table, column)
    for registration in targets:
        queue_rows(conn, registration)
    return targets


def checked_encoder(registration: Registration) -> Encoder:
    """The encoder for a registration's model, refusing one whose dimension or files differ from the registry's."""
    encoder = encoder_for(registration.model)
    if encoder.dimension != registration.dimension:
        raise InvalidInput(
            f"Model {registration.model!r} here gives {encoder.dimension} dimensions, but "
            f"{registration.table}.{registration.column} was registered with {registration.dimension}."
        )
    if encoder.revision != registration.model_revision:
        raise InvalidInput(
            f"Model {registration.model!r} here (revision {encoder.revision}) is not the one "
            f"{registration.table}.{registration.column} was registered with (revision "
            f"{registration.model_revision}): its vectors would not compare. Install that model, or switch the "
            f"column: pgsim change-model {registration.table} {registration.column} --model <name>"
        )
    encoder.warn_truncation = False  # counted in stats; a worker's log would repeat it every batch
    return encoder


def _targets(conn: psycopg.Connection[Any], table: str | None, column: str | None) -> list[Registration]:
    forget_dropped(conn)
    every = registrations(conn)
    if table is None:
        return every
    from pgsim.columns.registry import require_registration

    if column is not None:
        chosen = require_registration(conn, table, column)
        return [r for r in every if r.id == chosen.id or r.replaces == chosen.id]
    found = [r for r in every if table in (r.table, r.table_name)]
    if not found:
        raise InvalidInput(f"Table {table!r} has no registered embedding column (pgsim add-embedding).")
    return found


def _queued(conn: psycopg.Connection[Any], ids: list[int]) -> int:
    row = conn.execute("SELECT count(*) FROM pgsim.queue WHERE embedding_id = ANY(%s)", [ids]).fetchone()
    return int(row[0]) if row else 0


def _batch(
    conn: psycopg.Connection[Any],
    registration: Registration,
    encoder: Encoder,
    limit: int,
    *,
    retried: bool,
    max_attempts: int,
    retry_delay: float,
    cache: bool,
    encoding: contextlib.AbstractContextManager[Any],
) -> SyncReport | None:
    """Claim, encode and write one batch in one transaction; None when nothing is ready."""
    report = SyncReport(batches=1)
    with conn.transaction():
        claimed = conn.execute(
            CLAIM, {"registration": registration.id, "retried": retried, "limit": limit}, prepare=False
        ).fetchall()
        if not claimed:
            return None
        ids = [entry_id for entry_id, _ in claimed]
        try:
            with conn.transaction():
                done = _encode_and_write(conn, registration, encoder, claimed, report, cache=cache, encoding=encoding)
        except Exception as exc:
            if conn.broken or isinstance(exc, TRANSIENT):
                raise  # not the rows' fault: the batch rolls back and its entries are claimed again, unchanged
            message = _describe_failure(registration, exc)
            log.warning("batch of %d rows of %s.%s failed: %s", len(ids), registration.table,
                        registration.column, message)  # fmt: skip
            # Which row of a failed batch is at fault is unknown: each is retried alone at once, and only a
            # row that fails alone waits before its next attempt.
            delay = retry_delay if len(ids) == 1 else 0.0
            conn.execute(RECORD_FAILURE, {"error": message, "delay": delay, "max_delay": MAX_RETRY_DELAY, "ids": ids})
            buried = conn.execute(BURY, {"ids": ids, "max_attempts": max_attempts}).rowcount
            report.dead, report.failed = buried, len(ids) - buried
        else:
            conn.execute("DELETE FROM pgsim.queue WHERE id = ANY(%s)", [done])
    return report


def _encode_and_write(
    conn: psycopg.Connection[Any],
    registration: Registration,
    encoder: Encoder,
    claimed: list[tuple[int, Any]],
    report: SyncReport,
    *,
    cache: bool,
    encoding: contextlib.AbstractContextManager[Any],
) -> list[int]:
    """Encode the claimed rows' current text and write it where the text is unchanged; the ids of the
    entries that are done (written, emptied, or whose row is gone)."""
    rows = conn.execute(
        sql.SQL(
            "SELECT _pgsim_q._pgsim_id, _pgsim_q._pgsim_key, s.found, s.source, md5(s.source) "
            "FROM unnest(%s::bigint[], %s::jsonb[]) AS _pgsim_q(_pgsim_id, _pgsim_key) LEFT JOIN LATERAL "
            "(SELECT true AS found, {source} AS source FROM {table} WHERE {match}) AS s ON true"
        ).format(
            source=registration.source_sql,
            table=registration.table_sql,
            match=key_match(registration, sql.SQL("_pgsim_q._pgsim_key")),
        ),
        [[entry_id for entry_id, _ in claimed], [Jsonb(key) for _, key in claimed]],
        prepare=False,
    ).fetchall()
    present = [row for row in rows if row[2]]
    gone = [row[0] for row in rows if not row[2]]
    texts = [row[3] for row in present]
    found = lookup(conn, encoder, texts) if cache else {}
    to_encode = missing(texts, found)
    with encoding:  # with two lanes, one forward pass at a time: the model's threads are the machine's cores
        started = time.perf_counter()
        encoded = encoder.encode(to_encode)
        report.encode_seconds += time.perf_counter() - started
    if cache:
        store(conn, encoder, to_encode, encoded)
        report.cached += sum(1 for text in texts if text in found)
    vectors = merged(texts, encoded, found)
    started = time.perf_counter()
    conn.execute(TEMP_TABLE)
    with conn.cursor() as cur:
        with cur.copy(
            "COPY pgsim_sync (_pgsim_qid, _pgsim_key, _pgsim_hash, _pgsim_vector) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "jsonb", "text", "vector"])
            for (entry_id, key, _, _, digest), vector in zip(present, vectors, strict=True):
                copy.write_row((entry_id, Jsonb(key), digest, vector))
        written = cur.execute(
            sql.SQL(
                "UPDATE {table} SET {column} = _pgsim_v._pgsim_vector{cast} FROM pgsim_sync AS _pgsim_v "
                "WHERE {match} AND md5({source}) IS NOT DISTINCT FROM _pgsim_v._pgsim_hash "
                "RETURNING _pgsim_v._pgsim_qid"
            ).format(
                table=registration.table_sql,
                column=sql.Identifier(registration.column),
                cast=sql.SQL("::halfvec" if registration.dtype == "halfvec" else ""),
                match=key_match(registration, sql.SQL("_pgsim_v._pgsim_key")),
                source=registration.source_sql,
            ),
            prepare=False,
        ).fetchall()
    report.write_seconds += time.perf_counter() - started
    done = {entry_id for (entry_id,) in written}
    emptied = sum(1 for row, vector in zip(present, vectors, strict=True) if vector is None and row[0] in done)
    report.embedded += len(done) - emptied
    report.emptied += emptied
    report.missing += len(gone)
    report.stale += len(present) - len(done)
    return sorted(done) + gone


def _server_and_database(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    row = conn.execute("SELECT pg_postmaster_start_time(), current_database()").fetchone()
    return tuple(row or ())


def database_is_remote(conn: psycopg.Connection[Any]) -> bool:
    """Whether ``conn`` reaches its server at an address other than this machine's socket or loopback."""
    return not is_local_host(conn.info.host)


def _describe_failure(registration: Registration, exc: Exception) -> str:
    if isinstance(exc, psycopg.errors.UndefinedColumn):
        return (
            f"{exc.diag.message_primary}: the source of {registration.table}.{registration.column} "
            f"({registration.source}) reads a column that is gone. Restore it, or remove and re-add the "
            "embedding with another source (pgsim remove-embedding / add-embedding)."
        )
    if isinstance(exc, psycopg.Error):
        return f"{type(exc).__name__}: {exc.diag.message_primary or exc}"
    return f"{type(exc).__name__}: {exc}"


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
    ) -> None:
        self.dsn = dsn
        self.table, self.column = table, column
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.reconnect_delay = reconnect_delay
        self.cache = cache
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
                    overlap = database_is_remote(work) if self.overlap is None else self.overlap
                    second = connections.enter_context(self._connect()) if overlap else None
                    listen = connections.enter_context(self._connect())
                    listen.execute("LISTEN pgsim")
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

        return psycopg.connect(
            resolve_dsn(self.dsn), autocommit=True, application_name=WORKER_APPLICATION_NAME, connect_timeout=10
        )

    def _drain(self, conn: psycopg.Connection[Any], second: psycopg.Connection[Any] | None) -> SyncReport:
        """Every target in turn; one this worker cannot serve (its model is missing here, say) is logged and
        skipped, and the others go on."""
        report = SyncReport()
        for registration in _targets(conn, self.table, self.column):
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
