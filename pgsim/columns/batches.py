"""One batch of the queue, in one transaction: claim entries (``FOR UPDATE SKIP LOCKED``), read the rows'
current text, encode it in one call, binary-COPY the vectors into a temp table, write them with one
``UPDATE … FROM`` where the text still hashes as it did when read, delete the entries done; failures count
an attempt, wait, and end in ``pgsim.dead_letter``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, fields
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pgsim.columns.cache import lookup, merged, missing, store
from pgsim.columns.chunking.sync_step import ChunkStep
from pgsim.columns.registry import Registration, chunk_table, key_match
from pgsim.db.catalog import pin_search_path, vector_schema
from pgsim.encoding.encoder import Encoder, encoder_for
from pgsim.errors import InvalidInput

log = logging.getLogger(__name__)


MAX_RETRY_DELAY = 300.0


# Errors that say nothing about the rows (a deadlock, a lock or statement timeout, an interrupted query).
TRANSIENT = (
    psycopg.errors.TransactionRollback,
    psycopg.errors.DeadlockDetected,  # not TransactionRollback subclasses in psycopg 3.3
    psycopg.errors.SerializationFailure,
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
    _pgsim_qid bigint, _pgsim_key jsonb, _pgsim_hash text, _pgsim_vector {vector}
) ON COMMIT DELETE ROWS
"""


# Whether row-level security may hide rows of %(table)s from the current role (rows_may_be_hidden). The
# policies that apply to it for SELECT are those for all roles (0) or for a role whose privileges it has.
MAY_BE_HIDDEN = """
WITH applying AS (
    SELECT p.polpermissive, pg_catalog.pg_get_expr(p.polqual, p.polrelid) AS qual
    FROM pg_catalog.pg_policy p
    WHERE p.polrelid = %(table)s::pg_catalog.oid AND p.polcmd IN ('r', '*')
      AND (0::pg_catalog.oid = ANY(p.polroles) OR EXISTS (SELECT 1 FROM pg_catalog.unnest(p.polroles) AS r(oid)
                                          WHERE pg_catalog.pg_has_role(CURRENT_USER, r.oid, 'USAGE')))
)
SELECT pg_catalog.row_security_active(%(table)s::pg_catalog.oid)
   AND NOT (EXISTS (SELECT 1 FROM applying WHERE polpermissive AND qual = 'true')
            AND NOT EXISTS (SELECT 1 FROM applying WHERE NOT polpermissive))
"""


SAME_TABLE = "SELECT pg_catalog.to_regclass(%s) = %s::pg_catalog.oid AND NOT EXISTS (SELECT FROM {} WHERE false)"


def chunk_step(
    conn: psycopg.Connection[Any], registration: Registration, encoder: Encoder, *, cache: bool
) -> ChunkStep | None:
    """The chunk step of a batch of ``registration`` (it replaces the documents' chunks in the batch's own
    transaction), or None when its documents are not chunked."""
    table = chunk_table(conn, registration)
    return None if table is None else ChunkStep(conn, registration, table, encoder, cache=cache)


class TableMoved(Exception):
    """The registration's table name now names another table: read the registration again (by its OID)."""


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


