"""The column a search runs on and the query as a vector for it: dimension, type, the registration, and
the model check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg

from pgsim.columns.registry import Registration, chunk_table, get_registration
from pgsim.db.catalog import resolve_table, table_columns
from pgsim.db.names import table_identifier
from pgsim.encoding.encoder import check_vector, encoder_for
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.errors import InvalidInput
from pgsim.knn.caches import column_cache, database_key
from pgsim.psycopg import Text, bindable

MAX_K = 10_000


@dataclass(frozen=True)
class VectorColumn:
    table: str
    column: str
    type_name: str  # vector or halfvec
    dimension: int
    other_columns: tuple[str, ...]
    registration: Registration | None = None  # set when pgsim keeps this column in sync (pgsim.add_embedding)
    readable_columns: tuple[str, ...] = ()  # of other_columns, those the current role may SELECT: the default
    # its documents are chunked (pgsim.chunking): searches return documents by their chunks. Cached with
    # the rest for PLAN_SECONDS, so another process's add_chunks shows within that time.
    chunked: bool = False

    @property
    def prefix(self) -> int | None:
        """Prefix storage: the length of the vectors' prefix the column's index holds; else None."""
        return self.registration.prefix if self.registration is not None else None

    @property
    def default_columns(self) -> tuple[str, ...]:
        """What a search returns when not told: the other columns the current role may read."""
        return self.readable_columns


def vector_column(conn: psycopg.Connection[Any], table: str, column: str) -> VectorColumn:
    """The vector column's dimension and the table's other columns, with a clear error when missing."""
    key = (database_key(conn), table, column)
    known = column_cache.get(key)
    if known is None:
        known = column_cache.put(key, read_vector_column(conn, table, column))
    return known


def read_vector_column(conn: psycopg.Connection[Any], table: str, column: str) -> VectorColumn:
    found = resolve_table(conn, table)
    columns = table_columns(conn, found.oid)
    if column not in columns:
        raise InvalidInput(f"Table {table!r} has no column {column!r}; its columns are {', '.join(columns)}.")
    declared = re.fullmatch(r"(vector|halfvec)(?:\((\d+)\))?", columns[column])
    if declared is None:
        raise InvalidInput(f"Column {table}.{column} is {columns[column]}, not a pgvector vector column.")
    if declared[2] is None:
        raise InvalidInput(f"Column {table}.{column} has no declared dimension; declare it as vector(n).")
    readable = conn.execute(
        "SELECT pg_catalog.array_agg(attname::pg_catalog.text ORDER BY attnum) FROM pg_catalog.pg_attribute "
        "WHERE attrelid OPERATOR(pg_catalog.=) %s::pg_catalog.oid AND attnum OPERATOR(pg_catalog.>) 0 "
        "AND NOT attisdropped AND attname OPERATOR(pg_catalog.<>) %s::pg_catalog.name "
        "AND pg_catalog.has_column_privilege(attrelid, attnum, 'SELECT'::pg_catalog.text)",
        [found.oid, column],
    ).fetchone()
    registration = get_registration(conn, table, column)
    return VectorColumn(
        table,
        column,
        declared[1],
        int(declared[2]),
        tuple(name for name in columns if name != column),
        registration,
        tuple(readable[0] or ()) if readable else (),
        registration is not None and chunk_table(conn, registration) is not None,
    )


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidInput(f"k must be a whole number from 1 to {MAX_K}; got {k!r}.")


def target_and_params(
    conn: psycopg.Connection[Any], table: str, column: str, query: Any, model: str | None
) -> tuple[VectorColumn, dict[str, Any]]:
    """The column searched, and the statement's parameters: the query as a vector of the column's dimension
    (text is encoded with the column's registered model) and, for a registered column, what
    ``pgsim.expect_model`` checks in the statement itself."""
    target = vector_column(conn, table, column)
    registration = target.registration
    revision = None
    if isinstance(query, str):
        if registration is not None and model not in (None, registration.model):
            raise InvalidInput(
                f"{table}.{column} holds embeddings of model {registration.model!r}; a query encoded with "
                f"{model!r} cannot be compared with them. Leave out the model to use the column's."
            )
        model = registration.model if registration else (model or DEFAULT_MODEL)
        vector = Text(query).vector(model)
        if registration is not None:
            revision = encoder_for(model).revision
            if revision != registration.model_revision:
                raise InvalidInput(
                    f"Model {model!r} here (revision {revision}) is not the one {table}.{column} holds (revision "
                    f"{registration.model_revision}); install that model, or re-embed: pgsim change-model."
                )
    else:
        vector, model = check_vector(query, target.dimension), None
    if vector.shape[0] != target.dimension:
        raise InvalidInput(
            f"Model {model!r} gives {vector.shape[0]} dimensions; {table}.{column} holds {target.dimension}."
        )
    if not vector.any():
        raise InvalidInput("The query vector is all zeros: it has no direction, so no cosine distance to it exists.")
    params: dict[str, Any] = {"q": bindable(conn, vector)}
    # what a walk of a bit or prefix index checks it still walks that index (pgsim.knn.statements)
    params.update(reranked_table=table_identifier(target.table).as_string(conn), reranked_column=target.column)
    if registration is not None:
        params.update(
            g_schema=registration.schema,
            g_table=registration.table_name,
            g_column=registration.column,
            g_model=model,
            g_revision=revision,
        )
    return target, params
