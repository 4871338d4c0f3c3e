"""Bulk ingest from Python: rows in, rows with their embeddings out, written with COPY.

Each chunk is one transaction: the rows go into a temp table shaped like the target's columns (COPY),
PostgreSQL computes each registered column's source text there (so a source expression means what it
means for the triggers), the texts are encoded in one call per column, the vectors follow by binary COPY,
and one INSERT … SELECT writes rows and vectors together. Rows arrive with their embeddings, so the
triggers queue none of them (a row whose text is empty gets NULL and is queued, then dropped by a worker).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgsim.errors import InvalidInput
from pgsim.psycopg import register
from pgsim.registry import Registration, registrations
from pgsim.sync import checked_encoder

DEFAULT_CHUNK_SIZE = 2048


@dataclass
class IngestReport:
    rows: int = 0
    encoded: int = 0  # texts encoded (rows times registered columns, less empty texts)
    empty: int = 0
    truncated: int = 0
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
) -> IngestReport:
    """Insert ``rows`` (mappings of column name to value, alike in their keys) into ``table`` with every
    registered embedding column filled. Each chunk of ``chunk_size`` rows commits on its own (inside the
    caller's transaction, it is a savepoint). The rows must hold the columns the sources read."""
    if chunk_size < 1:
        raise InvalidInput(f"chunk_size must be at least 1; got {chunk_size}.")
    targets = _targets(conn, table)
    register(conn)
    encoders = [checked_encoder(target) for target in targets]
    report = IngestReport()
    started = time.perf_counter()
    iterator = iter(rows)
    columns: list[str] | None = None
    while chunk := list(itertools.islice(iterator, chunk_size)):
        if columns is None:
            columns = _columns_of(chunk[0], targets)
        _ingest_chunk(conn, targets, encoders, columns, chunk, report)
        report.seconds = time.perf_counter() - started
        if progress:
            progress(report)
    report.seconds = time.perf_counter() - started
    return report


def _targets(conn: psycopg.Connection[Any], table: str) -> list[Registration]:
    from pgsim.names import table_identifier

    resolved = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = to_regclass(%s)",
        [table_identifier(table).as_string(conn)],
    ).fetchone()
    if resolved is None:
        raise InvalidInput(f"Table {table!r} does not exist (or is not on the search_path).")
    found = [r for r in registrations(conn) if (r.schema, r.table_name) == tuple(resolved)]
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


def _ingest_chunk(
    conn: psycopg.Connection[Any],
    targets: list[Registration],
    encoders: list[Any],
    columns: list[str],
    chunk: list[Mapping[str, Any]],
    report: IngestReport,
) -> None:
    table = targets[0].table_sql
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    vector_columns = [sql.Identifier(f"_pgsim_v{i}") for i in range(len(targets))]
    write_started = time.perf_counter()
    with conn.transaction():
        _check_registrations(conn, targets)
        conn.execute(
            sql.SQL("CREATE TEMP TABLE pgsim_ingest ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA").format(
                names, table
            )
        )
        conn.execute("ALTER TABLE pgsim_ingest ADD COLUMN _pgsim_row bigint")
        with conn.cursor() as cur:
            with cur.copy(sql.SQL("COPY pgsim_ingest ({}, _pgsim_row) FROM STDIN").format(names)) as copy:
                for number, row in enumerate(chunk):
                    if len(row) != len(columns) or any(name not in row for name in columns):
                        raise InvalidInput(
                            f"Row {report.rows + number} has columns {sorted(row)}; "
                            f"the first row had {sorted(columns)}."
                        )
                    copy.write_row([row[name] for name in columns] + [number])
        write_seconds = time.perf_counter() - write_started
        vectors = []
        for target, encoder in zip(targets, encoders, strict=True):
            started = time.perf_counter()
            texts = _source_texts(conn, target, len(chunk))
            write_seconds += time.perf_counter() - started
            before = encoder.stats.truncated
            started = time.perf_counter()
            vectors.append(encoder.encode(texts))
            report.encode_seconds += time.perf_counter() - started
            report.truncated += encoder.stats.truncated - before
            report.empty += sum(1 for text in texts if text is None or not text.strip())
            report.encoded += sum(1 for text in texts if text is not None and text.strip())
        started = time.perf_counter()
        conn.execute(
            sql.SQL("CREATE TEMP TABLE pgsim_ingest_vectors (_pgsim_row bigint, {}) ON COMMIT DROP").format(
                sql.SQL(", ").join(sql.SQL("{} vector").format(name) for name in vector_columns)
            )
        )
        with conn.cursor() as cur:
            with cur.copy(
                sql.SQL("COPY pgsim_ingest_vectors (_pgsim_row, {}) FROM STDIN WITH (FORMAT BINARY)").format(
                    sql.SQL(", ").join(vector_columns)
                )
            ) as copy:
                copy.set_types(["int8"] + ["vector"] * len(targets))
                for number in range(len(chunk)):
                    copy.write_row([number] + [column_vectors[number] for column_vectors in vectors])
            cur.execute(
                sql.SQL(
                    "INSERT INTO {table} ({names}, {embedding_columns}) SELECT {source_names}, {vectors} "
                    "FROM pgsim_ingest JOIN pgsim_ingest_vectors USING (_pgsim_row) ORDER BY _pgsim_row"
                ).format(
                    table=table,
                    names=names,
                    embedding_columns=sql.SQL(", ").join(sql.Identifier(t.column) for t in targets),
                    source_names=sql.SQL(", ").join(sql.Identifier("pgsim_ingest", name) for name in columns),
                    vectors=sql.SQL(", ").join(
                        sql.SQL("{}{}").format(name, sql.SQL("::halfvec" if t.dtype == "halfvec" else ""))
                        for name, t in zip(vector_columns, targets, strict=True)
                    ),
                )
            )
        write_seconds += time.perf_counter() - started
    report.write_seconds += write_seconds
    report.rows += len(chunk)


def _check_registrations(conn: psycopg.Connection[Any], targets: list[Registration]) -> None:
    """The registrations are still those the encoders were chosen for (a model change may have completed
    since the ingest began); FOR SHARE keeps them so until this chunk commits."""
    current = conn.execute(
        "SELECT id, column_name, model, model_revision FROM pgsim.embedding WHERE id = ANY(%s) ORDER BY id FOR SHARE",
        [[target.id for target in targets]],
    ).fetchall()
    expected = sorted((t.id, t.column, t.model, t.model_revision) for t in targets)
    if [tuple(row) for row in current] != expected:
        raise InvalidInput(
            "The embedding columns of the table changed while ingesting (a model change completed?): the rows "
            "written so far are committed; ingest the rest again."
        )


def _source_texts(conn: psycopg.Connection[Any], target: Registration, count: int) -> list[str | None]:
    """Each staged row's source text, computed by PostgreSQL as the triggers' workers would."""
    try:
        with conn.transaction():
            fetched = conn.execute(
                sql.SQL("SELECT {} FROM pgsim_ingest ORDER BY _pgsim_row").format(target.source_sql)
            ).fetchall()
    except psycopg.errors.UndefinedColumn as exc:
        raise InvalidInput(
            f"The source of {target.table}.{target.column} ({target.source}) reads a column the rows do not carry "
            f"({exc.diag.message_primary}); include it in every row."
        ) from None
    assert len(fetched) == count
    return [text for (text,) in fetched]
