"""Adding an embedding column: ``add_embedding`` adds the column (or adopts an existing one of the model's
dimension), a row in ``pgsim.embedding``, two triggers that queue rows for the workers (an INSERT without an
embedding; an UPDATE that changes a source column and not the embedding), the HNSW index, and queues the
rows already there. Everything but a ``CONCURRENTLY`` index build happens in one transaction: an error
changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgsim.columns.chunking.settings import Chunks, checked_chunks
from pgsim.columns.chunking.splitting import window
from pgsim.columns.chunking.tables import add_chunks
from pgsim.columns.registry import (
    DTYPES,
    STALE,
    Registration,
    checked_prefix,
    column_type,
    columns_expression,
    forget_dropped,
    get_registration,
    queue_rows,
    registration_by_id,
)
from pgsim.db.catalog import (
    Table,
    pin_search_path,
    pinned_path,
    primary_key,
    relation_exists,
    resolve_table,
    table_columns,
)
from pgsim.db.citus import require_not_citus_table
from pgsim.db.hnsw import HNSW, create_hnsw_index
from pgsim.db.names import derived_name
from pgsim.db.standby import require_primary
from pgsim.encoding.encoder import encoder_for
from pgsim.encoding.models import DEFAULT_MODEL, model_dimension, model_revision
from pgsim.errors import InvalidInput, SchemaMissing

DEFAULT_HNSW = HNSW()


@dataclass(frozen=True)
class TableShape(Table):
    """A table that can hold an embedding column: its columns (name -> format_type) and primary key."""

    columns: dict[str, str]
    key_columns: tuple[str, ...]


def add_embedding(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    *,
    source: str | Sequence[str] | sql.Composable,
    model: str = DEFAULT_MODEL,
    dtype: str = "vector",
    index: HNSW | None = DEFAULT_HNSW,
    concurrently: bool = False,
    queue_existing: bool = True,
    replaces: int | None = None,
    planned_index: HNSW | None = None,
    index_name: str | None = None,
    stale: str = "keep",
    chunks: Chunks | None = None,
    prefix: int | None = None,
) -> Registration:
    """Register ``table.column`` as the embedding of ``source`` under ``model``.

    ``source`` is a column name, a list of column names (joined by a blank line, NULLs skipped), or an SQL
    expression over the table's columns (a ``psycopg.sql.SQL`` or a string that is not a column name).
    The column is added as ``vector(d)`` or ``halfvec(d)`` with the model's dimension ``d``; an existing
    column of that type is adopted. Existing rows are queued for the workers unless ``queue_existing`` is
    false. ``concurrently`` builds the index without blocking writes (needs an autocommit connection).
    ``index_name`` names the index (default ``<table>_<column>_hnsw``); an HNSW index of that name on the
    column that exists already is adopted, not built again. ``stale`` says what a row's vector does after an
    UPDATE of its source text until the worker re-embeds it: ``"keep"`` (searches find the row by its old
    vector) or ``"hide"`` (the vector becomes NULL in the same statement: the row is not found until then).
    ``chunks`` (:class:`Chunks`) also cuts each row's text into chunks of the model's word pieces, kept in a
    table next to this one: searches on the column then return documents ranked by their chunks. The rows
    there are queued for their chunks even with ``queue_existing=False`` (only the workers cut chunks).
    ``prefix`` (prefix storage, for a model trained for it): the index holds each vector's first ``prefix``
    values, and searches re-rank its candidates on the full vectors the column keeps.
    (``replaces`` and ``planned_index`` are for :func:`change_model`: the index is recorded, built later.)"""
    if dtype not in DTYPES:
        raise InvalidInput(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    require_primary(conn, "pgsim.add_embedding")
    if stale not in STALE:
        raise InvalidInput(f"stale must be one of {', '.join(STALE)}; got {stale!r}.")
    if concurrently and not conn.autocommit:
        raise InvalidInput("concurrently=True needs an autocommit connection (psycopg: autocommit=True).")
    if not isinstance(column, str) or not column:
        raise InvalidInput(f"The embedding column name must be a non-empty string; got {column!r}.")
    # an unknown model fails here, before any change; read from the model's files, without loading it
    revision, dimension = model_revision(model), model_dimension(model)
    chunks = checked_chunks(chunks)
    prefix = checked_prefix(prefix, model, dimension, dtype)
    if chunks is not None and (dtype == "bit" or prefix is not None):
        storage = "dtype='bit'" if dtype == "bit" else "prefix storage"
        raise InvalidInput(f"{storage} does not take chunks yet: chunk a vector or halfvec column.")
    if chunks is not None:
        chunks.check(window(encoder_for(model)), model)
    with conn.transaction():
        target = read_table(conn, table)
        require_not_citus_table(conn, target.oid, target.qualified)
        _check_names(target, column)
        forget_dropped(conn)
        if get_registration(conn, target.qualified, column) is not None:
            raise InvalidInput(
                f"{target.qualified}.{column} is already registered; remove it first (pgsim remove-embedding)."
            )
        expression = source_expression(conn, target, source)
        source_columns = source_columns_of(conn, target, expression)
        _check_column(target, column, dtype, dimension, model)
        index_name = (index_name or derived_name(target.name, column, suffix="hnsw")) if index is not None else None
        recorded = index or planned_index
        adopt_index = index_name is not None and relation_exists(conn, target.schema, index_name)
        if adopt_index and not _is_hnsw_index_on(conn, target, index_name, column):  # type: ignore[arg-type]
            raise InvalidInput(
                f"An index or table named {target.schema}.{index_name} already exists; drop or rename it."
            )
        try:
            row = conn.execute(
                """
                SELECT pgsim.register_embedding(target => %s::pg_catalog.regclass, column_name => %s, source => %s,
                    model => %s, model_revision => %s, dimension => %s, dtype => %s, index_name => %s,
                    index_m => %s, index_ef_construction => %s, source_columns => %s::pg_catalog.name[], replaces => %s,
                    stale => %s, prefix => %s)
                """,
                [
                    target.identifier.as_string(conn),
                    column,
                    expression,
                    model,
                    revision,
                    dimension,
                    dtype,
                    index_name,
                    recorded.m if recorded else None,
                    recorded.ef_construction if recorded else None,
                    list(source_columns),
                    replaces,
                    stale,
                    prefix,
                ],  # fmt: skip
            ).fetchone()
        except psycopg.errors.InsufficientPrivilege as exc:
            hint = f" {exc.diag.message_hint}" if exc.diag.message_hint else ""
            raise InvalidInput(f"{exc.diag.message_primary}{hint}") from None
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction):
            raise SchemaMissing("pgsim's schema is missing or out of date here: run `pgsim install` first.") from None
        assert row is not None
        registration = registration_by_id(conn, row[0])
        assert registration is not None
        if replaces is not None:
            _copy_column_grants(conn, registration, replaces)
        if chunks is not None:
            # every row with text is queued for its chunks, queue_existing or not: only the workers cut chunks
            add_chunks(conn, target.qualified, column, chunks, queue=not concurrently)
        if index is not None and adopt_index:
            index = None  # the HNSW index of that name is there already (declared by the ORM, say)
        if index is not None and not concurrently:
            build_index(conn, registration, concurrently=False)
        if queue_existing and not concurrently:
            queue_rows(conn, registration)
    if concurrently:  # outside the transaction that locked the table for ADD COLUMN and the triggers
        if queue_existing or chunks is not None:  # rows written meanwhile were queued by the triggers
            queue_rows(conn, registration, only_missing=chunks is None)
        if index is not None:
            build_index(conn, registration, concurrently=True)
    return registration


def _copy_column_grants(conn: psycopg.Connection[Any], new: Registration, replaces: int) -> None:
    """The new column of a model change gets the column privileges of the one it replaces: a worker role
    (pgsim grant worker) that may update the old column fills the new one, and readers keep reading it."""
    with pinned_path(conn):  # a catalog read by OID (the rule in pgsim.db.catalog)
        grants = conn.execute(
            """
            SELECT a.privilege_type, a.grantee FROM pgsim.embedding e
            JOIN pg_attribute c ON c.attrelid = e.table_oid AND c.attname = e.column_name
            CROSS JOIN LATERAL aclexplode(c.attacl) AS a
            WHERE e.id = %s::int4
            """,
            [replaces],
        ).fetchall()
    for privilege, grantee in grants:
        if privilege not in ("SELECT", "INSERT", "UPDATE", "REFERENCES"):
            continue
        to = sql.SQL("PUBLIC") if grantee == 0 else sql.Identifier(_role_name(conn, grantee))
        conn.execute(
            sql.SQL("GRANT {} ({}) ON {} TO {}").format(
                sql.SQL(privilege), sql.Identifier(new.column), new.table_sql, to
            )
        )


def _role_name(conn: psycopg.Connection[Any], oid: int) -> str:
    row = conn.execute(
        "SELECT rolname FROM pg_catalog.pg_roles WHERE oid OPERATOR(pg_catalog.=) %s::pg_catalog.oid", [oid]
    ).fetchone()
    return str(row[0]) if row else ""


def read_table(conn: psycopg.Connection[Any], table: str) -> TableShape:
    found = resolve_table(conn, table)
    if found.kind not in ("r", "p"):
        raise InvalidInput(f"{table!r} is not a table; embedding columns live in tables.")
    keys = primary_key(conn, found.oid)
    if not keys:
        raise InvalidInput(
            f"Table {found.qualified} has no primary key, which pgsim needs to find a row again after encoding it. "
            f"Add one: ALTER TABLE {found.qualified} ADD PRIMARY KEY (<column>);"
        )
    return TableShape(found.oid, found.schema, found.name, found.kind, table_columns(conn, found.oid), keys)


def source_expression(
    conn: psycopg.Connection[Any], target: TableShape, source: str | Sequence[str] | sql.Composable
) -> str:
    """The source as SQL text: quoted column names, or the user's expression as given."""
    if isinstance(source, sql.Composable):
        return source.as_string(conn)
    if isinstance(source, str):
        if source in target.columns:
            return sql.Identifier(source).as_string(conn)
        if not source.strip():
            raise InvalidInput("source is empty: name the column(s) that hold the text, or give an SQL expression.")
        return source
    names = list(source)
    if not names or not all(isinstance(name, str) for name in names):
        raise InvalidInput(
            f"source must be a column name, a list of column names, or an SQL expression; got {source!r}."
        )
    unknown = [name for name in names if name not in target.columns]
    if unknown:
        raise InvalidInput(
            f"Table {target.qualified} has no column {', '.join(map(repr, unknown))}; its columns are "
            f"{', '.join(target.columns)}."
        )
    return columns_expression(names)


