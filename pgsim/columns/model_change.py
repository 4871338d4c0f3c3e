"""Changing what a registered column is made of (its source, model or dtype) without downtime: a second
column filled in the background while searches use the old one, then an atomic switch. A change of prefix
storage alone keeps the vectors and rebuilds the index only (:mod:`pgsim.columns.prefix_change`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import psycopg
from psycopg import sql

from pgsim.columns.adding import add_embedding, read_table, source_expression
from pgsim.columns.chunking.settings import Chunks, checked_chunks
from pgsim.columns.chunking.tables import chunk_table_name, fitted_name, relation_oid
from pgsim.columns.prefix_change import change_prefix, checked_prefix_argument, refuse_during_a_change
from pgsim.columns.registry import (
    Registration,
    chunk_table,
    registration_by_id,
    remove_registration,
    require_registration,
)
from pgsim.db.catalog import pin_search_path
from pgsim.db.hnsw import HNSW, create_hnsw_index
from pgsim.db.names import derived_name
from pgsim.db.standby import require_primary
from pgsim.encoding.models import model_revision
from pgsim.errors import InvalidInput

log = logging.getLogger(__name__)


def change_model(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    model: str,
    *,
    dtype: str | None = None,
    index: HNSW | None = None,
) -> Registration:
    """:func:`change_embedding` with another model (and, if given, another dtype)."""
    return change_embedding(conn, table, column, model=model, dtype=dtype, index=index)


def change_embedding(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    *,
    source: str | Sequence[str] | sql.Composable | None = None,
    model: str | None = None,
    dtype: str | None = None,
    index: HNSW | None = None,
    chunks: Chunks | None = None,
    prefix: int | Literal[False] | None = None,
) -> Registration:
    """Start re-embedding ``table.column`` under a new definition: another ``source``, ``model``, ``dtype``,
    ``chunks`` or ``prefix`` (each left out stays as registered; a chunked column's chunks are made again for
    the new definition; ``prefix=False``: the index holds the whole vectors). A new column (``<column>_next``)
    is registered for it and
    every row with text is queued, those that have vectors too. Searches keep using the old column meanwhile.
    When the workers have filled the new column, :func:`switch_over` (run by every drain) builds its index
    and, in one transaction, drops the old column and gives the new one its name. Returns the new
    registration.

    A change of model or dtype keeps the old column in sync until the switch. A change of source does not:
    the old column's triggers go at once (so a column only the old source read can be dropped right after),
    its vectors serve searches as they are, and rows written meanwhile are embedded in the new column only,
    where they become searchable at the switch. Nothing here loads the model: its dimension and revision
    come from its files.

    A change of ``prefix`` alone re-embeds nothing: the vectors stay, the index is built again now beside the
    old one and swapped in (:func:`~pgsim.columns.prefix_change.change_prefix`), and the column's own
    registration is returned."""
    checked_prefix_argument(prefix)
    return _start_change(conn, table, column, source, model, dtype, index, checked_chunks(chunks), prefix)


def change_chunks(conn: psycopg.Connection[Any], table: str, column: str, chunks: Chunks) -> Registration:
    """Start re-chunking the documents of ``table.column`` with ``chunks`` (or chunking them, if they are not
    yet) in the background, as :func:`change_embedding` re-embeds them: a new registration (``<column>_next``)
    with its own chunk table, filled by the workers while searches use the current chunks; the switch swaps
    both at once, and the chunk table takes the current one's name."""
    return _start_change(conn, table, column, None, None, None, None, checked_chunks(chunks, required=True), None)


