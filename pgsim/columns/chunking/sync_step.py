"""What the queue worker's batch (:mod:`pgsim.columns.batches`) does for a chunked registration.

In the batch's own transaction, around the batch's read, encode and write:

1. :meth:`ChunkStep.prepare`: each row's text is cut into chunks (:func:`.splitting.split`) and each
   chunk's sha256 compared with the digests the document's chunks have now;
2. :meth:`ChunkStep.encode`: only the chunks whose digest is new are encoded, in the same encoder call as the
   documents' own texts (one call per batch: the encoder sorts all of them by length into its forward passes);
   a document cut into one chunk that the model reads as it reads the whole text (:func:`whole_document`) is
   not encoded twice: that chunk's vector is the document's own;
3. :meth:`ChunkStep.write`: for the rows whose vector the batch wrote (their text unchanged since it was read),
   the chunks go by binary COPY into a temporary table, the unchanged ones take their vector from the
   document's current chunks, and the document's chunk set is replaced: deleted, then inserted.

A row changed while its batch was encoding is not written, so its chunks stay the old text's until the next
batch writes the new text's; a batch that fails or a worker that dies rolls back with the chunks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pgsim.columns.cache import lookup, merged, missing, store
from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.chunking.splitting import Chunk, model_tokenizer, split
from pgsim.columns.chunking.tables import require_same_owner
from pgsim.columns.registry import ChunkTable, Registration
from pgsim.db.catalog import vector_schema
from pgsim.encoding.encoder import MAX_CHARS, Encoder, Vector

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TEMP_TABLE = """
CREATE TEMP TABLE IF NOT EXISTS pgsim_chunk_sync (
    _pgsim_key jsonb, chunk_no integer, span_start integer, span_end integer, digest bytea, embedding {vector}
) ON COMMIT DELETE ROWS
"""


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def whole_document(text: str | None, chunks: list[Chunk], encoder: Encoder, tokenizer: Tokenizer) -> bool:
    """Whether ``chunks`` is one chunk that the model reads exactly as it reads the whole ``text``: the same
    string, or the same word pieces under the same document prefix within the model's limit (the text's
    leading or trailing whitespace is all that differs). That chunk's vector is then the document's own."""
    if text is None or len(chunks) != 1:
        return False
    if chunks[0].text == text:
        return True
    prefix = encoder.document_prefix
    ids = [tokenizer.encode(prefix + each[:MAX_CHARS], add_special_tokens=True).ids for each in (text, chunks[0].text)]
    return ids[0] == ids[1] and len(ids[0]) <= encoder.max_tokens


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
        self.chunks: dict[int, list[Chunk]] = {}  # queue entry id -> the row's chunks
        self.digests: dict[int, list[bytes]] = {}
        self.keys: dict[int, Any] = {}
        self.new: list[tuple[int, int]] = []  # (entry, chunk_no) of the chunks whose text the document lacks
        self.whole: set[int] = set()  # entries whose one new chunk is read as their whole text: it takes theirs
        self.vectors: dict[tuple[int, int], Vector | None] = {}  # their vectors, once encoded

    def match(self, key: sql.Composable, alias: sql.Composable) -> sql.Composed:
        """The chunk table's key columns (under ``alias``) equal to those of the queued ``key`` (jsonb)."""
        record = sql.SQL("pg_catalog.jsonb_populate_record(NULL::{}, {})").format(self.registration.table_sql, key)
        return sql.SQL(" AND ").join(
            sql.SQL("{}.{} = ({}).{}").format(alias, sql.Identifier(name), record, sql.Identifier(name))
            for name in self.registration.key_columns
        )

    def prepare(self, rows: list[tuple[int, Any, str | None]]) -> None:
        """Cut each (entry id, key, text) row into chunks, and find which of them the document has already."""
        require_same_owner(self.conn, self.registration, self.table)  # before any of the chunk table's code runs
        settings = Chunks(self.table.tokens, self.table.overlap)
        tokenizer = model_tokenizer(self.encoder)
        whole: set[int] = set()
        for entry_id, key, text in rows:
            self.keys[entry_id] = key
            self.chunks[entry_id] = split(text, settings, tokenizer)
            self.digests[entry_id] = [digest(chunk.text) for chunk in self.chunks[entry_id]]
            if whole_document(text, self.chunks[entry_id], self.encoder, tokenizer):
                whole.add(entry_id)
        known: dict[int, set[bytes]] = {entry_id: set() for entry_id, _, _ in rows}
        if rows:
            found = self.conn.execute(
                sql.SQL(
                    "SELECT q.entry, c.digest FROM unnest(%s::bigint[], %s::jsonb[]) AS q(entry, key) "
                    "JOIN {chunks} AS c ON {match}"
                ).format(chunks=self.table.table_sql, match=self.match(sql.SQL("q.key"), sql.SQL("c"))),
                [[entry_id for entry_id, _, _ in rows], [Jsonb(key) for _, key, _ in rows]],
                prepare=False,
            ).fetchall()
            for entry_id, chunk_digest in found:
                known[entry_id].add(bytes(chunk_digest))
        self.new = [
            (entry_id, chunk.chunk_no)
            for entry_id, chunks in self.chunks.items()
            for chunk, chunk_digest in zip(chunks, self.digests[entry_id], strict=True)
            if chunk_digest not in known[entry_id]
        ]
        # a new chunk that is its whole document takes the document's vector (looked up or encoded with it)
        self.whole = {entry_id for entry_id, _ in self.new if entry_id in whole}
        self.new = [(entry_id, chunk_no) for entry_id, chunk_no in self.new if entry_id not in whole]
        if self.cache:
            self.cached = lookup(self.conn, self.encoder, [self.chunks[e][no].text for e, no in self.new])

    def encode(self, documents: Sequence[str | None]) -> list[Vector | None]:
        """The vectors of ``documents`` (the texts of the batch's rows that it encodes; None for those it does
        not), encoded in one call with the new chunks (those the cache lacks, with ``cache``)."""
        texts: list[str | None] = [self.chunks[entry_id][chunk_no].text for entry_id, chunk_no in self.new]
        to_encode = missing(texts, self.cached)
        pending = [text for text in to_encode if text is not None]
        vectors = self.encoder.encode([*documents, *pending])
        found = iter(vectors[len(documents) :])
        encoded = [None if text is None else next(found) for text in to_encode]
        self.encoded = (to_encode, encoded)
        for place, vector in zip(self.new, merged(texts, encoded, self.cached), strict=True):
            self.vectors[place] = vector
        return vectors[: len(documents)]

    def write(self, done: set[int], documents: dict[int, Vector | None]) -> None:
        """Replace the chunks of the documents of the entries ``done`` (those whose vector the batch wrote);
        ``documents``: each entry's own vector, which its chunk takes where it is the whole text."""
        for entry_id in self.whole:
            self.vectors[(entry_id, 0)] = documents.get(entry_id)
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
                        vector = self.vectors.get((entry_id, chunk.chunk_no))  # None: the document has it
                        copy.write_row((key, chunk.chunk_no, chunk.start, chunk.end, chunk_digest, vector))
            # an unchanged chunk keeps the vector the document has for it
            cur.execute(
                sql.SQL(
                    "UPDATE pgsim_chunk_sync AS t SET embedding = c.embedding::{vector} FROM {chunks} AS c "
                    "WHERE t.embedding IS NULL AND c.digest = t.digest AND {match}"
                ).format(
                    vector=sql.Identifier(vectors_in, "vector"),
                    chunks=chunks_sql,
                    match=self.match(sql.SQL("t._pgsim_key"), sql.SQL("c")),
                ),
                prepare=False,
            )
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
                    vector=sql.Identifier(vectors_in, self.registration.dtype),
                    table=self.registration.table_sql,
                ),
                prepare=False,
            )