def source_columns_of(conn: psycopg.Connection[Any], target: TableShape, expression: str) -> tuple[str, ...]:
    """The table's columns that ``expression`` reads, found from the dependencies of a throwaway view; and
    a clear error when the expression is not valid SQL over the table. It is checked under the search_path
    the workers evaluate it under (pg_catalog, pg_temp), so a function of the user's own must be qualified."""
    probe = sql.SQL("SELECT (({})::text) AS source FROM {}").format(sql.SQL(expression), target.identifier)
    try:
        with conn.transaction() as tx:
            pin_search_path(conn)
            # With a parameter, psycopg sends one statement that PostgreSQL parses alone: an expression that
            # tries to end the statement and start another fails here instead of running.
            conn.execute(sql.SQL("{} WHERE %s LIMIT 0").format(probe), [False])
            conn.execute(sql.SQL("CREATE TEMP VIEW pgsim_source_probe AS {}").format(probe))
            rows = conn.execute(
                """
                SELECT DISTINCT a.attname, a.attnum FROM pg_depend d
                JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                WHERE r.ev_class = 'pg_temp.pgsim_source_probe'::regclass AND d.refobjid = %s::regclass
                ORDER BY a.attnum
                """,
                [target.identifier.as_string(conn)],
            ).fetchall()
            raise psycopg.Rollback(tx)
    except psycopg.errors.UndefinedColumn as exc:
        raise InvalidInput(
            f"source {expression!r}: {exc.diag.message_primary}. The columns of {target.qualified} are "
            f"{', '.join(target.columns)}."
        ) from None
    except psycopg.Error as exc:
        qualify = (
            " (the source is evaluated with search_path pg_catalog, pg_temp: qualify your own functions, e.g. "
            "public.f(body))"
            if isinstance(exc, psycopg.errors.UndefinedFunction)
            else ""
        )
        raise InvalidInput(
            f"source {expression!r} is not an SQL expression over {target.qualified}: "
            f"{exc.diag.message_primary or exc}{qualify}"
        ) from None
    columns = tuple(name for name, _ in rows)
    if not columns:
        raise InvalidInput(
            f"source {expression!r} reads no column of {target.qualified}, so every row would embed alike."
        )
    return columns


