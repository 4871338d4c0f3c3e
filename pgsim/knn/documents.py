"""Document-level search over a chunked embedding: k distinct documents, ranked by their chunks.

A document's distance is one minus a soft maximum of its chunks' cosine similarities to the query,
``TEMPERATURE * ln(mean(exp(similarity / TEMPERATURE)))`` over all its chunks (:func:`document_distance`): the
nearest chunk counts most, and a document about the query throughout ranks above one that touches it once
among many chunks. Each hit also names its nearest chunk.

Two paths, both one statement under a pinned search_path, run with the caller's rights (row-level security on
the documents, and on their chunks, holds):

- ``hnsw``: the chunk index with pgvector's iterative scan gives the nearest ``fetch`` chunks; they are grouped
  per document (the nearest chunk of each), joined to the documents that pass ``where``, and the
  :data:`POOL` (or k, if more) documents with the nearest chunks are ranked by their distance over all their
  chunks, the k nearest returned. When fewer than k documents come back and the scan gave all it was asked,
  ``fetch`` grows (x4) and the statement runs again; when it gave less (every chunk seen, or pgvector's scan
  limit reached) or ``fetch`` passes :data:`MAX_FETCH`, the exact path runs instead.
- ``exact``: every document that passes ``where``, with its distance over all its chunks (the chunk table's
  primary key serves the look-up), the k nearest.

The k-documents contract: when at least k documents pass ``where`` and have chunks, k come back. The exact
path is taken first when the filter is estimated to keep fewer than ``exact_below_rows`` documents or a
share below ``min_hnsw_selectivity`` of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgsim.columns.chunking.tables import caller_path_kept, require_same_owner
from pgsim.columns.registry import ChunkTable, Registration, chunk_table
from pgsim.db.catalog import pin_search_path, vector_schema
from pgsim.errors import InvalidInput
from pgsim.knn.planner import Tuning
from pgsim.knn.target import VectorColumn, check_k, target_and_params

# The soft maximum's temperature, and how many documents with the nearest chunks the hnsw path ranks by it:
# bench/long_documents.py chose both (against best chunk alone and other aggregates, on held-out queries too).
TEMPERATURE = 0.05
POOL = 50
MAX_FETCH = 20_000  # chunks one hnsw round may ask for; pgvector's hnsw.max_scan_tuples is raised to match
PREFIX = "_pgsim_"  # the columns a statement adds beside the document's
# The fetch grows until k documents come: a far smaller share than pgsim.search's 0.5 still takes the index
DOCUMENT_TUNING = Tuning(exact_below_rows=1000, hnsw_ef_search=100, min_hnsw_selectivity=0.05)


class NotChunked(InvalidInput):
    """The column searched for documents is not chunked."""


@dataclass(frozen=True)
class DocumentHit:
    """A document, the distance of its nearest chunk, and which chunk that is (its span in the source text)."""

    row: dict[str, Any]
    distance: float  # the document's: see the module's text
    chunk_no: int
    span: tuple[int, int]
    key: tuple[Any, ...] = ()  # the document's primary key, in the registration's key order


def search_documents(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    query: str | Sequence[float] | Any,
    *,
    k: int = 10,
    where: sql.Composable | None = None,
    columns: Sequence[str] | None = None,
    ef_search: int = DOCUMENT_TUNING.hnsw_ef_search,
    exact_below_rows: float = DOCUMENT_TUNING.exact_below_rows,
    min_hnsw_selectivity: float = DOCUMENT_TUNING.min_hnsw_selectivity,
) -> list[DocumentHit]:
    """The k documents of ``table`` whose chunks of the chunked embedding ``column`` come nearest to ``query``
    (text, encoded with the column's model, or a vector), among those that pass ``where`` (a
    ``psycopg.sql.Composable`` condition over the table's columns, read with search_path pg_catalog, pg_temp:
    qualify your own functions), nearest first. ``columns``: the document columns returned (default: those the
    current role may read, but the embedding)."""
    if isinstance(conn, psycopg.AsyncConnection):
        raise InvalidInput("search_documents takes a psycopg.Connection, not an AsyncConnection.")
    check_k(k)
    if where is not None and not isinstance(where, sql.Composable):
        raise InvalidInput("where must be a psycopg.sql.Composable condition (sql.SQL(...).format(...)), or None.")
    target, params = target_and_params(conn, table, column, query, None)
    tuning = Tuning(exact_below_rows, ef_search, min_hnsw_selectivity)
    return documents_of(conn, target, params, k, where, columns, tuning)[0]


def documents_of(
    conn: psycopg.Connection[Any],
    target: VectorColumn,
    params: dict[str, Any],
    k: int,
    where: sql.Composable | None,
    columns: Sequence[str] | None,
    tuning: Tuning = DOCUMENT_TUNING,
    statements: Statements | None = None,
) -> tuple[list[DocumentHit], str]:
    """:func:`search_documents` on a column already read and a query already made parameters
    (pgsim.knn.target), and the path it took: ``hnsw`` or ``exact``. ``statements``: those of
    :func:`chunked_statements` for the same column, selection and filter, when the caller has them."""
    if statements is None:
        statements = chunked_statements(conn, target, columns, where)
    registration = statements.registration
    path = "exact"
    with conn.transaction() as tx, conn.cursor(row_factory=dict_row) as cur:
        pin_search_path(conn)
        params = {**params, "k": k}
        params["pool"] = max(k, POOL)
        fetch = _first_fetch(
            conn, registration, where, params["pool"], tuning.exact_below_rows, tuning.min_hnsw_selectivity
        )
        rows: list[dict[str, Any]] | None = None
        if fetch is not None:
            cur.execute(
                "SELECT pg_catalog.set_config('hnsw.iterative_scan', 'relaxed_order', true), "
                "pg_catalog.set_config('hnsw.ef_search', %s, true), "
                "pg_catalog.set_config('hnsw.max_scan_tuples', %s, true)",
                [str(min(max(tuning.hnsw_ef_search, 1), 1000)), str(MAX_FETCH * 2)],
            )
            hnsw = statements.hnsw().as_bytes(conn)
            while rows is None and fetch <= MAX_FETCH:
                found = cur.execute(hnsw, {**params, "fetch": fetch}, prepare=False).fetchall()
                hits = [row for row in found if row[PREFIX + "distance"] is not None]
                if len(hits) >= k:
                    rows, path = hits, "hnsw"
                elif found[0][PREFIX + "candidates"] < fetch:
                    break  # every chunk the scan would give was seen: only an exact scan can find more
                else:
                    fetch *= 4
        if rows is None:
            rows = cur.execute(statements.exact().as_bytes(conn), params, prepare=False).fetchall()
        result = [_hit(row) for row in rows]
        raise psycopg.Rollback(tx)  # the settings and the pinned path end with it
    return result, path


def chunked_statements(
    conn: psycopg.Connection[Any], target: VectorColumn, columns: Sequence[str] | None, where: sql.Composable | None
) -> Statements:
    """The statements of a search of ``target``'s documents (its chunk table checked), selecting ``columns``
    (default: those the current role may read, but the embedding) of those that pass ``where``."""
    registration = target.registration
    with conn.transaction(), caller_path_kept(conn):
        pin_search_path(conn)
        chunks = chunk_table(conn, registration) if registration is not None else None
        if registration is None or chunks is None:
            raise NotChunked(
                f"{target.table}.{target.column} is not chunked: pgsim.change_embedding(conn, "
                f"{target.table!r}, {target.column!r}, chunks=pgsim.Chunks(tokens=...)) first."
            )
        require_same_owner(conn, registration, chunks)
        vectors_in = vector_schema(conn)
    selected = list(columns) if columns is not None else list(target.default_columns)
    condition = sql.SQL("TRUE") if where is None else sql.SQL(where.as_string(conn).replace("%", "%%"))
    return Statements(registration, chunks, selected, condition, vectors_in)


def _hit(row: dict[str, Any]) -> DocumentHit:
    return DocumentHit(
        row={name: value for name, value in row.items() if not name.startswith(PREFIX)},
        distance=float(row[PREFIX + "distance"]),
        chunk_no=int(row[PREFIX + "chunk_no"]),
        span=(int(row[PREFIX + "span_start"]), int(row[PREFIX + "span_end"])),
        key=key_of(row),
    )


def key_of(row: dict[str, Any]) -> tuple[Any, ...]:
    """The document key a statement of :class:`Statements` returns beside the selected columns."""
    return tuple(row[name] for name in sorted((n for n in row if n.startswith(PREFIX + "key_")), key=_key_position))


def _key_position(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


class Statements:
    """The statement of each path, for one table, chunk table, selection and filter."""

    def __init__(
        self,
        registration: Registration,
        chunks: ChunkTable,
        selected: list[str],
        condition: sql.Composable,
        vectors_in: str,
    ) -> None:
        self.registration, self.chunks, self.condition = registration, chunks, condition
        self.keys = [sql.Identifier(name) for name in registration.key_columns]
        self.columns = sql.SQL(", ").join(
            [
                *(sql.SQL("{}.{}").format(registration.table_sql, sql.Identifier(name)) for name in selected),
                *(
                    sql.SQL("{}.{} AS {}").format(registration.table_sql, key, sql.Identifier(f"{PREFIX}key_{i}"))
                    for i, key in enumerate(self.keys)
                ),
            ]
        )
        self.distance = sql.SQL("c.embedding OPERATOR({}.<=>) %(q)s::{}").format(
            sql.Identifier(vectors_in), sql.Identifier(vectors_in, registration.column_type)
        )
        self.guard = sql.SQL("pgsim.expect_model(%(g_schema)s, %(g_table)s, %(g_column)s, %(g_model)s, %(g_revision)s)")

    def _names(self, prefix: str) -> sql.Composed:
        return sql.SQL(", ").join(sql.SQL(prefix + "{}").format(key) for key in self.keys)

    def hnsw(self) -> sql.Composed:
        """The nearest %(fetch)s chunks by the index, the nearest chunk per document, the %(pool)s documents with
        the nearest chunks that pass the filter, the k nearest of them by :func:`document_distance`; one row at
        least, with the number of candidates the scan gave. Its own names start with ``_pgsim_``: a document
        table named ``best``, say, would otherwise take the references to them inside the subquery that reads it."""
        doc_match = sql.SQL(" AND ").join(
            sql.SQL("{}.{} = _pgsim_best.{}").format(self.registration.table_sql, key, key) for key in self.keys
        )
        return sql.SQL(
            "WITH _pgsim_candidates AS MATERIALIZED ("
            "SELECT {c_keys}, c.chunk_no, c.span_start, c.span_end, {distance} AS _pgsim_distance FROM {chunks} AS c "
            "WHERE {guard} ORDER BY {distance} LIMIT %(fetch)s), "
            "_pgsim_best AS (SELECT DISTINCT ON ({keys}) * FROM _pgsim_candidates "
            "ORDER BY {keys}, _pgsim_distance, chunk_no) "
            "SELECT _pgsim_counted.n AS {candidates}, _pgsim_hits.* "
            "FROM (SELECT count(*) AS n FROM _pgsim_candidates) AS _pgsim_counted "
            "LEFT JOIN LATERAL (SELECT _pgsim_pool.*, _pgsim_all.distance AS {distance_name} FROM ("
            "SELECT _pgsim_doc.*, _pgsim_best.chunk_no AS {chunk_no}, "
            "_pgsim_best.span_start AS {span_start}, _pgsim_best.span_end AS {span_end} "
            "FROM _pgsim_best JOIN LATERAL "
            "(SELECT {columns} FROM {table} WHERE {doc_match} AND {table}.{column} IS NOT NULL AND ({condition})) "
            "AS _pgsim_doc ON true "
            "ORDER BY _pgsim_best._pgsim_distance, {best_keys} LIMIT %(pool)s) AS _pgsim_pool "
            "CROSS JOIN LATERAL (SELECT {document_distance} AS distance FROM {chunks} AS c WHERE {pool_match}) "
            "AS _pgsim_all ORDER BY _pgsim_all.distance, {pool_keys} LIMIT %(k)s) AS _pgsim_hits ON true"
        ).format(
            c_keys=self._names("c."),
            keys=self._names(""),
            best_keys=self._names("_pgsim_best."),
            distance=self.distance,
            chunks=self.chunks.table_sql,
            guard=self.guard,
            columns=self.columns,
            table=self.registration.table_sql,
            doc_match=doc_match,
            column=sql.Identifier(self.registration.column),
            condition=self.condition,
            document_distance=document_distance(self.distance),
            pool_match=self.chunk_match("_pgsim_pool"),
            pool_keys=self._doc_keys("_pgsim_pool"),
            **self._output_names(),
            candidates=sql.Identifier(PREFIX + "candidates"),
        )

    def exact(self) -> sql.Composed:
        """Every document that passes the filter with its nearest chunk and its :func:`document_distance` (no
        index orders ``+ 0``), the k nearest."""
        return sql.SQL(
            "SELECT _pgsim_doc.*, _pgsim_best.chunk_no AS {chunk_no}, _pgsim_best.span_start AS {span_start}, "
            "_pgsim_best.span_end AS {span_end}, _pgsim_best.distance AS {distance_name} "
            "FROM (SELECT {columns} FROM {table} WHERE {guard} AND {table}.{column} IS NOT NULL AND ({condition})) "
            "AS _pgsim_doc "
            "JOIN LATERAL (SELECT c.chunk_no, c.span_start, c.span_end, {document_distance} AS distance "
            "FROM {chunks} AS c WHERE {chunk_match} ORDER BY ({distance}) + 0, c.chunk_no LIMIT 1) AS _pgsim_best "
            "ON true ORDER BY _pgsim_best.distance, {doc_keys} LIMIT %(k)s"
        ).format(
            columns=self.columns,
            table=self.registration.table_sql,
            guard=self.guard,
            column=sql.Identifier(self.registration.column),
            condition=self.condition,
            distance=self.distance,
            document_distance=document_distance(self.distance, window=True),
            chunks=self.chunks.table_sql,
            chunk_match=self.chunk_match("_pgsim_doc"),
            doc_keys=self._doc_keys("_pgsim_doc"),
            **self._output_names(),
        )

    def chunk_match(self, documents: str) -> sql.Composed:
        """The chunks ``c`` of the document of ``documents`` (a relation with this selection's columns)."""
        return sql.SQL(" AND ").join(
            sql.SQL("c.{} = {}.{}").format(key, sql.Identifier(documents), sql.Identifier(f"{PREFIX}key_{i}"))
            for i, key in enumerate(self.keys)
        )

    def _doc_keys(self, documents: str) -> sql.Composed:
        return sql.SQL(", ").join(
            sql.SQL("{}.{}").format(sql.Identifier(documents), sql.Identifier(f"{PREFIX}key_{i}"))
            for i in range(len(self.keys))
        )

    @staticmethod
    def _output_names() -> dict[str, sql.Identifier]:
        return {
            name if name != "distance" else "distance_name": sql.Identifier(PREFIX + name)
            for name in ("chunk_no", "span_start", "span_end", "distance")
        }


def document_distance(chunk_distance: sql.Composable, *, window: bool = False) -> sql.Composed:
    """A document's distance from its chunks' cosine distances (``chunk_distance``, an expression over its chunk
    rows): one minus the soft maximum of their similarities (see the module's text); an aggregate, or with
    ``window`` a window over all the rows of the statement (one document's chunks). Similarities are from -1
    to 1, so ``exp`` stays within float8 at this temperature."""
    mean = "pg_catalog.avg(pg_catalog.exp((1 - ({d})) / {t}))" + (" OVER ()" if window else "")
    return sql.SQL("1 - {t} * pg_catalog.ln(" + mean + ")").format(d=chunk_distance, t=sql.Literal(TEMPERATURE))


def _first_fetch(
    conn: psycopg.Connection[Any],
    registration: Registration,
    where: sql.Composable | None,
    k: int,
    exact_below_rows: float,
    min_hnsw_selectivity: float,
) -> int | None:
    """How many chunks the first hnsw round asks for, or None for the exact path: the filter is estimated to
    keep too few documents for the index to find k of them among the nearest chunks."""
    if where is None:
        return max(64, 8 * k)
    table = registration.table_sql.as_string(conn)
    row = conn.execute(
        "SELECT pgsim.estimate_rows(%s::pg_catalog.regclass, NULL), pgsim.estimate_rows(%s::pg_catalog.regclass, %s)",
        [table, table, where.as_string(conn)],
    ).fetchone()
    total, matching = (float(value or 0) for value in row) if row else (0.0, 0.0)
    selectivity = matching / total if total > 0 else 1.0
    if matching < exact_below_rows or selectivity < min_hnsw_selectivity:
        return None
    # a few chunks per document, and a filter that keeps a share of them: ask for enough to find k
    return min(MAX_FETCH, max(64, math.ceil(8 * k / max(selectivity, min_hnsw_selectivity, 1e-4))))
