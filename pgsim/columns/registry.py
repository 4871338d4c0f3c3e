"""Registered embedding columns: which table.column holds embeddings of which source text and model (the
rows of ``pgsim.embedding``), how a queued key finds its row, and removing a registration.
:mod:`pgsim.columns.adding` adds one; :mod:`pgsim.columns.model_change` moves one to another model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgsim.db.catalog import has_schema_table
from pgsim.db.hnsw import HNSW
from pgsim.db.names import table_identifier
from pgsim.encoding.models import matryoshka_dims
from pgsim.errors import InvalidInput

# bit: a vector column whose HNSW index is binary-quantised (Hamming distance over binary_quantize(column)),
# searched by candidates re-ranked on the full vectors
DTYPES = ("vector", "halfvec", "bit")
STALE = ("keep", "hide")  # what a changed row's vector does until re-embedded (Registration.stale)
# Separator between source columns given as a list: a paragraph break, which tokenizers treat as space.
COLUMN_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Registration:
    """One row of ``pgsim.embedding``."""

    id: int
    schema: str
    table_name: str
    column: str
    source: str  # SQL expression over the table's columns
    source_columns: tuple[str, ...]
    key_columns: tuple[str, ...]
    model: str
    model_revision: str
    dimension: int
    dtype: str
    index_name: str | None
    index: HNSW | None
    created_column: bool
    replaces: int | None
    table_oid: int  # what the registration follows: the names above follow renames of it
    stale: str = "keep"  # a changed row until re-embedded: "keep" its old vector, or "hide" it (NULL)
    # prefix storage: the index holds each vector's first ``prefix`` values (a Matryoshka-trained model's),
    # searched by candidates re-ranked on the full vectors; None: the index holds the whole vector
    prefix: int | None = None

    @property
    def table(self) -> str:
        return f"{self.schema}.{self.table_name}"

    @property
    def table_sql(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table_name)

    @property
    def source_sql(self) -> sql.Composed:
        """The source text as an SQL expression (parenthesised, cast to text)."""
        return sql.SQL("(({})::text)").format(sql.SQL(self.source))

    @property
    def column_type(self) -> str:
        """The column's pgvector type: ``bit`` storage keeps full vectors, and only its index is binary."""
        return column_type(self.dtype)

    @property
    def opclass(self) -> str:
        return "bit_hamming_ops" if self.dtype == "bit" else f"{self.dtype}_cosine_ops"


def column_type(dtype: str) -> str:
    return "vector" if dtype == "bit" else dtype


def checked_prefix(prefix: object, model: str, dimension: int, dtype: str) -> int | None:
    """``prefix`` as prefix storage takes it: None, or a size ``model`` was trained to be cut to (its
    declared Matryoshka dims), shorter than its vectors, on a ``vector`` column; else a clear InvalidInput."""
    if prefix is None:
        return None
    if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 1:
        raise InvalidInput(f"prefix must be a positive whole number of dimensions; got {prefix!r}.")
    if dtype != "vector":
        raise InvalidInput(f"prefix storage keeps a vector column; it does not take dtype={dtype!r}.")
    if prefix >= dimension:
        raise InvalidInput(
            f"prefix={prefix} is not shorter than model {model!r}'s {dimension}-dimension vectors: leave prefix out "
            "to index the whole vector."
        )
    trained = matryoshka_dims(model)
    if prefix not in trained:
        said = (
            f"was trained for prefixes of {', '.join(str(size) for size in trained if size < dimension)} dimensions"
            if trained
            else "is not trained for prefixes (it declares no matryoshka_dims), so a prefix of its vectors ranks "
            "poorly; use a Matryoshka-trained model such as wordllama-l2-supercat"
        )
        raise InvalidInput(f"prefix={prefix}: model {model!r} {said}.")
    return prefix


# A registration's table is its OID: the schema and table names come from the catalog, never from the row's
# stored names (which any writer of the row could set to another table's). Every operator and function is
# pg_catalog's, named so, and every parameter cast: get_registration runs on the caller's search_path (the rule
# in pgsim.db.catalog).
REGISTRY_SELECT = (
    "SELECT e.id, n.nspname, c.relname, e.column_name, e.source, e.source_columns, e.key_columns, e.model, "
    "e.model_revision, e.dimension, e.dtype, e.index_name, e.index_m, e.index_ef_construction, e.created_column, "
    "e.replaces, e.table_oid, e.stale, e.prefix FROM pgsim.embedding e "
    "JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) e.table_oid "
    "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace"
)


