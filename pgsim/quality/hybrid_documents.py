"""Hybrid search on a chunked column (:mod:`pgsim.columns.chunking`): the fusion of :mod:`pgsim.quality.hybrid`
over documents.

- The vector list is :func:`pgsim.knn.documents.documents_of`'s ``candidates`` nearest documents (its
  planner and exact fallback).
- The text list is the ``candidates`` best full-text matches that pass the same filter, each with its nearest
  chunk and its distance over all its chunks, as the vector list measures it (none for a document whose vector
  is NULL: its chunks are an older text's).

Both lists read only the columns the caller may read, with the caller's rights, and name documents by their
primary key, so a role with column-level SELECT is served and rows keep their SQL types. The fusion is then
computed here, term for term as the statement of :mod:`pgsim.quality.hybrid` and ``pgsim.hybrid_search``
(SQL) compute it; a test holds the two to the same documents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgsim.columns.chunking.tables import caller_path_kept
from pgsim.db.catalog import pin_search_path
from pgsim.knn.documents import PREFIX, Statements, chunked_statements, document_distance, documents_of, key_of
from pgsim.knn.planner import Tuning
from pgsim.knn.target import VectorColumn


# What a hybrid search returns (pgsim.quality.hybrid re-exports it), defined here, where it is made too.
@dataclass(frozen=True)
class FusedHit:
    row: dict[str, Any]
    score: float  # the sum of the two lists' 1 / (rrf_k + rank), each weighted on a calibrated table
    distance: float | None  # cosine distance to the query; None: a text match not embedded yet
    vector_rank: int | None  # 1-based rank among the nearest rows; None: not among the candidates
    text_rank: int | None  # 1-based rank among the full-text matches; None: not among them
    relevance: float | None = None  # similarity minus the vector list's last row's (what min_score cuts)
    # on a chunked embedding: the document's nearest chunk, its number and its character span in the source text
    chunk_no: int | None = None
    span: tuple[int, int] | None = None


@dataclass
class _Listed:
    row: dict[str, Any]
    distance: float | None
    chunk_no: int | None
    span: tuple[int, int] | None
    vector_rank: int | None = None
    text_rank: int | None = None
    text_weight: float = 1.0


def fused_documents(
    conn: psycopg.Connection[Any],
    target: VectorColumn,
    params: dict[str, Any],
    *,
    where: sql.Composable | None,
    columns: Sequence[str] | None,
    text_column: str,
    config: str,
    fusion: dict[str, Any],
    k: int,
    candidates: int,
    min_score: float | None,
    tuning: Tuning,
) -> list[FusedHit]:
    """The k documents with the best fused rank; ``fusion`` holds the statement parameters of
    :func:`pgsim.quality.hybrid._fusion_params` (rrf_k, and_first, gate, weak, and_rows, and_weight,
    long_words, long_rows); ``params`` the query's (pgsim.knn.target)."""
    statements = chunked_statements(conn, target, columns, where)
    nearest, _ = documents_of(conn, target, params, candidates, where, columns, tuning, statements)
    listed: dict[tuple[Any, ...], _Listed] = {}
    for rank, hit in enumerate(nearest, 1):
        listed[hit.key] = _Listed(hit.row, hit.distance, hit.chunk_no, hit.span, vector_rank=rank)
    matches, words = _text_matches(conn, statements, params, text_column, config, fusion, candidates)
    every = sum(1 for row in matches if row[PREFIX + "every"])
    boost_rows = fusion["and_rows"]
    if words >= fusion["long_words"]:  # as the SQL statements decide it, long_words 0 included
        boost_rows = max(boost_rows, fusion["long_rows"])
    for rank, row in enumerate(matches, 1):
        key = key_of(row)
        found = listed.get(key)
        if found is None:
            distance = row[PREFIX + "distance"]
            span = None if distance is None else (row[PREFIX + "span_start"], row[PREFIX + "span_end"])
            found = listed[key] = _Listed(
                {name: value for name, value in row.items() if not name.startswith(PREFIX)},
                None if distance is None else float(distance),
                row[PREFIX + "chunk_no"],
                span,
            )
        found.text_rank = rank
        if row[PREFIX + "every"] and every <= boost_rows:
            found.text_weight = float(fusion["and_weight"])
    floor = max((hit.distance for hit in nearest), default=None)
    best = None if floor is None else floor - min(hit.distance for hit in nearest)
    gate = fusion["gate"]
    vector_weight = 1.0 if gate is None or (best is not None and best >= gate) or every == 0 else fusion["weak"]
    fused = []
    for document in listed.values():
        relevance = None if floor is None or document.distance is None else floor - document.distance
        if min_score is not None and (relevance is None or relevance < min_score):
            continue
        score = vector_weight * _rrf(document.vector_rank, fusion["rrf_k"]) + document.text_weight * _rrf(
            document.text_rank, fusion["rrf_k"]
        )
        fused.append(
            FusedHit(
                document.row,
                score,
                document.distance,
                document.vector_rank,
                document.text_rank,
                relevance,
                document.chunk_no,
                document.span,
            )  # fmt: skip
        )
    last = float("inf")
    fused.sort(key=lambda d: (-d.score, d.vector_rank or last, d.text_rank or last))
    return fused[:k]