def _check_names(target: TableShape, column: str) -> None:
    """No name a search statement holds may contain ``%``: psycopg reads it as a parameter marker in a statement
    with parameters, and every search of the column would fail."""
    named = [target.schema, target.name, column, *target.key_columns]
    if any("%" in name for name in named):
        raise InvalidInput(
            f"pgsim cannot search {target.qualified}.{column}: a name among its schema, table, embedding column and "
            f"primary key columns ({', '.join(repr(n) for n in named if '%' in n)}) holds '%', which psycopg reads as "
            "a parameter marker in the search statements. Rename it."
        )


def _check_column(target: TableShape, column: str, dtype: str, dimension: int, model: str) -> None:
    """An existing ``column`` must have the type the model gives (pgsim.register_embedding adopts it)."""
    wanted = f"{column_type(dtype)}({dimension})"
    existing = target.columns.get(column)
    if existing is not None and existing != wanted:
        raise InvalidInput(
            f"Column {target.qualified}.{column} exists as {existing}, but model {model!r} gives {wanted}. Use another "
            "column name, or a model of that dimension."
        )


def _is_hnsw_index_on(conn: psycopg.Connection[Any], target: TableShape, index_name: str, column: str) -> bool:
    with pinned_path(conn):  # both names are schema-qualified: nothing needs the caller's path
        row = conn.execute(
            """
            SELECT am.amname = 'hnsw' AND i.indnatts = 1 AND a.attname IS NOT DISTINCT FROM %(column)s::name
                   OR i.indexrelid = pgsim.bit_index(i.indrelid::regclass, %(column)s::name)::regclass
            FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
            LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indexrelid = to_regclass(%(index)s::text) AND i.indrelid = to_regclass(%(table)s::text)
            """,
            {
                "column": column,
                "index": sql.Identifier(target.schema, index_name).as_string(conn),
                "table": target.identifier.as_string(conn),
            },
        ).fetchone()
    return bool(row and row[0])


def build_index(conn: psycopg.Connection[Any], registration: Registration, *, concurrently: bool) -> None:
    assert registration.index is not None and registration.index_name is not None
    create_hnsw_index(
        conn,
        registration.table,
        registration.column,
        registration.index_name,
        registration.index,
        opclass=registration.opclass,
        concurrently=concurrently,
        prefix=registration.prefix,
    )