def registration_from_row(row: Sequence[Any]) -> Registration:
    (id_, schema, table, column, source, source_columns, key_columns, model, revision, dimension, dtype,
     index_name, m, ef_construction, created_column, replaces, table_oid, stale, prefix) = row  # fmt: skip
    return Registration(
        id=id_,
        schema=schema,
        table_name=table,
        column=column,
        source=source,
        source_columns=tuple(source_columns),
        key_columns=tuple(key_columns),
        model=model,
        model_revision=revision,
        dimension=dimension,
        dtype=dtype,
        index_name=index_name,
        index=HNSW(m, ef_construction) if m is not None else None,
        created_column=created_column,
        replaces=replaces,
        table_oid=int(table_oid),
        stale=stale,
        prefix=prefix,
    )


def registrations(conn: psycopg.Connection[Any]) -> list[Registration]:
    """Every registered embedding column (none when pgsim's sync schema is not installed)."""
    if not has_schema_table(conn, "embedding"):
        return []
    query = REGISTRY_SELECT + " ORDER BY e.id"
    return [registration_from_row(row) for row in conn.execute(query).fetchall()]


def get_registration(conn: psycopg.Connection[Any], table: str, column: str) -> Registration | None:
    """The registration of ``table.column``, or None. ``table`` may leave out its schema (search_path)."""
    if not has_schema_table(conn, "embedding"):
        return None
    row = conn.execute(
        REGISTRY_SELECT + " WHERE e.table_oid OPERATOR(pg_catalog.=) "
        "pg_catalog.to_regclass(%s::pg_catalog.text)::pg_catalog.oid "
        "AND e.column_name OPERATOR(pg_catalog.=) %s::pg_catalog.name",
        [table_identifier(table).as_string(conn), column],
    ).fetchone()
    return registration_from_row(row) if row else None


def registration_by_id(conn: psycopg.Connection[Any], registration_id: int) -> Registration | None:
    query = REGISTRY_SELECT + " WHERE e.id OPERATOR(pg_catalog.=) %s::pg_catalog.int4"
    row = conn.execute(query, [registration_id]).fetchone()
    return registration_from_row(row) if row else None


def require_registration(conn: psycopg.Connection[Any], table: str, column: str) -> Registration:
    found = get_registration(conn, table, column)
    if found is None:
        raise InvalidInput(
            f"{table}.{column} is not a registered embedding column. Register it: pgsim add-embedding {table} "
            f"{column} --source <column>  (Python: pgsim.add_embedding(conn, {table!r}, {column!r}, source=...))"
        )
    return found


def remove_embedding(conn: psycopg.Connection[Any], table: str, column: str, *, drop_column: bool = True) -> None:
    """Undo :func:`add_embedding`: triggers, queue entries, dead letters, registry row, index, and the column
    if pgsim added it (``drop_column=False`` keeps it). A model change still filling is removed with it."""
    with conn.transaction():
        registration = require_registration(conn, table, column)
        pending = conn.execute(
            "SELECT id FROM pgsim.embedding WHERE replaces OPERATOR(pg_catalog.=) %s::pg_catalog.int4 "
            "AND table_oid OPERATOR(pg_catalog.=) %s::pg_catalog.oid",
            [registration.id, registration.table_oid],
        ).fetchall()
        for (replacement_id,) in pending:
            replacement = registration_by_id(conn, replacement_id)
            assert replacement is not None
            remove_registration(conn, replacement, drop_column=True)
        remove_registration(conn, registration, drop_column=drop_column)
        replaced = registration_by_id(conn, registration.replaces) if registration.replaces is not None else None
        if replaced is not None and not has_triggers(conn, replaced):
            # a cancelled change of source: the old column is kept in sync again, from every row's text now
            conn.execute("SELECT pgsim.create_triggers(%s::pg_catalog.int4)", [replaced.id])
            queue_rows(conn, replaced, only_missing=False)


def has_triggers(conn: psycopg.Connection[Any], registration: Registration) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid OPERATOR(pg_catalog.=) %s::pg_catalog.oid "
        "AND tgname OPERATOR(pg_catalog.=) %s::pg_catalog.name)",
        [registration.table_oid, f"pgsim_{registration.id}_insert"],
    ).fetchone()
    return bool(row and row[0])


