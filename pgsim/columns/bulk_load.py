"""Bulk ingest from Python: rows in, rows with their embeddings out, written with COPY.

Each chunk is staged, encoded, then written. Staging: the rows go into a temp table shaped like the
target's columns (COPY), and PostgreSQL computes each registered column's source text there (so a source
expression means what it means for the triggers). Encoding runs in a thread of its own, one call per
column, while this connection writes the previous chunk and stages the next: the model never waits for
the database, nor the database for the model. Writing is one transaction per chunk: the rows follow by
COPY again and the vectors by binary COPY, and one INSERT … SELECT writes rows and vectors together. Rows
arrive with their embeddings, so the triggers queue none of them (a row whose text is empty gets NULL and
is queued, then dropped by a worker). A chunked column is not encoded here: its vector is the mean of its
chunks, which the workers cut, encode and write with it (:mod:`pgsim.columns.chunking.sync_step`), so its
rows arrive with NULL there and the triggers queue them.

No temp table outlives the transaction that made it: behind a pooler in transaction mode (PgBouncer) the
next transaction may run on another server connection, where a session's temp table is not.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgsim.columns.batches import checked_encoder
from pgsim.columns.cache import Found, lookup, merged, missing, store
from pgsim.columns.registry import Registration, chunk_table, registrations
from pgsim.db.catalog import pin_search_path, resolve_table, vector_schema
from pgsim.db.standby import require_primary
from pgsim.encoding.encoder import Encoder
from pgsim.errors import InvalidInput
from pgsim.psycopg import register

# Rows per chunk: one chunk is written while the next encodes (bench/ingest.py tunes it).
DEFAULT_CHUNK_SIZE = 512
STAGED = "pgsim_ingest_rows"  # a chunk's rows, numbered by _pgsim_row, for one transaction
VECTORS = "pgsim_ingest_vectors"  # a chunk's vectors, by _pgsim_row, while it is written


@dataclass
class IngestReport:
    rows: int = 0
    encoded: int = 0  # texts encoded (rows times registered columns, less empty texts)
    empty: int = 0
    truncated: int = 0
    cached: int = 0  # texts found in pgsim.embedding_cache instead of encoded (with cache=True)
    queued: int = 0  # texts of chunked columns, left to the workers (their chunks and the column's vector)
    seconds: float = 0.0
    encode_seconds: float = 0.0
    write_seconds: float = 0.0


def ingest(
    conn: psycopg.Connection[Any],
    table: str,
    rows: Iterable[Mapping[str, Any]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Callable[[IngestReport], None] | None = None,
    cache: bool = False,
) -> IngestReport:
    """Insert ``rows`` (mappings of column name to value, alike in their keys) into ``table`` with every
    registered embedding column filled. Each chunk of ``chunk_size`` rows commits on its own (inside the
    caller's transaction, it is a savepoint). The rows must hold the columns the sources read. With
    ``cache``, text already in pgsim.embedding_cache is not encoded again, and what is encoded is added to it
    (:mod:`pgsim.columns.cache`)."""
    if chunk_size < 1:
        raise InvalidInput(f"chunk_size must be at least 1; got {chunk_size}.")
    require_primary(conn, "pgsim.ingest")
    targets = _targets(conn, table)
    register(conn)
    encoders = [None if chunk_table(conn, target) else checked_encoder(target) for target in targets]
    report = IngestReport()
    started = time.perf_counter()
    iterator = iter(rows)
    columns: list[str] | None = None
    pending: tuple[_Staged, Future[list[_Encoded]]] | None = None

    def write(staged: _Staged, encoded: Future[list[_Encoded]]) -> None:
        _write(conn, targets, encoders, cache, columns or [], staged, encoded, report)
        report.seconds = time.perf_counter() - started
        if progress:
            progress(report)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgsim-ingest") as encoding:
        for number in itertools.count():
            chunk = list(itertools.islice(iterator, chunk_size))
            if not chunk:
                break
            try:
                if columns is None:
                    columns = _columns_of(chunk[0], targets)
                staged = _stage(conn, targets, columns, chunk, report, first_row=number * chunk_size)
            except Exception:
                if pending is not None:  # the chunks before a bad one are written, as the docs promise
                    write(*pending)
                raise
            if cache:  # looked up while the model encodes the chunk before
                staged.found = [
                    {} if e is None else lookup(conn, e, texts) for e, texts in zip(encoders, staged.texts, strict=True)
                ]
            following = (staged, encoding.submit(_encode, encoders, staged.to_encode))
            if pending is not None:  # written while the model encodes the chunk just staged
                write(*pending)
            pending = following
        if pending is not None:
            write(*pending)
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class _Staged:
    rows: list[list[Any]]  # the chunk's rows' values in column order, copied again where they are written
    texts: list[list[str | None]]  # per registered column, the rows' source texts
    found: list[Found]  # per registered column, vectors from the cache (empty when it is off)

    @property
    def to_encode(self) -> list[list[str | None]]:
        return [missing(texts, found) for texts, found in zip(self.texts, self.found, strict=True)]


@dataclass
class _Encoded:
    vectors: list[Any]
    seconds: float
    truncated: int


def _encode(encoders: list[Encoder | None], texts: list[list[str | None]]) -> list[_Encoded]:
    """In the encoding thread: one call per registered column that is encoded here (an encoder, not None)."""
    results = []
    for encoder, column_texts in zip(encoders, texts, strict=True):
        if encoder is None:
            results.append(_Encoded([None] * len(column_texts), 0.0, 0))
            continue
        before = encoder.stats.truncated
        started = time.perf_counter()
        vectors = encoder.encode(column_texts)
        results.append(_Encoded(vectors, time.perf_counter() - started, encoder.stats.truncated - before))
    return results


def _targets(conn: psycopg.Connection[Any], table: str) -> list[Registration]:
    resolved = resolve_table(conn, table)
    found = [r for r in registrations(conn) if (r.schema, r.table_name) == (resolved.schema, resolved.name)]
    if not found:
        raise InvalidInput(
            f"Table {table!r} has no registered embedding column: register one first (pgsim.add_embedding), "
            "or load it with COPY and let the workers embed it."
        )
    return found


def _columns_of(first: Mapping[str, Any], targets: list[Registration]) -> list[str]:
    if not isinstance(first, Mapping) or not first:
        raise InvalidInput(f"Each row must be a non-empty mapping of column name to value; got {first!r}.")
    columns = list(first)
    given = {target.column for target in targets} & set(columns)
    if given:
        raise InvalidInput(f"Rows must not carry the embedding column(s) {', '.join(sorted(given))}: pgsim fills them.")
    return columns


def _stage(
    conn: psycopg.Connection[Any],
    targets: list[Registration],
    columns: list[str],
    chunk: list[Mapping[str, Any]],
    report: IngestReport,
    *,
    first_row: int,
) -> _Staged:
    """Each registered column's source text for the chunk's rows, read from a temp table they are copied
    into for this transaction."""
    sources = [column for column in columns if any(column in target.source_columns for target in targets)]
    values = []
    for row_number, row in enumerate(chunk):
        if len(row) != len(columns) or any(column not in row for column in columns):
            raise InvalidInput(
                f"Row {first_row + row_number} has columns {sorted(row)}; the first row had {sorted(columns)}."
            )
        for column in sources:
            if isinstance(row[column], (bytes, bytearray, memoryview)):
                raise InvalidInput(
                    f"Row {first_row + row_number}: {column!r} is {type(row[column]).__name__}, but it "
                    "is the source of an embedding and holds text: decode it first (bytes.decode())."
                )
        values.append([row[column] for column in columns])
    started = time.perf_counter()
    with conn.transaction():
        pin_search_path(conn)  # the source expression reads as the workers read it
        _copy_rows(conn, targets, columns, values)
        texts = [_source_texts(conn, target, len(chunk)) for target in targets]
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(STAGED)))
    report.write_seconds += time.perf_counter() - started
    return _Staged(values, texts, [{} for _ in texts])


def _copy_rows(
    conn: psycopg.Connection[Any], targets: list[Registration], columns: list[str], rows: list[list[Any]]
) -> None:
    """Temp table STAGED, shaped like the target's ``columns``, holding ``rows`` numbered by _pgsim_row."""
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} AS SELECT {} FROM {} WITH NO DATA").format(
            sql.Identifier(STAGED), names, targets[0].table_sql
        )
    )
    conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN _pgsim_row bigint").format(sql.Identifier(STAGED)))
    with conn.cursor() as cur:
        statement = sql.SQL("COPY {} ({}, _pgsim_row) FROM STDIN").format(sql.Identifier(STAGED), names)
        with cur.copy(statement) as copy:
            for row_number, row in enumerate(rows):
                copy.write_row([*row, row_number])


