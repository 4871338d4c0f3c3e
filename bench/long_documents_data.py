"""bench/long_documents.py's tables: the man pages in a chunked table per chunk setting, filled by pgsim's
sync (timed) against the encoder's own rate on a random sample of the same chunk texts, with each page's
truncated vector (its first window, the baseline) beside pgsim's column; storage sizes; the chunk vectors
read back for the numpy re-rankers."""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from pgsim.columns.adding import add_embedding
from pgsim.columns.chunking import Chunks, add_chunks, split
from pgsim.columns.chunking.splitting import model_tokenizer
from pgsim.columns.worker import sync
from pgsim.encoding.encoder import encoder_for
from pgsim.encoding.models import DEFAULT_MODEL

SCHEMA = "bench_long"
Matrix = np.ndarray[Any, np.dtype[np.float32]]


@dataclass
class Ingest:
    chunks: int
    sync_seconds: float
    sync_encode_seconds: float
    chunk_rate: float  # chunks/s of encoder.encode on a random sample of the chunk texts
    sample: int


def table_name(chunks: Chunks, pages: int) -> str:
    return f"{SCHEMA}.pages_{chunks.tokens}_{chunks.overlap}_{pages}"


def chunk_table(table: str) -> str:
    return f"{table}__embedding_chunks"


def build(conn: psycopg.Connection[Any], pages: list[Any], chunks: Chunks, *, sample: int, fresh: bool) -> Ingest:
    """The table of ``pages`` (id, name, section, body, tsv, embedding, first_window) chunked by ``chunks``,
    filled by pgsim.sync and timed, then ``first_window`` by encoder.encode of the pages (untimed); reused
    (with the timings it was built with) when it exists and not ``fresh``."""
    table = table_name(chunks, len(pages))
    ident = sql.Identifier(*table.split("."))
    tag = f"{len(pages)} v2"  # v2: the column holds the chunks' mean (v1: the first window)
    row = conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", [table]).fetchone()
    if not fresh and row and row[0] and json.loads(row[0]).get("tag") == tag:
        print(f"{table}: reused, with the ingest timings it was built with", file=sys.stderr, flush=True)
        return Ingest(**json.loads(row[0])["ingest"])
    create(conn, table, pages, chunks)
    print(f"{table}: pgsim.sync of {len(pages)} pages into chunks {chunks} ...", file=sys.stderr, flush=True)
    last = [time.perf_counter()]

    def progress(report: Any, total: int) -> None:
        if time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            print(f"  {report.done}/{total} pages", file=sys.stderr, flush=True)

    started = time.perf_counter()
    report = sync(conn, table=table, allow_superuser=True, calibrate=False, progress=progress)
    seconds = time.perf_counter() - started
    assert report.embedded == len(pages), report
    conn.execute(sql.SQL("ANALYZE {}").format(ident))
    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(*chunk_table(table).split("."))))
    count_row = conn.execute(
        sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*chunk_table(table).split(".")))
    ).fetchone()
    count = int(count_row[0]) if count_row else 0
    chunk_rate, sampled = encoder_rate(pages, chunks, sample)
    ingest = Ingest(count, seconds, report.encode_seconds, chunk_rate, sampled)
    write_first_windows(conn, table, pages)
    print(f"  {seconds:.0f}s, {count} chunks; encoder {chunk_rate:.1f} chunks/s", file=sys.stderr, flush=True)
    comment = json.dumps({"tag": tag, "ingest": vars(ingest)})
    conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(ident, sql.Literal(comment)))
    return ingest


def create(conn: psycopg.Connection[Any], table: str, pages: list[Any], chunks: Chunks) -> None:
    """``table`` made again: the pages (id, name, section, body, tsv with a GIN index), embedding ``embedding``
    of ``body`` chunked by ``chunks``, every row queued by its insert trigger."""
    ident = sql.Identifier(*table.split("."))
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(*chunk_table(table).split("."))))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(ident))
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (id int PRIMARY KEY, name text, section text, body text, "
            "tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', body)) STORED)"
        ).format(ident)
    )
    add_embedding(conn, table, "embedding", source="body")
    add_chunks(conn, table, "embedding", chunks)
    conn.execute(sql.SQL("CREATE INDEX ON {} USING gin (tsv)").format(ident))
    conn.execute(sql.SQL("CREATE INDEX ON {} (section)").format(ident))
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} (id, name, section, body) FROM STDIN").format(ident)) as copy:
        for i, page in enumerate(pages):
            copy.write_row((i, page.name, page.section, page.text))