def claim_and_encode(
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
        pin_search_path(conn)  # the source expression and everything below resolve in pg_catalog
        # The statements below name the table: it must still be the registered one (a table renamed, and
        # another made under its name, since the registration was read), and it stays so until the commit.
        same = conn.execute(
            sql.SQL(
                "SELECT pg_catalog.to_regclass(%s) = %s::pg_catalog.oid AND NOT EXISTS (SELECT FROM {} WHERE false)"
            ).format(registration.table_sql),
            [registration.table_sql.as_string(conn), registration.table_oid],
        ).fetchone()
        if not (same and same[0]):
            raise TableMoved(f"{registration.table} is no longer the table registered as {registration.table_oid}")
        claimed = conn.execute(
            CLAIM, {"registration": registration.id, "retried": retried, "limit": limit}, prepare=False
        ).fetchall()
        if not claimed:
            return None
        ids = [entry_id for entry_id, _ in claimed]
        try:
            with conn.transaction():
                done, unseen = encode_and_write(
                    conn, registration, encoder, claimed, report, cache=cache, encoding=encoding
                )
        except Exception as exc:
            if conn.broken or isinstance(exc, (*TRANSIENT, psycopg.errors.UndefinedTable)):
                # not the rows' fault (a renamed table: the caller reads its registration again): the batch
                # rolls back and its entries are claimed again, unchanged
                raise
            message = describe_failure(registration, exc)
            log.warning("batch of %d rows of %s.%s failed: %s", len(ids), registration.table,
                        registration.column, message)  # fmt: skip
            # Which row of a failed batch is at fault is unknown: each is retried alone at once, and only a
            # row that fails alone waits before its next attempt.
            record_failure(conn, ids, message, report, delay=retry_delay if len(ids) == 1 else 0.0,
                           max_attempts=max_attempts)  # fmt: skip
        else:
            conn.execute("DELETE FROM pgsim.queue WHERE id = ANY(%s)", [done])
            if unseen:
                message = (
                    f"the worker's role cannot see these rows of {registration.table}: its row-level security "
                    "hides them (or they were deleted). Let the worker see every row: pgsim grant worker ROLE "
                    f"--table {registration.table}"
                )
                log.warning("%d queued rows: %s", len(unseen), message)
                record_failure(conn, unseen, message, report, delay=retry_delay, max_attempts=max_attempts)
    return report


def record_failure(
    conn: psycopg.Connection[Any], ids: list[int], message: str, report: SyncReport, *, delay: float, max_attempts: int
) -> None:
    """Count an attempt on the entries ``ids``; those past ``max_attempts`` move to pgsim.dead_letter."""
    conn.execute(RECORD_FAILURE, {"error": message, "delay": delay, "max_delay": MAX_RETRY_DELAY, "ids": ids})
    buried = conn.execute(BURY, {"ids": ids, "max_attempts": max_attempts}).rowcount
    report.dead += buried
    report.failed += len(ids) - buried


def encode_and_write(
    conn: psycopg.Connection[Any],
    registration: Registration,
    encoder: Encoder,
    claimed: list[tuple[int, Any]],
    report: SyncReport,
    *,
    cache: bool,
    encoding: contextlib.AbstractContextManager[Any],
) -> tuple[list[int], list[int]]:
    """Encode the claimed rows' current text and write it where the text is unchanged. Returns the ids of the
    entries that are done (written, emptied, or whose row is gone) and of those whose row the current role
    may not see (row-level security): those are not dropped as gone."""
    # looked up first, so that the read below stays the batch's last statement while it encodes
    chunks = chunk_step(conn, registration, encoder, cache=cache)
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
    if chunks is None:
        found = lookup(conn, encoder, texts) if cache else {}
        to_encode = missing(texts, found)
    else:  # a chunked document's vector is its chunks' mean (see pgsim.columns.chunking.sync_step)
        chunks.prepare([(row[0], row[1], row[3]) for row in present])
    with encoding:  # with two lanes, one forward pass at a time: the model's threads are the machine's cores
        started = time.perf_counter()
        encoded = encoder.encode(to_encode) if chunks is None else chunks.encode()
        report.encode_seconds += time.perf_counter() - started
    if chunks is not None:
        vectors = encoded
        report.cached += chunks.cache_hits
    else:
        if cache:
            store(conn, encoder, to_encode, encoded)
            report.cached += sum(1 for text in texts if text in found)
        vectors = merged(texts, encoded, found)
    started = time.perf_counter()
    vectors_in = vector_schema(conn)
    conn.execute(sql.SQL(TEMP_TABLE).format(vector=sql.Identifier(vectors_in, "vector")))
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
                cast=sql.SQL("::{}").format(sql.Identifier(vectors_in, registration.column_type)),
                match=key_match(registration, sql.SQL("_pgsim_v._pgsim_key")),
                source=registration.source_sql,
            ),
            prepare=False,
        ).fetchall()
    done = {entry_id for (entry_id,) in written}
    if chunks is not None:  # the rows just written, whose text is the one chunked: not one changed meanwhile
        chunks.write(done)
    report.write_seconds += time.perf_counter() - started
    emptied = sum(1 for row, vector in zip(present, vectors, strict=True) if vector is None and row[0] in done)
    report.embedded += len(done) - emptied
    report.emptied += emptied
    unseen = gone if gone and rows_may_be_hidden(conn, registration) else []
    report.missing += len(gone) - len(unseen)
    report.stale += len(present) - len(done)
    return sorted(done) + [entry_id for entry_id in gone if entry_id not in unseen], unseen


def rows_may_be_hidden(conn: psycopg.Connection[Any], registration: Registration) -> bool:
    """Whether row-level security may hide rows of the table from the current role: it applies, and no
    permissive policy of the role shows every row (USING (true), as pgsim grant worker makes) or a
    restrictive one applies too."""
    row = conn.execute(MAY_BE_HIDDEN, {"table": registration.table_oid}).fetchone()
    return bool(row and row[0])


def describe_failure(registration: Registration, exc: Exception) -> str:
    if isinstance(exc, psycopg.errors.UndefinedColumn):
        return (
            f"{exc.diag.message_primary}: the source of {registration.table}.{registration.column} "
            f"({registration.source}) reads a column that is gone. Restore it, or remove and re-add the "
            "embedding with another source (pgsim remove-embedding / add-embedding)."
        )
    if isinstance(exc, psycopg.Error):
        return f"{type(exc).__name__}: {exc.diag.message_primary or exc}"
    return f"{type(exc).__name__}: {exc}"
