"""``.nearest()`` on a chunked embedding (pgsim.chunking): the ORM query returns documents, each once, nearest
first by their distance over their chunks (:func:`pgsim.knn.documents.document_distance`), as ``pgsim.knn`` does.

pgsim's ``do_orm_execute`` hook (pgsim.sqlalchemy.knn) hands such a statement here. When ``.nearest()`` is its
first ORDER BY term, its LIMIT is known and its filter can be planned (the column's table alone, conditions
that compile to literal SQL), the statement is joined to ``pgsim.knn_documents`` under that same filter and
ordered by its distance: the SQL function keeps the k-documents contract, with the chunk index and its exact
fallback. Otherwise, or if that still gives fewer rows than the LIMIT, the statement is ordered by each
document's distance computed over all its chunks (exact: every document that passes the filter, its chunks
found by the chunk table's primary key). A document without chunks yet, or without its own vector (hidden as
stale after a change of its text), is left out on both paths.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

from sqlalchemy import Float, Select, Table, Text, and_, cast, column, func, literal, null, select, table, text
from sqlalchemy.dialects.postgresql import JSONB, REGCLASS
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import ORMExecuteState

from pgsim.knn.caches import TtlCache
from pgsim.knn.documents import TEMPERATURE
from pgsim.knn.target import MAX_K

log = logging.getLogger(__name__)

HAS_CHUNKING = text("SELECT pg_catalog.to_regclass('pgsim.chunking') IS NOT NULL")
# on the caller's search_path (the ORM's session): every operator qualified and its operands typed exactly, so
# that no operator of another role's in a schema on that path matches better (the rule in pgsim.db.catalog)
CHUNK_TABLE = text(
    "SELECT n.nspname, c.relname FROM pgsim.chunking k "
    "JOIN pgsim.embedding e ON e.id OPERATOR(pg_catalog.=) k.embedding_id "
    "JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) k.chunk_table "
    "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
    "WHERE e.table_oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(CAST(:table AS pg_catalog.text))::pg_catalog.oid "
    "AND e.column_name OPERATOR(pg_catalog.=) CAST(:column AS pg_catalog.name)"
)
# database URL -> whether pgsim.chunking is there (a chunk table itself is looked up every time: a column's
# chunking can be removed at any moment, and a query on a chunk table that is gone would fail)
_has_chunking: TtlCache[str, bool] = TtlCache(60.0)


def chunk_table_of(connection: Any, embedding: Any) -> Any | None:
    """The chunk table of the embedding column ``embedding`` as a Core table (its key columns and
    ``embedding``), or None when the column is not chunked or pgsim's schema is not there."""
    documents = getattr(embedding, "table", None)
    if documents is None or not getattr(documents, "primary_key", None):
        return None
    base = getattr(documents, "element", documents)  # an alias's table
    if not isinstance(base, Table):
        return None
    name = connection.dialect.identifier_preparer.format_table(base)
    url = str(connection.engine.url)
    installed = _has_chunking.get(url)
    if installed is None:
        installed = _has_chunking.put(url, bool(connection.execute(HAS_CHUNKING).scalar()))
    row = connection.execute(CHUNK_TABLE, {"table": name, "column": embedding.name}).first() if installed else None
    if row is None:
        return None
    keys: list[Any] = [column(str(key_column.name)) for key_column in _keys(documents)]
    return table(str(row[1]), *keys, column("embedding"), schema=str(row[0]))


def nearest_documents(
    state: ORMExecuteState,
    connection: Any,
    nearest: Any,
    chunks: Any,
    limit: int | None,
    offset: int,
    condition: str | None,
    plannable: bool,
) -> Any:
    """The result of ``state``'s statement with documents in place of rows (see the module's text); ``limit``:
    its LIMIT, None when unknown; ``condition``: its filter as literal SQL, when ``plannable``."""
    statement: Select[Any] = state.statement  # type: ignore[assignment]
    order = list(statement._order_by_clauses)
    embedding = nearest._annotations["pgsim_nearest"]
    documents = embedding.table
    k = None if limit is None else limit + offset  # the function must find the rows the offset skips too
    if limit is not None and k is not None and k <= MAX_K and plannable and order and order[0] is nearest:
        planned = _planned(statement, order, nearest, documents, connection, k, condition, embedding.name)
        try:
            # in a savepoint: a filter the function cannot read (a function of the caller's search_path, say)
            # leaves the caller's transaction as it was, and the exact path runs instead
            with nullcontext() if not local_transaction(connection) else connection.begin_nested():
                frozen = state.invoke_statement(statement=planned).freeze()
        except DBAPIError as exc:
            log.warning("pgsim.knn_documents could not run this query (%s): exact scan instead", exc.orig)
        else:
            if len(frozen.data) >= limit:  # rows, or ORM objects: each document is one row of the join
                return frozen()
            log.info("pgsim.knn_documents gave %d of %d documents; exact scan instead", len(frozen.data), limit)
    return state.invoke_statement(statement=_exact(statement, order, nearest, documents, chunks))


def local_transaction(connection: Any) -> bool:
    """Whether statements on ``connection`` run in a transaction (not autocommit)."""
    return not getattr(connection.connection.driver_connection, "autocommit", False)


def _exact(statement: Select[Any], order: list[Any], nearest: Any, documents: Any, chunks: Any) -> Select[Any]:
    """``statement`` ordered by each document's distance over its chunks (pgsim.knn.documents.document_distance)
    where it ordered by ``nearest``."""
    match = and_(*[chunks.c[str(key.name)] == key for key in _keys(documents)])
    similarity = literal(1.0) - chunks.c.embedding.op("<=>", return_type=Float)(nearest.right)
    mean = func.pg_catalog.avg(func.pg_catalog.exp(similarity / literal(TEMPERATURE)), type_=Float)
    soft = literal(1.0) - literal(TEMPERATURE) * func.pg_catalog.ln(mean, type_=Float)
    distance = select(soft).where(match).scalar_subquery()
    return (
        statement.order_by(None)
        .order_by(*[distance if term is nearest else term for term in order])
        .where(distance.is_not(None), nearest._annotations["pgsim_nearest"].is_not(None))
    )


def _planned(
    statement: Select[Any],
    order: list[Any],
    nearest: Any,
    documents: Any,
    connection: Any,
    k: int,
    condition: str | None,
    column_name: str,
) -> Select[Any]:
    """``statement`` joined to the k documents pgsim.knn_documents finds under ``condition``, ordered by their
    distance where it ordered by ``nearest``."""
    name = connection.dialect.identifier_preparer.format_table(documents)
    hits = (
        func.pgsim.knn_documents(
            cast(literal(name, Text), REGCLASS),
            literal(column_name, Text),
            nearest.right,
            literal(k),
            literal(condition, Text) if condition is not None else null(),
        )
        .table_valued(column("row", JSONB), column("distance", Float))
        .alias("_pgsim_documents")
    )
    match = and_(
        *[key == cast(hits.c.row.op("->>")(literal(str(key.name), Text)), key.type) for key in _keys(documents)]
    )
    return (
        statement.join(hits, match)
        .order_by(None)
        .order_by(*[hits.c.distance if term is nearest else term for term in order])
    )


def _keys(documents: Any) -> list[Any]:
    """The primary key columns of a table or of an alias of one."""
    return list(documents.primary_key)
