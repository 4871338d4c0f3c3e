"""What the queue worker's batch (:mod:`pgsim.columns.batches`) does for a chunked registration.

A chunked column's own vector is the normalised mean of its document's chunk vectors (one chunk: that
chunk's vector), written with the chunks in one transaction, so the document's vector and its chunks always
come from the same text, and the batch encodes each new chunk once and nothing else. In the batch's own
transaction, around the batch's read, encode and write:

1. :meth:`ChunkStep.prepare`: each row's text is cut into chunks (:func:`.splitting.split`) and each
   chunk's sha256 compared with the digests of the chunks the document has now, whose vectors are read;
2. :meth:`ChunkStep.encode`: only the chunks whose digest is new are encoded (those the cache lacks, with
   ``cache``), in one encoder call for the batch (the encoder sorts them by length into its forward passes);
   it returns each document's vector, the mean of its chunks';
3. :meth:`ChunkStep.write`: for the rows whose vector the batch wrote (their text unchanged since it was read),
   the chunks go by binary COPY into a temporary table and the document's chunk set is replaced: deleted,
   then inserted.

A row changed while its batch was encoding is not written, so its chunks stay the old text's until the next
batch writes the new text's; a batch that fails or a worker that dies rolls back with the chunks.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pgsim.columns.cache import lookup, merged, missing, store
from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.chunking.splitting import Chunk, model_tokenizer, split
from pgsim.columns.chunking.tables import require_same_owner
from pgsim.columns.registry import ChunkTable, Registration
from pgsim.db.catalog import vector_schema
from pgsim.encoding.encoder import Encoder, Vector

TEMP_TABLE = """
CREATE TEMP TABLE IF NOT EXISTS pgsim_chunk_sync (
    _pgsim_key jsonb, chunk_no integer, span_start integer, span_end integer, digest bytea, embedding {vector}
) ON COMMIT DELETE ROWS
"""


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def document_vector(chunk_vectors: list[Vector]) -> Vector | None:
    """A chunked document's own vector: the mean of its chunks' (unit) vectors, scaled to unit length; None
    for a document without chunks (NULL or blank text)."""
    if not chunk_vectors:
        return None
    if len(chunk_vectors) == 1:
        return chunk_vectors[0]
    mean = np.stack(chunk_vectors).astype(np.float64).sum(axis=0)
    norm = float(np.linalg.norm(mean))
    if norm < 1e-6:  # chunks pointing every way: no direction to keep, the first chunk stands for the text
        return chunk_vectors[0]
    unit: Vector = (mean / norm).astype(np.float32)
    return unit


class ChunkStep:
    """The chunk work of one batch of ``registration`` (see the module's text)."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        registration: Registration,
        table: ChunkTable,
        encoder: Encoder,
        *,
        cache: bool = False,
    ) -> None:
        self.conn, self.registration, self.table, self.encoder = conn, registration, table, encoder
        self.cache = cache  # look new chunks up in pgsim.embedding_cache first, and add those encoded
        self.cached: dict[str, Vector] = {}
        self.encoded: tuple[list[str | None], list[Vector | None]] = ([], [])
        self.entries: list[int] = []  # the batch's queue entry ids, in the order of its rows
        self.chunks: dict[int, list[Chunk]] = {}  # queue entry id -> the row's chunks
        self.digests: dict[int, list[bytes]] = {}
        self.keys: dict[int, Any] = {}
        self.vectors: dict[tuple[int, bytes], Vector] = {}  # (entry, digest) -> the chunk's vector
        self.new: list[tuple[int, int]] = []  # (entry, chunk_no) of the chunks whose text the document lacks

    def match(self, key: sql.Composable, alias: sql.Composable) -> sql.Composed:
        """The chunk table's key columns (under ``alias``) equal to those of the queued ``key`` (jsonb)."""
        record = sql.SQL("pg_catalog.jsonb_populate_record(NULL::{}, {})").format(self.registration.table_sql, key)
        return sql.SQL(" AND ").join(
            sql.SQL("{}.{} = ({}).{}").format(alias, sql.Identifier(name), record, sql.Identifier(name))
            for name in self.registration.key_columns
        )

    def prepare(self, rows: list[tuple[int, Any, str | None]]) -> None:
        """Cut each (entry id, key, text) row into chunks, and read the vectors of those the document has."""
        require_same_owner(self.conn, self.registration, self.table)  # before any of the chunk table's code runs
        settings = Chunks(self.table.tokens, self.table.overlap)
        tokenizer = model_tokenizer(self.encoder)
        for entry_id, key, text in rows:
            self.entries.append(entry_id)
            self.keys[entry_id] = key
            self.chunks[entry_id] = split(text, settings, tokenizer)
            self.digests[entry_id] = [digest(chunk.text) for chunk in self.chunks[entry_id]]
        if rows:
            with self.conn.cursor(binary=True) as cur:
                found = cur.execute(
                    sql.SQL(
                        "SELECT q.entry, c.digest, c.embedding::{vector} "
                        "FROM unnest(%s::bigint[], %s::jsonb[]) AS q(entry, key) JOIN {chunks} AS c ON {match}"
                    ).format(
                        vector=sql.Identifier(vector_schema(self.conn), "vector"),
                        chunks=self.table.table_sql,
                        match=self.match(sql.SQL("q.key"), sql.SQL("c")),
                    ),
                    [[entry_id for entry_id, _, _ in rows], [Jsonb(key) for _, key, _ in rows]],
                    prepare=False,
                ).fetchall()
            for entry_id, chunk_digest, vector in found:
                self.vectors[(entry_id, bytes(chunk_digest))] = np.asarray(vector, dtype=np.float32)
        self.new = [
            (entry_id, chunk.chunk_no)
            for entry_id, chunks in self.chunks.items()
            for chunk, chunk_digest in zip(chunks, self.digests[entry_id], strict=True)
            if (entry_id, chunk_digest) not in self.vectors
        ]
        if self.cache:
            self.cached = lookup(self.conn, self.encoder, [self.chunks[e][no].text for e, no in self.new])

    def encode(self) -> list[Vector | None]:
        """Encode the new chunks (those the cache lacks, with ``cache``) in one call; each row's document
        vector (see :func:`document_vector`), in the order of the rows given to :meth:`prepare`."""
        texts: list[str | None] = [self.chunks[entry_id][chunk_no].text for entry_id, chunk_no in self.new]
        to_encode = missing(texts, self.cached)
        encoded = self.encoder.encode(to_encode)
        self.encoded = (to_encode, encoded)
        for (entry_id, chunk_no), vector in zip(self.new, merged(texts, encoded, self.cached), strict=True):
            if vector is not None:  # always: a chunk holds text
                self.vectors[(entry_id, self.digests[entry_id][chunk_no])] = vector
        return [
            document_vector([self.vectors[(entry_id, each)] for each in self.digests[entry_id]])
            for entry_id in self.entries
        ]

    @property
    def cache_hits(self) -> int:
        return sum(1 for entry_id, chunk_no in self.new if self.chunks[entry_id][chunk_no].text in self.cached)

    def write(self, done: set[int]) -> None:
        """Replace the chunks of the documents of the entries ``done`` (those whose vector the batch wrote)."""
        entries = sorted(entry_id for entry_id in done if entry_id in self.chunks)
        if not entries:
            return
        conn, chunks_sql = self.conn, self.table.table_sql
        if self.cache:
            store(conn, self.encoder, *self.encoded)
        vectors_in = vector_schema(conn)
        conn.execute(sql.SQL(TEMP_TABLE).format(vector=sql.Identifier(vectors_in, "vector")))
        conn.execute("DELETE FROM pg_temp.pgsim_chunk_sync")  # a batch earlier in the caller's transaction left rows
        with conn.cursor() as cur:
            with cur.copy(
                "COPY pgsim_chunk_sync (_pgsim_key, chunk_no, span_start, span_end, digest, embedding) "
                "FROM STDIN WITH (FORMAT BINARY)"
            ) as copy:
                copy.set_types(["jsonb", "int4", "int4", "int4", "bytea", "vector"])
                for entry_id in entries:
                    key = Jsonb(self.keys[entry_id])
                    for chunk, chunk_digest in zip(self.chunks[entry_id], self.digests[entry_id], strict=True):
                        vector = self.vectors[(entry_id, chunk_digest)]
                        copy.write_row((key, chunk.chunk_no, chunk.start, chunk.end, chunk_digest, vector))
            cur.execute(
                sql.SQL("DELETE FROM {chunks} AS c USING unnest(%s::jsonb[]) AS d(key) WHERE {match}").format(
                    chunks=chunks_sql, match=self.match(sql.SQL("d.key"), sql.SQL("c"))
                ),
                [[Jsonb(self.keys[entry_id]) for entry_id in entries]],
                prepare=False,
            )
            keys = sql.SQL(", ").join(sql.Identifier(name) for name in self.registration.key_columns)
            cur.execute(
                sql.SQL(
                    "INSERT INTO {chunks} ({keys}, chunk_no, span_start, span_end, digest, embedding) "
                    "SELECT {record_keys}, t.chunk_no, t.span_start, t.span_end, t.digest, t.embedding::{vector} "
                    "FROM pgsim_chunk_sync AS t, pg_catalog.jsonb_populate_record(NULL::{table}, t._pgsim_key) AS r"
                ).format(
                    chunks=chunks_sql,
                    keys=keys,
                    record_keys=sql.SQL(", ").join(
                        sql.SQL("r.{}").format(sql.Identifier(n)) for n in self.registration.key_columns
                    ),
                    vector=sql.Identifier(vectors_in, self.registration.column_type),
                    table=self.registration.table_sql,
                ),
                prepare=False,
            )