def _start_change(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    source: str | Sequence[str] | sql.Composable | None,
    model: str | None,
    dtype: str | None,
    index: HNSW | None,
    chunks: Chunks | None,
    prefix: int | Literal[False] | None,
) -> Registration:
    """:func:`change_embedding`, and :func:`change_chunks` when ``chunks`` is given: the new registration is
    chunked with ``chunks``, else as the current one is (its chunks are carried over: re-made by the workers)."""
    require_primary(conn, "pgsim.change_embedding")
    old = require_registration(conn, table, column)
    refuse_during_a_change(conn, old)
    current = chunk_table(conn, old)
    now = Chunks(current.tokens, current.overlap) if current is not None else None
    wanted = chunks if chunks is not None else now
    shape = read_table(conn, old.table)
    expression = old.source if source is None else source_expression(conn, shape, source)
    new_model = model or old.model
    same_model = new_model == old.model and model_revision(new_model) == old.model_revision
    new_prefix = old.prefix if prefix is None else prefix or None
    if expression == old.source and same_model and (dtype or old.dtype) == old.dtype and wanted == now:
        if new_prefix != old.prefix:  # the vectors stay: only the index is built again
            return change_prefix(conn, old.table, old.column, new_prefix, index=index)
        chunked = f", chunked by {now.tokens}/{now.overlap} word pieces" if now else ""
        raise InvalidInput(
            f"{old.table}.{old.column} already holds embeddings of {expression} by {new_model!r} as {old.dtype}"
            f"{chunked}: nothing to change."
        )
    next_column = derived_name(old.column, suffix="next")
    if next_column in shape.columns:
        raise InvalidInput(
            f"Column {old.table}.{next_column} exists already (left by a cancelled change?); its vectors cannot be "
            "trusted to be the new definition's. Drop it, then change the embedding again."
        )
    with conn.transaction():
        locked = conn.execute(  # a prefix change swapping its index meanwhile waits, or is waited for
            "SELECT prefix FROM pgsim.embedding WHERE id OPERATOR(pg_catalog.=) %s::pg_catalog.int4 FOR UPDATE",
            [old.id],
        ).fetchone()
        if locked is None or locked[0] != old.prefix:
            raise InvalidInput(f"{old.table}.{old.column} changed meanwhile (its prefix); nothing changed.")
        new = add_embedding(
            conn,
            old.table,
            next_column,
            source=sql.SQL(expression),
            model=new_model,
            dtype=dtype or old.dtype,
            index=None,  # the old column serves searches meanwhile: one bulk build at the switch beats row inserts
            queue_existing=True,
            replaces=old.id,
            planned_index=index or old.index,
            stale=old.stale,
            chunks=wanted,  # the workers fill its chunks with its vectors
            prefix=new_prefix,  # prefix storage stays unless changed (the new model must be trained for it)
        )
        if expression != old.source:
            conn.execute("SELECT pgsim.freeze_embedding(%s)", [old.id])
    return new


def switch_over(conn: psycopg.Connection[Any], new: Registration) -> bool:
    """Complete a model change whose new column has no queued row and no dead letter: build its index (sized,
    without blocking writes where the connection allows), then in one transaction drop the old column, its
    index and triggers and give the new column and index the old names. False (and nothing changed) while
    rows are queued or failed, when the change was cancelled meanwhile, or when the table stays locked."""
    assert new.replaces is not None
    with conn.transaction():
        pin_search_path(conn)
        owns = conn.execute(
            "SELECT pg_catalog.pg_has_role(CURRENT_USER, relowner, 'USAGE') FROM pg_catalog.pg_class "
            "WHERE oid = %s::pg_catalog.oid",
            [new.table_oid],
        ).fetchone()
        old = registration_by_id(conn, new.replaces)
        pending = _pending(conn, new.id)
    if not (owns and owns[0]):  # a worker role: building the index and the switch are the table owner's
        log.info("%s.%s: the table's owner completes the model change (pgsim backfill %s %s)",
                 new.table, new.column, new.table, new.column)  # fmt: skip
        return False
    if old is None or old.table_oid != new.table_oid or pending:
        return False  # a change to replace another table's column is no model change: never switch it
    index = new.index or old.index
    staged_index = derived_name(new.table_name, new.column, suffix="hnsw") if index else None
    if index and staged_index and not _valid_index_exists(conn, new.schema, staged_index):
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(new.schema, staged_index)))
        create_hnsw_index(
            conn,
            new.table,
            new.column,
            staged_index,
            index,
            opclass=new.opclass,
            concurrently=conn.autocommit,
            prefix=new.prefix,
        )
    try:
        with conn.transaction():
            pin_search_path(conn)
            # Writers wait from here to the commit (readers only for the ALTERs): nothing can be queued meanwhile.
            # A worker that holds rows of this table keeps its batch; this switch gives up and comes back.
            conn.execute("SET LOCAL lock_timeout = '2s'")
            conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(new.table_sql))
            current = conn.execute(
                "SELECT replaces, column_name FROM pgsim.embedding WHERE id = %s::pg_catalog.int4 FOR UPDATE", [new.id]
            ).fetchone()
            if current != (old.id, new.column) or registration_by_id(conn, old.id) != old or _pending(conn, new.id):
                return False  # cancelled, switched by another worker, or rows arrived
            _switch(conn, old, new, index, staged_index)
    except psycopg.errors.LockNotAvailable:
        return False
    return True