def _write(
    conn: psycopg.Connection[Any],
    targets: list[Registration],
    encoders: list[Encoder | None],
    cache: bool,
    columns: list[str],
    staged: _Staged,
    encoded: Future[list[_Encoded]],
    report: IngestReport,
) -> None:
    """One transaction: the chunk's rows by COPY and its vectors by binary COPY, then both by INSERT … SELECT;
    with ``cache``, the vectors just encoded go into the cache too. A column without an encoder (a chunked one)
    gets NULL: the workers fill it."""
    results = encoded.result()
    to_encode = staged.to_encode
    vectors = [merged(t, r.vectors, f) for t, r, f in zip(staged.texts, results, staged.found, strict=True)]
    started = time.perf_counter()
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    vector_columns = [sql.Identifier(f"_pgsim_v{i}") for i in range(len(targets))]
    with conn.transaction():
        pin_search_path(conn)
        vectors_in = vector_schema(conn)
        _check_registrations(conn, targets)
        _copy_rows(conn, targets, columns, staged.rows)
        conn.execute(
            sql.SQL("CREATE TEMP TABLE {} (_pgsim_row bigint, {})").format(
                sql.Identifier(VECTORS),
                sql.SQL(", ").join(
                    sql.SQL("{} {}").format(name, sql.Identifier(vectors_in, "vector")) for name in vector_columns
                ),
            )
        )
        with conn.cursor() as cur:
            with cur.copy(
                sql.SQL("COPY {} (_pgsim_row, {}) FROM STDIN WITH (FORMAT BINARY)").format(
                    sql.Identifier(VECTORS), sql.SQL(", ").join(vector_columns)
                )
            ) as copy:
                copy.set_types(["int8"] + ["vector"] * len(targets))
                for number in range(len(staged.rows)):
                    copy.write_row([number] + [column[number] for column in vectors])
            cur.execute(
                sql.SQL(
                    "INSERT INTO {table} ({names}, {embedding_columns}) SELECT {source_names}, {vectors} "
                    "FROM {staged} JOIN {vectors_table} USING (_pgsim_row) ORDER BY _pgsim_row"
                ).format(
                    table=targets[0].table_sql,
                    names=names,
                    embedding_columns=sql.SQL(", ").join(sql.Identifier(t.column) for t in targets),
                    source_names=sql.SQL(", ").join(sql.Identifier(STAGED, name) for name in columns),
                    staged=sql.Identifier(STAGED),
                    vectors_table=sql.Identifier(VECTORS),
                    vectors=sql.SQL(", ").join(
                        sql.SQL("{}::{}").format(name, sql.Identifier(vectors_in, t.column_type))
                        for name, t in zip(vector_columns, targets, strict=True)
                    ),
                )
            )
        for encoder, texts, result in zip(encoders, to_encode, results, strict=True):
            if cache and encoder is not None:
                store(conn, encoder, texts, result.vectors)
        # dropped here, not ON COMMIT: inside the caller's transaction this one is a savepoint
        conn.execute(sql.SQL("DROP TABLE {}, {}").format(sql.Identifier(STAGED), sql.Identifier(VECTORS)))
    report.write_seconds += time.perf_counter() - started
    for encoder, result, texts, left in zip(encoders, results, staged.texts, to_encode, strict=True):
        if encoder is None:
            report.empty += sum(1 for text in texts if text is None or not text.strip())
            report.queued += sum(1 for text in texts if text is not None and text.strip())
            continue
        report.encode_seconds += result.seconds
        report.truncated += result.truncated
        report.empty += sum(1 for text in texts if text is None or not text.strip())
        report.encoded += sum(1 for text in left if text is not None and text.strip())
        report.cached += sum(1 for text, rest in zip(texts, left, strict=True) if rest is None and text is not None
                             and text.strip())  # fmt: skip
    report.rows += len(staged.rows)