def _rrf(rank: int | None, rrf_k: int) -> float:
    return 0.0 if rank is None else 1.0 / (rrf_k + rank)


def _text_matches(
    conn: psycopg.Connection[Any],
    statements: Statements,
    params: dict[str, Any],
    text_column: str,
    config: str,
    fusion: dict[str, Any],
    candidates: int,
) -> tuple[list[dict[str, Any]], int]:
    """The best full-text matches that pass the filter, in text rank order (those that match every word
    first when ``and_first``), with their nearest chunk; and the query's distinct word count."""
    table, tsv = statements.registration.table_sql, sql.Identifier(text_column)
    order = sql.SQL(", ").join(
        [
            sql.SQL("_pgsim_m._pgsim_every DESC, _pgsim_m._pgsim_text_score DESC"),
            *(sql.SQL("_pgsim_m.{}").format(sql.Identifier(f"{PREFIX}key_{i}")) for i in range(len(statements.keys))),
        ]
    )
    statement = sql.SQL(
        "WITH _pgsim_q AS (SELECT "
        "(SELECT string_agg(quote_literal(w.lexeme), ' | ')::tsquery FROM unnest(to_tsvector(%(config)s::regconfig, "
        "  %(text)s)) AS w) AS any_word, "
        "(SELECT string_agg(quote_literal(w.lexeme), ' & ')::tsquery FROM unnest(to_tsvector(%(config)s::regconfig, "
        "  %(text)s)) AS w) AS every_word, length(to_tsvector(%(config)s::regconfig, %(text)s)) AS words) "
        "SELECT _pgsim_m.*, _pgsim_best.chunk_no AS _pgsim_chunk_no, _pgsim_best.span_start AS _pgsim_span_start, "
        "_pgsim_best.span_end AS _pgsim_span_end, _pgsim_best.distance AS _pgsim_distance FROM ("
        "  SELECT {columns}, {table}.{column} IS NOT NULL AS _pgsim_embedded, "
        "  %(and_first)s AND {table}.{tsv} @@ _pgsim_q.every_word AS _pgsim_every, "
        "  CASE WHEN %(and_first)s AND {table}.{tsv} @@ _pgsim_q.every_word "
        "  THEN ts_rank({table}.{tsv}, _pgsim_q.every_word, 1) "
        "  ELSE ts_rank({table}.{tsv}, _pgsim_q.any_word, 1) END AS _pgsim_text_score, _pgsim_q.words AS _pgsim_words "
        "  FROM {table}, _pgsim_q WHERE {guard} AND {table}.{tsv} @@ _pgsim_q.any_word AND ({condition}) "
        "  ORDER BY _pgsim_every DESC, _pgsim_text_score DESC, {keys} LIMIT %(n)s) AS _pgsim_m "
        "LEFT JOIN LATERAL (SELECT c.chunk_no, c.span_start, c.span_end, {document_distance} AS distance "
        "  FROM {chunks} AS c "
        "  WHERE _pgsim_m._pgsim_embedded AND {chunk_match} ORDER BY ({distance}) + 0, c.chunk_no LIMIT 1) "
        "  AS _pgsim_best ON true "
        "ORDER BY {order}"
    ).format(
        columns=statements.columns,
        table=table,
        column=sql.Identifier(statements.registration.column),
        tsv=tsv,
        guard=statements.guard,
        condition=statements.condition,
        keys=sql.SQL(", ").join(sql.SQL("{}.{}").format(table, key) for key in statements.keys),
        distance=statements.distance,
        document_distance=document_distance(statements.distance, window=True),
        chunks=statements.chunks.table_sql,
        chunk_match=statements.chunk_match("_pgsim_m"),
        order=order,
    )
    values = {**params, "config": config, "and_first": fusion["and_first"], "n": candidates}
    with conn.transaction(), caller_path_kept(conn), conn.cursor(row_factory=dict_row) as cur:
        pin_search_path(conn)  # the filter is read as the vector list reads it
        rows = cur.execute(statement.as_bytes(conn), values, prepare=False).fetchall()
    return rows, int(rows[0][PREFIX + "words"]) if rows else 0  # without a match, no match's weight needs it