def _switch(
    conn: psycopg.Connection[Any], old: Registration, new: Registration, index: HNSW | None, staged_index: str | None
) -> None:
    old_chunks = chunk_table(conn, old)  # its name goes to the new chunk table (it may not be the usual one)
    remove_registration(conn, old, drop_column=False)
    conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(new.table_sql, sql.Identifier(old.column)))
    conn.execute(
        sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(
            new.table_sql, sql.Identifier(new.column), sql.Identifier(old.column)
        )
    )
    chunks = chunk_table(conn, new)  # the old one went with the old registration: the new takes its name
    final = old_chunks.name if old_chunks is not None else chunk_table_name(new.table_name, old.column)
    if chunks is not None and relation_oid(conn, new.schema, final) is None:  # else it keeps the name it has
        conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(chunks.table_sql, sql.Identifier(final)))
        conn.execute(
            sql.SQL("ALTER INDEX IF EXISTS {} RENAME TO {}").format(
                sql.Identifier(new.schema, fitted_name(chunks.name, "hnsw")), sql.Identifier(fitted_name(final, "hnsw"))
            )
        )
    final_index = old.index_name or (derived_name(new.table_name, old.column, suffix="hnsw") if index else None)
    if staged_index and final_index:
        conn.execute(
            sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                sql.Identifier(new.schema, staged_index), sql.Identifier(final_index)
            )
        )
    updated = conn.execute(
        """
        UPDATE pgsim.embedding SET column_name = %s, replaces = NULL, created_column = %s, index_name = %s,
            index_m = %s, index_ef_construction = %s
        WHERE id = %s::pg_catalog.int4
        """,
        [
            old.column,
            old.created_column,
            final_index,
            index.m if index else None,
            index.ef_construction if index else None,
            new.id,
        ],  # fmt: skip
    )
    assert updated.rowcount == 1
    conn.execute(sql.SQL("ANALYZE {}").format(new.table_sql))


def _pending(conn: psycopg.Connection[Any], registration_id: int) -> bool:
    """Rows still queued or dead-lettered: switching now would drop their old embeddings for nothing."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pgsim.queue WHERE embedding_id OPERATOR(pg_catalog.=) %(id)s::pg_catalog.int4) "
        "OR EXISTS (SELECT 1 FROM pgsim.dead_letter WHERE embedding_id OPERATOR(pg_catalog.=) %(id)s::pg_catalog.int4)",
        {"id": registration_id},
    ).fetchone()
    return bool(row and row[0])


def _valid_index_exists(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    """An index of that name that is valid (a failed CONCURRENTLY build leaves an invalid one behind)."""
    with conn.transaction():
        pin_search_path(conn)
        row = conn.execute(
            "SELECT indisvalid FROM pg_catalog.pg_index WHERE indexrelid = pg_catalog.to_regclass(%s::pg_catalog.text)",
            [sql.Identifier(schema, name).as_string(conn)],
        ).fetchone()
    return bool(row and row[0])