_first_windows: dict[int, list[Any]] = {}  # len(pages) -> each page's truncated vector, encoded once a run


def write_first_windows(conn: psycopg.Connection[Any], table: str, pages: list[Any]) -> None:
    """Column ``first_window``: each page's single vector as the model reads its text (the first 254 word
    pieces), the truncated baseline; encoded once per run for every table of the same pages."""
    if len(pages) not in _first_windows:
        print(f"  the {len(pages)} pages' truncated vectors (the baseline) ...", file=sys.stderr, flush=True)
        encoder = encoder_for(DEFAULT_MODEL)
        encoder.warn_truncation = False
        _first_windows[len(pages)] = encoder.encode([page.text for page in pages])
    ident = sql.Identifier(*table.split("."))
    conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN first_window vector(384)").format(ident))
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL("UPDATE {} SET first_window = %s WHERE id = %s").format(ident),
            [(vector, i) for i, vector in enumerate(_first_windows[len(pages)])],
        )


def encoder_rate(pages: list[Any], chunks: Chunks, sample: int) -> tuple[float, int]:
    """The encoder's own chunks/s on a fixed-seed sample of ``sample`` chunk texts (cut as the worker cuts
    them)."""
    encoder = encoder_for(DEFAULT_MODEL)
    encoder.warn_truncation = False
    tokenizer = model_tokenizer(encoder)
    texts = [chunk.text for page in pages for chunk in split(page.text, chunks, tokenizer)]
    chosen = random.Random(7).sample(texts, min(sample, len(texts)))
    started = time.perf_counter()
    encoder.encode(chosen)
    return len(chosen) / (time.perf_counter() - started), len(chosen)


def interleaved(conn: psycopg.Connection[Any], pages: list[Any], chunks: Chunks, rounds: int) -> list[list[float]]:
    """``rounds`` rounds, in alternating order, of pgsim.sync of ``pages`` into a fresh chunked table and of
    encoder.encode on exactly the chunk texts it makes (all sync encodes: the document vector is their mean):
    [sync seconds, chunk encode seconds] per round."""
    encoder = encoder_for(DEFAULT_MODEL)
    encoder.warn_truncation = False
    tokenizer = model_tokenizer(encoder)
    texts = [chunk.text for page in pages for chunk in split(page.text, chunks, tokenizer)]
    table = f"{SCHEMA}.ingest_{chunks.tokens}_{chunks.overlap}"
    found = []
    for round_no in range(rounds):
        timings = [0.0, 0.0]
        for step in ("sync", "encode") if round_no % 2 == 0 else ("encode", "sync"):
            if step == "sync":
                create(conn, table, pages, chunks)
                started = time.perf_counter()
                sync(conn, table=table, allow_superuser=True, calibrate=False)
                timings[0] = time.perf_counter() - started
            else:
                started = time.perf_counter()
                encoder.encode(texts)
                timings[1] = time.perf_counter() - started
        print(f"  ingest round {round_no + 1}: sync {timings[0]:.1f}s, encoder {timings[1]:.1f}s "
              f"({len(texts)} chunks, {len(pages)} pages)", file=sys.stderr, flush=True)  # fmt: skip
        found.append(timings)
    return found


def sizes(conn: psycopg.Connection[Any], table: str) -> dict[str, int]:
    """Bytes: the table (with TOAST and indexes), the chunk table (the same), and each index of both."""
    found = {}
    for name in (table, chunk_table(table)):
        row = conn.execute("SELECT pg_total_relation_size(%s::regclass)", [name]).fetchone()
        found[f"{name.split('.')[1]} total"] = int(row[0]) if row else 0
        for index, size in conn.execute(
            "SELECT c.relname, pg_relation_size(i.indexrelid) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass ORDER BY 1",
            [name],
        ).fetchall():
            found[f"  index {index}"] = int(size)
    return found


def chunk_vectors(conn: psycopg.Connection[Any], table: str) -> dict[int, Matrix]:
    """id -> its chunk vectors (unit length), in chunk order."""
    found: dict[int, list[list[float]]] = {}
    rows = conn.execute(
        sql.SQL("SELECT id, embedding::real[] FROM {} ORDER BY id, chunk_no").format(
            sql.Identifier(*chunk_table(table).split("."))
        )
    )
    for doc, vector in rows:
        found.setdefault(doc, []).append(vector)
    matrices = {}
    for doc, vectors in found.items():
        matrix = np.asarray(vectors, dtype=np.float32)
        matrices[doc] = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    return matrices