def _check_registrations(conn: psycopg.Connection[Any], targets: list[Registration]) -> None:
    """The registrations are still those the encoders were chosen for (a model change may have completed
    since the ingest began). Read committed: the table's ROW EXCLUSIVE lock, which the INSERT takes anyway,
    keeps them so until this chunk commits (a model change completes under a lock that conflicts with it), and
    the registry read after it sees a switch that committed meanwhile. In a repeatable read or serializable
    transaction, whose snapshot may predate the switch, FOR SHARE on the registry rows (a serialization failure
    if they changed since), which needs UPDATE on pgsim.embedding."""
    conn.execute(sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE").format(targets[0].table_sql))
    isolation = conn.execute("SELECT pg_catalog.current_setting('transaction_isolation')").fetchone()
    lock = sql.SQL("" if isolation == ("read committed",) else " FOR SHARE")
    read = sql.SQL("SELECT id, column_name, model, model_revision FROM pgsim.embedding WHERE id = ANY(%s) ORDER BY id")
    try:
        current = conn.execute(read + lock, [[target.id for target in targets]]).fetchall()
    except psycopg.errors.InsufficientPrivilege:
        raise InvalidInput(
            f"pgsim.ingest in a {isolation[0] if isolation else ''} transaction must lock the table's registrations, "
            "which needs UPDATE on pgsim.embedding: ingest in a read committed transaction (psycopg's default), or as "
            "the table's owner."
        ) from None
    expected = sorted((t.id, t.column, t.model, t.model_revision) for t in targets)
    if [tuple(row) for row in current] != expected:
        raise InvalidInput(
            "The embedding columns of the table changed while ingesting (a model change completed?): the rows "
            "written so far are committed; ingest the rest again."
        )


def _source_texts(conn: psycopg.Connection[Any], target: Registration, count: int) -> list[str | None]:
    """Each staged row's source text, computed by PostgreSQL as the triggers' workers would."""
    try:
        with conn.transaction():  # inside _stage's, which pinned the search_path
            fetched = conn.execute(
                sql.SQL("SELECT {} FROM {} ORDER BY _pgsim_row").format(target.source_sql, sql.Identifier(STAGED))
            ).fetchall()
    except psycopg.errors.UndefinedColumn as exc:
        raise InvalidInput(
            f"The source of {target.table}.{target.column} ({target.source}) reads a column the rows do not carry "
            f"({exc.diag.message_primary}); include it in every row."
        ) from None
    assert len(fetched) == count
    return [text for (text,) in fetched]
