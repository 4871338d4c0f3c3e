"""Hybrid search: full-text rank and vector rank fused by reciprocal rank fusion, in one SQL statement.

The statement takes the ``candidates`` nearest rows that pass the filter (on the path
:func:`pgsim.search` would take, with its settings and its exact fallback, so the vector list keeps the
filtered-search contract) and the ``candidates`` best full-text matches that pass the same filter (the
query's words ORed, ranked by ``ts_rank`` divided by 1 + log(document length), over a ``tsvector`` column
that a GIN index serves), and orders their union by ``pgsim.rrf(vector rank) + pgsim.rrf(text rank)``.
bench/quality.py compares these choices with ``ts_rank_cd`` and with ANDed words (``plainto_tsquery``).

On a table calibrated by :func:`pgsim.quality.relevance_calibration.calibrate_relevance` (a fresh
``hybrid`` row in ``pgsim.calibration`` for this ``candidates`` count), the fusion is the calibrated one:
the text list puts the rows that match every word (AND, ranked by the AND query's ``ts_rank``) before
those that match some (OR); when 1 to ``and_rows`` rows match every word (``long_rows`` for a query of
``long_words`` distinct words or more), they weigh ``and_weight``; when
some row matches every word and the vector list's best row's relevance is below the table's ``gate``, the
vector list weighs ``weak_vector``, else 1; and
``rrf_k`` is the calibrated one unless the caller gives one. Without a fresh calibration nothing changes.

Each row also gets the relevance score of :mod:`pgsim.quality.relevance`, measured against the last row of
the vector list (its ``candidates``-th nearest): its similarity minus that row's. ``min_score`` keeps only
the rows that reach it, before the best ``k`` are taken, so a query with nothing relevant gets nothing, even
where its words match. ``pgsim.hybrid_search`` (SQL) is the same search for SQL users.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from pgsim.db.names import table_identifier
from pgsim.errors import InvalidInput
from pgsim.knn.documents import DOCUMENT_TUNING
from pgsim.knn.planner import (
    DEFAULT_TUNING,
    Tuning,
    checked_plan,
    clear_errors,
    model_change_as_input_error,
    plan_params,
    run_plan,
    under_hnsw_settings,
    walk_statement,
    with_candidates,
)
from pgsim.knn.statements import DISTANCE, PATHS, Where, check_no_nul, filter_sql, search_statement
from pgsim.knn.target import VectorColumn, check_k, target_and_params
from pgsim.quality.connections import psycopg_connection
from pgsim.quality.hybrid_documents import FusedHit as FusedHit  # re-exported: what hybrid_search returns
from pgsim.quality.hybrid_documents import fused_documents
from pgsim.quality.relevance import check_min_score
from pgsim.quality.relevance_calibration import Fusion, calibrated

DEFAULT_CANDIDATES = 50  # per list
DEFAULT_RRF_K = 60  # Cormack et al.'s constant
TEXT_CONFIG = re.compile(r"to_tsvector\('([^']+)'::regconfig")
SCORE, VECTOR_RANK, TEXT_RANK, CANDIDATES = "_pgsim_score", "_pgsim_vector_rank", "_pgsim_text_rank", "_pgsim_found"
RELEVANCE = "_pgsim_relevance"


@dataclass(frozen=True)
class TextColumn:
    name: str
    config: str  # the text search configuration the query is parsed with


def hybrid_search(
    conn: psycopg.Connection[Any] | Any,
    table: str,
    column: str,
    query: str,
    *,
    k: int = 10,
    where: Where = None,
    text_column: str | None = None,
    text_config: str | None = None,
    columns: Sequence[str] | None = None,
    candidates: int = DEFAULT_CANDIDATES,
    rrf_k: int | None = None,
    min_score: float | None = None,
    tuning: Tuning = DEFAULT_TUNING,
) -> list[FusedHit]:
    """The k rows that pass ``where`` with the best fused rank of the vector search on ``column`` and the
    full-text search on ``text_column`` (a ``tsvector`` column; default: the table's only one). The query
    text is parsed with ``text_config`` (default: the configuration the column's generated expression names,
    else 'english') and its words are ORed. With ``min_score``, only rows whose relevance (similarity minus
    the similarity of the vector list's last row) reaches it. On a calibrated table the fusion is the
    calibrated one (see the module's text); ``rrf_k`` left out: the calibrated one there, else
    ``DEFAULT_RRF_K``. ``conn``: a psycopg connection, or a SQLAlchemy Session or Connection on it."""
    conn = psycopg_connection(conn)
    if min_score is not None:
        check_min_score(min_score)
    if not isinstance(query, str) or not query.strip():
        raise InvalidInput("The query text is empty; pass the words to search for.")
    check_no_nul(query, "The query text")
    check_k(k)
    for name, value, low in (("candidates", candidates, k), ("rrf_k", 1 if rrf_k is None else rrf_k, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 10_000:
            raise InvalidInput(f"{name} must be a whole number from {low} to 10000; got {value!r}.")
    with model_change_as_input_error():
        target, params = target_and_params(conn, table, column, query, None)
        text = _text_column(conn, table, text_column, text_config)
        fusion = calibrated(conn, table, column).fusion_for(candidates)
        if target.chunked:
            params.update(text=query)
            return fused_documents(
                conn, target, params, where=None if where is None else filter_sql(where).condition, columns=columns,
                text_column=text.name, config=text.config, fusion=_fusion_params(fusion, rrf_k), k=k,
                candidates=candidates, min_score=min_score,
                tuning=DOCUMENT_TUNING if tuning == DEFAULT_TUNING else tuning,
            )  # fmt: skip
        params.update(n=candidates, k=k, text=query, config=text.config, min_score=min_score)
        params.update(_fusion_params(fusion, rrf_k))
        condition = filter_sql(where)
        exact, hnsw, reranked = (_fused(target, text, condition, columns, path).as_bytes(conn) for path in PATHS)
        vectors_only, reranked_only = (
            search_statement(target, condition, ROW_IDENTITY, path, limit="n").as_bytes(conn) for path in PATHS[1:]
        )
        with clear_errors(), conn.cursor(row_factory=dict_row) as cur:
            chosen = run_plan(conn, plan_params(conn, target, candidates, condition, tuning), apply=False)
            chosen = with_candidates(conn, chosen, target, candidates)
            chosen = checked_plan(conn, chosen, walk_statement(chosen, vectors_only, reranked_only, params), params)
            walk = walk_statement(chosen, hnsw, reranked, params)
            rows = [] if chosen.path == "exact" else under_hnsw_settings(conn, cur, chosen, walk, params)
            if chosen.path == "hnsw" and rows and rows[0][CANDIDATES] < candidates:
                chosen = replace(chosen, fell_back=True)  # too few nearest rows: the exact list instead
            if chosen.path == "exact" or chosen.fell_back or not rows:
                rows = cur.execute(exact, params, prepare=False).fetchall()
    return [_hit(row) for row in rows]


# A row's identity across the statement: its ctid, and its table's OID, as a partitioned table's partitions
# each number their rows from the start
ROW_IDENTITY = ["tableoid", "ctid"]


def _fusion_params(fusion: Fusion | None, rrf_k: int | None) -> dict[str, Any]:
    """The statement's fusion parameters: the calibrated fusion, or plain RRF (OR, equal weights)."""
    if fusion is None:
        return {"rrf_k": DEFAULT_RRF_K if rrf_k is None else rrf_k, "and_first": False, "gate": None,
                "weak": 1.0, "and_rows": 0, "and_weight": 1.0, "long_words": 0, "long_rows": 0}  # fmt: skip
    return {
        "rrf_k": fusion.rrf_k if rrf_k is None else rrf_k,
        "and_first": True,
        "gate": fusion.gate,
        "weak": fusion.weak_vector,
        "and_rows": fusion.and_rows,
        "long_words": fusion.long_words,
        "long_rows": fusion.long_rows,
        "and_weight": fusion.and_weight,
    }


def _hit(row: dict[str, Any]) -> FusedHit:
    row.pop(CANDIDATES)
    distance, relevance = row.pop(DISTANCE), row.pop(RELEVANCE)
    return FusedHit(
        score=float(row.pop(SCORE)),
        distance=None if distance is None else float(distance),
        vector_rank=row.pop(VECTOR_RANK),
        text_rank=row.pop(TEXT_RANK),
        row=row,
        relevance=None if relevance is None else float(relevance),
    )


def _fused(
    target: VectorColumn, text: TextColumn, condition: sql.Composable, columns: Sequence[str] | None, path: str
) -> sql.Composed:
    nearest = search_statement(target, condition, ROW_IDENTITY, path, limit="n")
    query = sql.SQL("%(q)s::halfvec") if target.type_name == "halfvec" else sql.SQL("%(q)s")
    # the text list names the table as the filter does (no alias), so a filter written with the table's
    # name (as the ORM compiles one) reads the same columns in both lists
    return sql.SQL(
        "WITH _pgsim_nearest AS MATERIALIZED ({nearest}), "
        "_pgsim_vector AS (SELECT tableoid AS _pgsim_rel, ctid AS _pgsim_row, "
        "  row_number() OVER (ORDER BY {distance}) AS _pgsim_rank FROM _pgsim_nearest), "
        "_pgsim_floor AS (SELECT max({distance}) AS _pgsim_floor, count(*) AS _pgsim_found, "
        "  max({distance}) - min({distance}) AS _pgsim_best FROM _pgsim_nearest), "
        "_pgsim_query AS (SELECT (SELECT string_agg(quote_literal(lexeme), ' | ')::tsquery "
        "  FROM unnest(to_tsvector(%(config)s::regconfig, %(text)s))) AS _pgsim_tsquery, "
        "  (SELECT string_agg(quote_literal(lexeme), ' & ')::tsquery "
        "  FROM unnest(to_tsvector(%(config)s::regconfig, %(text)s))) AS _pgsim_all), "
        "_pgsim_matches AS (SELECT {table}.tableoid AS _pgsim_rel, {table}.ctid AS _pgsim_row, "
        "  %(and_first)s AND {table}.{tsv} @@ _pgsim_all AS _pgsim_every, CASE WHEN %(and_first)s AND "
        "  {table}.{tsv} @@ _pgsim_all THEN ts_rank({table}.{tsv}, _pgsim_all, 1) "
        "  ELSE ts_rank({table}.{tsv}, _pgsim_tsquery, 1) END AS _pgsim_text_score "
        "  FROM {table}, _pgsim_query WHERE {table}.{tsv} @@ _pgsim_tsquery AND ({condition}) "
        "  ORDER BY 3 DESC, 4 DESC, {table}.tableoid, {table}.ctid LIMIT %(n)s), "
        "_pgsim_text AS (SELECT _pgsim_rel, _pgsim_row, row_number() OVER (ORDER BY _pgsim_every DESC, "
        "  _pgsim_text_score DESC, _pgsim_rel, _pgsim_row) AS _pgsim_rank, "
        "  CASE WHEN _pgsim_every AND count(*) FILTER (WHERE _pgsim_every) OVER () "
        "  <= CASE WHEN length(to_tsvector(%(config)s::regconfig, %(text)s)) >= %(long_words)s "
        "  THEN greatest(%(and_rows)s, %(long_rows)s) ELSE %(and_rows)s END "
        "  THEN %(and_weight)s::double precision ELSE 1.0 END AS _pgsim_weight FROM _pgsim_matches), "
        "_pgsim_weight AS (SELECT CASE WHEN %(gate)s::double precision IS NULL OR l._pgsim_best >= %(gate)s "
        "  OR NOT EXISTS (SELECT FROM _pgsim_matches WHERE _pgsim_every) THEN 1.0 "
        "  ELSE %(weak)s::double precision END AS _pgsim_weight FROM _pgsim_floor AS l), "
        "_pgsim_fused AS (SELECT _pgsim_rel, _pgsim_row, w._pgsim_weight * pgsim.rrf(v._pgsim_rank, %(rrf_k)s) "
        "  + coalesce(x._pgsim_weight, 1.0) * pgsim.rrf(x._pgsim_rank, %(rrf_k)s) AS {score}, "
        "  v._pgsim_rank AS {vector_rank}, x._pgsim_rank AS {text_rank} "
        "  FROM _pgsim_vector AS v FULL JOIN _pgsim_text AS x USING (_pgsim_rel, _pgsim_row) "
        "  CROSS JOIN _pgsim_weight AS w) "
        "SELECT {selected}, f.{score}, f.{vector_rank}, f.{text_rank}, t.{column} <=> {query} AS {distance}, "
        "  l._pgsim_floor - (t.{column} <=> {query}) AS {relevance}, l._pgsim_found AS {found} "
        "FROM _pgsim_fused AS f JOIN {table} AS t ON t.tableoid = f._pgsim_rel AND t.ctid = f._pgsim_row "
        "CROSS JOIN _pgsim_floor AS l "
        "WHERE %(min_score)s::double precision IS NULL OR l._pgsim_floor - (t.{column} <=> {query}) >= %(min_score)s "
        "ORDER BY f.{score} DESC, f.{vector_rank} NULLS LAST, f.{text_rank} NULLS LAST LIMIT %(k)s"
    ).format(
        nearest=nearest,
        distance=sql.Identifier(DISTANCE),
        tsv=sql.Identifier(text.name),
        table=table_identifier(target.table),
        condition=condition,
        score=sql.Identifier(SCORE),
        vector_rank=sql.Identifier(VECTOR_RANK),
        text_rank=sql.Identifier(TEXT_RANK),
        selected=sql.SQL(", ").join(sql.Identifier("t", c) for c in (columns or target.default_columns)),
        column=sql.Identifier(target.column),
        query=query,
        found=sql.Identifier(CANDIDATES),
        relevance=sql.Identifier(RELEVANCE),
    )


def _text_column(conn: psycopg.Connection[Any], table: str, name: str | None, config: str | None) -> TextColumn:
    """The tsvector column to rank by, and the configuration its text was parsed with."""
    found = conn.execute(  # on the caller's path, so pg_catalog's objects only, named (the rule in pgsim.db.catalog)
        "SELECT a.attname, pg_catalog.pg_get_expr(d.adbin, d.adrelid) FROM pg_catalog.pg_attribute a "
        "LEFT JOIN pg_catalog.pg_attrdef d "
        "ON d.adrelid OPERATOR(pg_catalog.=) a.attrelid AND d.adnum OPERATOR(pg_catalog.=) a.attnum "
        "WHERE a.attrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(%s::pg_catalog.text)::pg_catalog.oid "
        "AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped "
        "AND a.atttypid OPERATOR(pg_catalog.=) 'pg_catalog.tsvector'::pg_catalog.regtype::pg_catalog.oid "
        "ORDER BY a.attnum",
        [table_identifier(table).as_string(conn)],
    ).fetchall()
    add = (
        f"add one: ALTER TABLE {table} ADD COLUMN fts tsvector GENERATED ALWAYS AS (to_tsvector('english', "
        f"coalesce(<text column>, ''))) STORED; CREATE INDEX ON {table} USING gin (fts);"
    )
    if name is None:
        if len(found) != 1:
            which = "no tsvector column" if not found else f"several ({', '.join(n for n, _ in found)}): name one"
            raise InvalidInput(f"Hybrid search needs a full-text column; {table} has {which}. To {add}")
        name = found[0][0]
    expressions: dict[str, str | None] = dict(found)
    expression = expressions.get(name)
    if name not in expressions:
        raise InvalidInput(f"{table} has no tsvector column {name!r}. To {add}")
    if config is None:
        match = TEXT_CONFIG.search(expression or "")
        config = match.group(1) if match else "english"
    exists = conn.execute(  # qualified and cast: the rule in pgsim.db.catalog
        "SELECT pg_catalog.count(*) FROM pg_catalog.pg_ts_config "
        "WHERE cfgname OPERATOR(pg_catalog.=) %s::pg_catalog.name",
        [config.split(".")[-1]],
    ).fetchone()
    if exists == (0,):
        raise InvalidInput(f"There is no text search configuration {config!r} here (see \\dF in psql).")
    return TextColumn(name, config)
