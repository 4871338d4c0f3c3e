"""``op.change_embedding``: a registered column re-embedded under another source, model, dtype, chunk or
prefix settings, without downtime (:func:`pgsim.change_embedding`): a column ``<column>_next`` filled by the workers
while searches keep the old one, then switched over atomically by the drain that fills it.

The operation says what the column should be made of; what it does depends on what the database holds
when it runs, so that an upgrade and its downgrade work whether or not the workers have switched over in
between:
- the registration already has that definition: nothing (and a change still filling is cancelled);
- a change into that definition is under way: nothing, the workers finish it;
- otherwise a change still filling is cancelled and a new one starts.
Online this runs :func:`pgsim.change_embedding` (the model is not loaded: its dimension and revision come
from its files); offline (``--sql``) the same steps are one DO block over pgsim's SQL functions, which
decides when the script runs. A change of chunks (``chunks=pgsim.Chunks(...)``, or ``chunks=False``: no
chunks) runs online only: offline it is refused, as chunking is made by pgsim's Python code.
``op.remove_chunks`` (:mod:`pgsim.alembic.chunk_ops`) is ``change_embedding(..., chunks=False)`` alone.
A change of ``prefix`` alone (prefix storage: how many of each vector's values the index holds) re-embeds
nothing: the index is built again and swapped in, online and offline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from alembic.operations import MigrateOperation, Operations
from psycopg import sql

from pgsim.alembic.change_sql import OFFLINE_CHANGE
from pgsim.alembic.ops import check_name, check_schema, offline, table_identifier
from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.prefix_change import PrefixArgument, checked_prefix_argument, staging_names
from pgsim.columns.registry import DTYPES
from pgsim.db.hnsw import DEFAULT_EF_CONSTRUCTION, HNSW
from pgsim.db.names import derived_name
from pgsim.errors import InvalidInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Definition:
    """What a registered column is made of: its source expression, model (name and revision), dtype, chunks
    and prefix (what its index holds)."""

    source: str
    model: str
    model_revision: str
    dtype: str
    chunks: Chunks | None = None
    prefix: int | None = None


ChunksArgument = Chunks | Literal[False] | None  # None: as registered; False: no chunks


def check_chunks(chunks: Any) -> ChunksArgument:
    if chunks is None or chunks is False or isinstance(chunks, Chunks):
        return chunks
    raise InvalidInput(f"chunks must be pgsim.Chunks(tokens=..., overlap=...) or False (no chunks); got {chunks!r}.")


@Operations.register_operation("change_embedding")
class ChangeEmbeddingOp(MigrateOperation):
    """Re-embed a registered column under another source, model or dtype (:func:`pgsim.change_embedding`)."""

    def __init__(
        self,
        table_name: str,
        column_name: str,
        *,
        source: str | list[str] | None = None,
        model: str | None = None,
        dtype: str | None = None,
        m: int | None = None,
        ef_construction: int | None = None,
        schema: str | None = None,
        chunks: ChunksArgument = None,
        prefix: PrefixArgument = None,
        _reverse: MigrateOperation | None = None,
    ) -> None:
        self.table_name = check_name("table", table_name)
        self.column_name = check_name("column", column_name)
        if dtype is not None and dtype not in DTYPES:
            raise InvalidInput(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
        if isinstance(source, (list, tuple)) and not (source and all(isinstance(name, str) for name in source)):
            raise InvalidInput(f"source must be a column, a list of columns or an SQL expression; got {source!r}.")
        self.source = list(source) if isinstance(source, (list, tuple)) else source
        self.model, self.dtype, self.m, self.ef_construction = model, dtype, m, ef_construction
        self.schema = check_schema(schema)
        self.chunks = check_chunks(chunks)
        self.prefix = checked_prefix_argument(prefix)
        self._reverse = _reverse
        self.reverting = False  # the downgrade of a generated change (its comment says so)

    @classmethod
    def change_embedding(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        *,
        source: str | list[str] | None = None,
        model: str | None = None,
        dtype: str | None = None,
        m: int | None = None,
        ef_construction: int | None = None,
        schema: str | None = None,
        chunks: ChunksArgument = None,
        prefix: PrefixArgument = None,
    ) -> None:
        """Re-embed the registered column ``table_name.column_name`` as the embedding of ``source`` (a column,
        a list of columns, or an SQL expression) by ``model`` as ``dtype``; each left out stays as registered,
        and ``m``/``ef_construction`` size the new column's HNSW index (default: the old one's); ``chunks``
        (:class:`pgsim.Chunks`) re-chunks the documents (``False``: no chunks; left out: as registered);
        ``prefix`` sets prefix storage (``False``: the index holds the whole vectors). As
        :func:`pgsim.change_embedding` does: a column ``<column>_next`` is registered and every row queued;
        searches keep the old column until pgsim's worker has filled the new one and switches over (drops
        the old column, gives the new one its name). A change of source stops the old column's triggers at
        once, so a column only the old source read can be dropped right after this operation.

        It does what the database needs to end up with that definition: nothing when the column has it
        already or a change into it is under way; a change into another definition still filling is
        cancelled first (the downgrade of a change the workers have not finished just cancels it). Going
        back after the switch is another re-embedding of every row. A change of ``prefix`` alone re-embeds
        nothing: the index is built again beside the old one and swapped in. The model is not loaded. Online it
        needs the psycopg driver; offline it renders a DO block that decides when the script runs."""
        operations.invoke(
            cls(table_name, column_name, source=source, model=model, dtype=dtype, m=m,
                ef_construction=ef_construction, schema=schema, chunks=chunks, prefix=prefix)
        )  # fmt: skip

    def reverse(self) -> MigrateOperation:
        if self._reverse is None:
            raise InvalidInput(
                "change_embedding is reversed by autogenerate only (which knows the previous definition); write "
                "the downgrade as another op.change_embedding."
            )
        return self._reverse

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table_name}" if self.schema else self.table_name

    @property
    def next_column(self) -> str:
        return derived_name(self.column_name, suffix="next")

    def index(self) -> HNSW | None:
        """The new column's index, if the operation sizes it (else the old column's is kept)."""
        return HNSW(self.m, self.ef_construction or DEFAULT_EF_CONSTRUCTION) if self.m is not None else None

    def offline_statement(self) -> sql.Composed:
        """The DO block that makes the same decisions and changes as :func:`apply_change`, in SQL."""
        from pgsim.columns.registry import checked_prefix, columns_expression
        from pgsim.encoding.models import model_dimension, model_revision

        if self.chunks is not None:
            raise InvalidInput(
                f"change_embedding of {self.qualified_table}.{self.column_name} with chunks= cannot be rendered as "
                "SQL (offline mode, --sql): chunking is done by pgsim's Python code. Run this migration online, "
                "or run pgsim.change_embedding(conn, ..., chunks=...) / pgsim.remove_chunks(...) yourself."
            )

        if isinstance(self.source, list):
            expression: str | None = columns_expression(self.source)
        elif isinstance(self.source, str) and self.source.isidentifier():
            expression = sql.Identifier(self.source).as_string(None)
        else:
            expression = self.source
        if self.prefix:  # the sizes the model was trained for: known here, from its files, not in SQL
            if not self.model:
                raise InvalidInput(
                    f"change_embedding of {self.qualified_table}.{self.column_name} with prefix={self.prefix} as SQL "
                    "(offline mode, --sql) needs model= (the column's model, whose trained prefix sizes it checks)."
                )
            checked_prefix(self.prefix, self.model, model_dimension(self.model), self.dtype or "vector")
        return sql.SQL(OFFLINE_CHANGE).format(
            table=sql.Literal(table_identifier(self.table_name, self.schema).as_string(None)),
            column=sql.Literal(self.column_name),
            next_column=sql.Literal(self.next_column),
            source=sql.Literal(expression),
            model=sql.Literal(self.model),
            revision=sql.Literal(model_revision(self.model) if self.model else None),
            dimension=sql.Literal(model_dimension(self.model) if self.model else None),
            dtype=sql.Literal(self.dtype),
            m=sql.Literal(self.m),
            ef_construction=sql.Literal(self.ef_construction or DEFAULT_EF_CONSTRUCTION if self.m else None),
            prefix_given=sql.Literal(self.prefix is not None),
            prefix=sql.Literal(self.prefix or None),
            staged_names=sql.Literal(staging_names(self.table_name, self.column_name)),
        )


def definition_of(conn: Any, registration: Any) -> Definition:
    from pgsim.columns.registry import chunk_table

    found = chunk_table(conn, registration)
    chunks = Chunks(found.tokens, found.overlap) if found is not None else None
    return Definition(
        registration.source,
        registration.model,
        registration.model_revision,
        registration.dtype,
        chunks,
        registration.prefix,
    )


def apply_change(conn: Any, operation: ChangeEmbeddingOp) -> None:
    """Bring the registration to ``operation``'s definition on a psycopg connection (see the module's text)."""
    from dataclasses import replace

    from pgsim.columns.adding import read_table, source_expression
    from pgsim.columns.chunking.tables import remove_chunks
    from pgsim.columns.model_change import change_embedding
    from pgsim.columns.prefix_change import change_prefix
    from pgsim.columns.registry import registration_by_id, remove_embedding, require_registration
    from pgsim.encoding.models import model_revision

    old = require_registration(conn, operation.qualified_table, operation.column_name)
    if old.replaces is not None:
        raise InvalidInput(f"{old.table}.{old.column} is the new column of a change still filling, not a column.")
    source = old.source
    if operation.source is not None:
        source = source_expression(conn, read_table(conn, old.table), operation.source)
    model = operation.model or old.model
    current = definition_of(conn, old)
    chunks = current.chunks if operation.chunks is None else operation.chunks or None
    prefix = current.prefix if operation.prefix is None else operation.prefix or None
    wanted = Definition(source, model, model_revision(model), operation.dtype or old.dtype, chunks, prefix)
    row = conn.execute(
        "SELECT id FROM pgsim.embedding WHERE replaces OPERATOR(pg_catalog.=) %s::pg_catalog.int4 "
        "AND table_oid OPERATOR(pg_catalog.=) %s::pg_catalog.oid",  # qualified: the rule in pgsim.db.catalog
        [old.id, old.table_oid],
    ).fetchone()
    pending = registration_by_id(conn, row[0]) if row else None
    if pending is not None and definition_of(conn, pending) == wanted:
        log.info("%s.%s: the change into %s is under way; the workers finish it", old.table, old.column,
                 pending.column)  # fmt: skip
        return
    if pending is not None:
        log.info("%s.%s: cancelling the change still filling %s", old.table, old.column, pending.column)
        remove_embedding(conn, old.table, pending.column)
    if current == wanted:
        log.info("%s.%s holds that definition already", old.table, old.column)
        return
    if replace(current, chunks=None) == wanted:  # only the chunks go: no vector changes
        remove_chunks(conn, old.table, old.column)
        return
    if replace(current, prefix=prefix) == wanted:  # only the prefix changes: the index is built again
        change_prefix(conn, old.table, old.column, prefix, index=operation.index())
        return
    new = change_embedding(conn, old.table, old.column, source=sql.SQL(source), model=model, dtype=wanted.dtype,
                           index=operation.index(), chunks=chunks, prefix=prefix or False)  # fmt: skip
    if chunks is None and current.chunks is not None:  # the change carried the chunks over: not wanted
        remove_chunks(conn, new.table, new.column)


@Operations.implementation_for(ChangeEmbeddingOp)
def _change_embedding(operations: Operations, operation: ChangeEmbeddingOp) -> None:
    from pgsim.alembic.embedding_ops import psycopg_connection

    if offline():
        operations.execute(operation.offline_statement().as_string(None))
        return
    apply_change(psycopg_connection(operations, "change_embedding"), operation)