def remove_registration(conn: psycopg.Connection[Any], registration: Registration, *, drop_column: bool) -> None:
    """pgsim.unregister_embedding (and the chunk table of a chunked registration), with a clear error when
    other objects depend on the column."""
    try:
        with conn.transaction():
            chunks = chunk_table(conn, registration)
            if chunks is not None:  # its row in pgsim.chunking goes with the registration's
                conn.execute(sql.SQL("DROP TABLE {}").format(chunks.table_sql))
            conn.execute("SELECT pgsim.unregister_embedding(%s, %s)", [registration.id, drop_column])
    except psycopg.errors.DependentObjectsStillExist as exc:
        raise InvalidInput(
            f"Cannot drop {registration.table}.{registration.column}: {exc.diag.message_detail or exc}. "
            "Drop or change those objects first (nothing was removed)."
        ) from None


@dataclass(frozen=True)
class ChunkTable:
    """Where a chunked registration keeps its chunk vectors (a row of ``pgsim.chunking``; see
    pgsim.columns.chunking)."""

    schema: str
    name: str
    tokens: int
    overlap: int
    oid: int = 0  # the chunk table's

    @property
    def table_sql(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


def chunk_table(conn: psycopg.Connection[Any], registration: Registration) -> ChunkTable | None:
    """The chunk table of ``registration``, or None when it is not chunked (or pgsim.chunking is not installed).
    Its names come from the catalog by the recorded OID."""
    installed = conn.execute("SELECT pg_catalog.to_regclass('pgsim.chunking'::pg_catalog.text) IS NOT NULL").fetchone()
    if not (installed and installed[0]):
        return None
    row = conn.execute(
        "SELECT n.nspname, c.relname, k.tokens, k.overlap, c.oid FROM pgsim.chunking k "
        "JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) k.chunk_table "
        "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
        "WHERE k.embedding_id OPERATOR(pg_catalog.=) %s::pg_catalog.int4 "
        "AND k.table_oid OPERATOR(pg_catalog.=) %s::pg_catalog.oid",
        [registration.id, registration.table_oid],
    ).fetchone()
    return ChunkTable(row[0], row[1], row[2], row[3], int(row[4])) if row else None


def forget_dropped(conn: psycopg.Connection[Any]) -> list[int]:
    """Follow renamed tables and forget the registrations of dropped ones, with their queue entries and dead
    letters (``pgsim.forget_dropped``: by table OID, never by a name or a trigger another role can make).
    Returns the forgotten ids."""
    if not has_schema_table(conn, "embedding"):
        return []
    row = conn.execute("SELECT pgsim.forget_dropped()").fetchone()
    return list(row[0]) if row else []


def key_match(registration: Registration, key: sql.Composable) -> sql.Composed:
    """``table.k = (pg_catalog.jsonb_populate_record(NULL::table, key)).k AND ...``: the row a queued key names,
    compared in the key columns' own types, so the primary key index serves it."""
    record = sql.SQL("pg_catalog.jsonb_populate_record(NULL::{}, {})").format(registration.table_sql, key)
    return sql.SQL(" AND ").join(
        sql.SQL("{}.{} = ({}).{}").format(registration.table_sql, sql.Identifier(name), record, sql.Identifier(name))
        for name in registration.key_columns
    )


def queue_rows(conn: psycopg.Connection[Any], registration: Registration, *, only_missing: bool = True) -> int:
    """Queue the rows whose embedding is missing (or all rows with text) and wake the workers; returns how many
    entries were added (pgsim.queue_rows)."""
    row = conn.execute("SELECT pgsim.queue_rows(%s, %s)", [registration.id, only_missing]).fetchone()
    assert row is not None
    return int(row[0])


def columns_expression(names: Sequence[str]) -> str:
    """The source expression of a list of columns: the column, or ``concat_ws`` with a blank line."""
    if len(names) == 1:
        return sql.Identifier(names[0]).as_string(None)
    return (
        sql.SQL("concat_ws({}, {})")
        .format(sql.Literal(COLUMN_SEPARATOR), sql.SQL(", ").join(map(sql.Identifier, names)))
        .as_string(None)
    )
