"""Autogenerate for pgsim: embedding columns and HNSW indexes as pgsim's operations.

Alembic's own comparison finds new and dropped columns and indexes; this comparator runs after it and
turns them into pgsim's operations, and adds what Alembic does not see:
- a new ``embedding_column`` becomes ``op.create_embedding(...)`` (column, registry row, triggers, index);
  on a new table it follows ``op.create_table``, which keeps the column;
- a dropped column that pgsim registered becomes ``op.drop_embedding(...)`` (a plain DROP COLUMN would be
  refused by its triggers), with what it needs to be reversed, followed by Alembic's ``op.drop_column``
  when the column was there before pgsim registered it (pgsim drops only the columns it added);
- a dropped table with registered columns is preceded by ``op.drop_embedding(..., drop_column=False)`` for
  each (the registry forgets them; the downgrade registers them again on the re-created table);
- an ``embedding_column(..., chunks=pgsim.Chunks(...))`` is created with ``chunks=``; a registered column whose
  declared chunks differ from ``pgsim.chunking``'s (or are added) becomes ``op.change_embedding(..., chunks=...)``,
  and one whose declaration drops them ``op.remove_chunks(...)``; pgsim's chunk tables (next to the document
  tables) are pgsim's: never dropped;
- a registered column whose source, model or dtype the models changed becomes ``op.change_embedding(...)``
  (:mod:`pgsim.alembic.changes`), re-embedded without downtime; its downgrade is a change back. Alembic's
  ALTER COLUMN TYPE for it goes (the switch-over changes the type). In a table, the changes and the
  ``op.drop_embedding`` ops come before Alembic's ``op.drop_column`` ops, so a column the old source read
  is dropped after the triggers that read it (and, in the downgrade, added back before the change back);
- a change under way (``<column>_next``, still filling) is the workers': autogenerate leaves its column and
  index alone and renders nothing while the models ask for what it is changing into;
- HNSW indexes become ``op.create_hnsw_index`` / ``op.drop_hnsw_index``; a change of ``m``,
  ``ef_construction`` or operator class, which Alembic does not compare, becomes a drop and a create;
- nothing in schema ``pgsim`` (pgsim's own tables and indexes, seen with ``include_schemas=True``) is
  touched; a database without pgsim gets ``op.install_pgsim()`` first when the migration needs pgvector's
  types or pgsim's operations, and the downgrade does not remove pgsim (other applications may use it);
- the generated file imports what it uses (``pgsim.alembic``, and the modules of pgsim's and pgvector's
  column types, which Alembic names but does not import).
Active after ``import pgsim.alembic`` (env.py, or the models' module), or with
``autogenerate_plugins=["alembic.autogenerate.*", "pgsim"]`` through the ``alembic.plugins`` entry point
(``pgsim.alembic_plugin``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from alembic.autogenerate import comparators
from alembic.autogenerate.api import AutogenContext
from alembic.operations import MigrateOperation
from alembic.operations import ops as alembic_ops
from alembic.util import DispatchPriority, PriorityDispatchResult
from sqlalchemy import Column, Index, Table, text

from pgsim.alembic.changes import (
    ColumnKey,
    TableKey,
    embedding_spec,
    pending_columns,
    plan_changes,
    row_chunks,
    source_argument,
)
from pgsim.alembic.embedding_ops import CreateEmbeddingOp, DropEmbeddingOp
from pgsim.alembic.index_compare import Tables, index_params, is_hnsw, rebuild_changed_indexes, table_ops
from pgsim.alembic.ops import CreateHnswIndexOp, DropHnswIndexOp, InstallPgsimOp
from pgsim.alembic.render import is_vector_type
from pgsim.db.names import derived_name

log = logging.getLogger(__name__)
DONE = "pgsim_compared"  # AutogenContext attribute: the comparator ran already (plugin and import both active)


def compare(autogen_context: AutogenContext, upgrade_ops: alembic_ops.UpgradeOps) -> PriorityDispatchResult:
    """The ``autogenerate`` comparator (after Alembic's own): rewrites and adds operations in place."""
    if getattr(autogen_context, DONE, False) or autogen_context.dialect.name != "postgresql":
        return PriorityDispatchResult.CONTINUE
    setattr(autogen_context, DONE, True)
    tables = _metadata_tables(autogen_context)
    registered, pending, chunk_tables = _registrations(autogen_context)
    new_tables = {(op.schema, op.table_name) for op in upgrade_ops.ops if isinstance(op, alembic_ops.CreateTableOp)}
    dropped_tables = {(op.schema, op.table_name) for op in upgrade_ops.ops if isinstance(op, alembic_ops.DropTableOp)}
    planned = plan_changes(tables, registered, pending, new_tables | dropped_tables)
    for schema, name, _ in [key for key, change in planned.items() if change is not None]:
        table_ops(upgrade_ops, name, schema)  # a table with nothing else to change gets its ModifyTableOps
    changes = _Changes(tables, registered, new_tables, dropped_tables, pending, planned,
                       autogen_context.dialect.default_schema_name, chunk_tables)  # fmt: skip
    upgrade_ops.ops[:] = [rewritten for op in upgrade_ops.ops for rewritten in _rewrite(op, changes)]
    rebuild_changed_indexes(autogen_context, upgrade_ops, tables, set(planned))  # a change sizes its own index
    if _needs_install(autogen_context, upgrade_ops):
        upgrade_ops.ops.insert(0, InstallPgsimOp())
    return PriorityDispatchResult.CONTINUE


def _metadata_tables(autogen_context: AutogenContext) -> dict[tuple[str | None, str], Table]:
    default_schema = autogen_context.dialect.default_schema_name
    return {
        (table.schema if table.schema != default_schema else None, table.name): table
        for table in autogen_context.sorted_tables
    }


def _registrations(autogen_context: AutogenContext) -> tuple[Registered, dict[int, Any], set[TableKey]]:
    """pgsim.embedding's rows by (schema or None for the default one, table, column), with their chunk settings
    (``chunk_tokens``, ``chunk_overlap``: NULL when not chunked); the changes under way by the id of the
    registration they replace; and the chunk tables. A registration's table is its OID's (a renamed table
    keeps its registrations)."""
    connection = autogen_context.connection
    if (
        connection is None
        or connection.execute(text("SELECT pg_catalog.to_regclass('pgsim.embedding'::pg_catalog.text)")).scalar()
        is None
    ):
        return {}, {}, set()
    default_schema = autogen_context.dialect.default_schema_name
    chunking = (
        connection.execute(text("SELECT pg_catalog.to_regclass('pgsim.chunking'::pg_catalog.text)")).scalar()
        is not None
    )
    rows = connection.execute(
        text(
            "SELECT e.id, e.replaces, n.nspname AS table_schema, c.relname AS table_name, e.column_name, e.source, "
            "e.source_columns, e.model, e.dtype, e.index_name, e.index_m, e.index_ef_construction, "
            "e.created_column, (pg_catalog.to_jsonb(e) OPERATOR(pg_catalog.->>) 'prefix')::pg_catalog.int4 AS prefix, "
            + (CHUNKED if chunking else UNCHUNKED)
        )
    ).all()
    registered = {
        (row.table_schema if row.table_schema != default_schema else None, row.table_name, row.column_name): row
        for row in rows
        if row.replaces is None
    }
    pending = {row.replaces: row for row in rows if row.replaces is not None}
    if not chunking:
        return registered, pending, set()
    chunk_tables = connection.execute(
        text(
            "SELECT n.nspname, c.relname FROM pgsim.chunking k JOIN pg_catalog.pg_class c "
            "ON c.oid OPERATOR(pg_catalog.=) k.chunk_table JOIN pg_catalog.pg_namespace n "
            "ON n.oid OPERATOR(pg_catalog.=) c.relnamespace"
        )
    ).all()
    return registered, pending, {(schema if schema != default_schema else None, name) for schema, name in chunk_tables}


_REGISTRATIONS = (
    "FROM pgsim.embedding e JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) e.table_oid "
    "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace"
)
CHUNKED = (
    "k.tokens AS chunk_tokens, k.overlap AS chunk_overlap " + _REGISTRATIONS + " LEFT JOIN pgsim.chunking k "
    "ON k.embedding_id OPERATOR(pg_catalog.=) e.id AND k.table_oid OPERATOR(pg_catalog.=) e.table_oid"
)
UNCHUNKED = "NULL::pg_catalog.int4 AS chunk_tokens, NULL::pg_catalog.int4 AS chunk_overlap " + _REGISTRATIONS
Registered = dict[ColumnKey, Any]


@dataclass
class _Changes:
    """What the rewrite knows of the whole comparison: ``planned`` holds the registered columns whose
    definition changes (a ChangeEmbeddingOp) or is being changed already (None)."""

    tables: Tables
    registered: Registered
    new_tables: set[TableKey]
    dropped_tables: set[TableKey]
    pending: dict[int, Any] = field(default_factory=dict)
    planned: dict[ColumnKey, MigrateOperation | None] = field(default_factory=dict)
    default_schema: str | None = None
    chunk_tables: set[TableKey] = field(default_factory=set)  # pgsim's, next to the document tables

    def registered_on(self, schema: str | None, table_name: str) -> list[Any]:
        return [row for key, row in self.registered.items() if key[:2] == (schema, table_name)]


def _rewrite(op: Any, changes: _Changes) -> list[Any]:
    """``op`` as pgsim's operations (a list: a new table is followed by its embeddings)."""
    if getattr(op, "schema", None) == "pgsim":
        return []  # pgsim's own tables and indexes, seen with include_schemas=True
    if (getattr(op, "schema", None), getattr(op, "table_name", None)) in changes.chunk_tables:
        return []  # a chunk table (and its index): pgsim's, not in the models
    if isinstance(op, alembic_ops.CreateTableOp):
        table = changes.tables.get((op.schema, op.table_name))
        embeddings = [
            _create_embedding(op.table_name, column.name, column.info["pgsim"], op.schema, table)
            for column in op.columns
            if isinstance(column, Column) and "pgsim" in column.info
        ]
        return [op, *embeddings]
    if isinstance(op, alembic_ops.DropTableOp):
        # the registry forgets the table's columns first (the downgrade registers them on the re-created table)
        rows = changes.registered_on(op.schema, op.table_name)
        return [*(_drop_embedding(row, op.schema, drop_column=False) for row in rows), op]
    if isinstance(op, alembic_ops.CreateIndexOp):
        return [_create_hnsw(op, changes.tables, set(), changes.new_tables)]
    if isinstance(op, alembic_ops.ModifyTableOps):
        op.ops[:] = _rewrite_table_ops(op, changes)
        return [op] if op.ops else []
    return [op]


def _rewrite_table_ops(modify: alembic_ops.ModifyTableOps, changes: _Changes) -> list[Any]:
    schema, name = modify.schema, modify.table_name
    table, registered = changes.tables.get((schema, name)), changes.registered
    new_embeddings = {
        op.column.name for op in modify.ops if isinstance(op, alembic_ops.AddColumnOp) and "pgsim" in op.column.info
    }
    dropped_embeddings = {
        op.column_name
        for op in modify.ops
        if isinstance(op, alembic_ops.DropColumnOp) and (schema, name, op.column_name) in registered
    }
    changed = {column for (s, n, column) in changes.planned if (s, n) == (schema, name)}
    workers = pending_columns(changes.pending, schema, name, changes.default_schema)  # changes under way
    covered_indexes = {  # dropped with the registrations of a dropped table; a bit or prefix embedding's own
        # (over an expression the models do not declare: create_embedding built it, drop_embedding drops it)
        row.index_name
        for row in changes.registered_on(schema, name)
        if (schema, name) in changes.dropped_tables or row.dtype == "bit" or row.prefix is not None
    }
    # the index of a column whose change is planned: the change builds (a prefix change: swaps) its own
    changed_indexes = {row.index_name for row in changes.registered_on(schema, name) if row.column_name in changed}
    # before any drop_column: a column the old source read loses the triggers that read it first
    first: list[Any] = [
        change for (s, n, _), change in changes.planned.items() if (s, n) == (schema, name) and change is not None
    ]
    result: list[Any] = []
    for op in modify.ops:
        if isinstance(op, alembic_ops.AddColumnOp) and op.column.name in new_embeddings:
            result.append(_create_embedding(name, op.column.name, op.column.info["pgsim"], schema, table))
        elif isinstance(op, alembic_ops.DropColumnOp) and op.column_name in dropped_embeddings:
            row = registered[(schema, name, op.column_name)]
            # unregistering drops the column only when pgsim added it; Alembic's drop_column drops the others
            first.append(_drop_embedding(row, schema))
            result.append(None if row.created_column else op)
        elif isinstance(op, alembic_ops.DropColumnOp) and op.column_name in workers:
            result.append(None)  # the new column of a change under way
        elif isinstance(op, alembic_ops.AlterColumnOp) and op.column_name in changed and op.modify_type is not None:
            op.modify_type = None  # the switch-over gives the column its new type
            result.append(op if op.has_changes() else None)
        elif isinstance(op, alembic_ops.CreateIndexOp) and op.index_name in changed_indexes:
            result.append(None)
        elif isinstance(op, alembic_ops.CreateIndexOp):
            result.append(_create_hnsw(op, changes.tables, new_embeddings, changes.new_tables))
        elif isinstance(op, alembic_ops.DropIndexOp):
            dropped = dropped_embeddings | workers  # drop_embedding drops theirs; a switch renames its own
            skip = op.index_name in covered_indexes | changed_indexes
            result.append(None if skip else _drop_hnsw(op, dropped))
        else:
            result.append(op)
    kept = [op for op in result if op is not None]
    drops = [i for i, op in enumerate(kept) if isinstance(op, alembic_ops.DropColumnOp)]
    at = drops[0] if drops else len(kept)
    return kept[:at] + first + kept[at:]


def _default_index(table: Table | None, column: str) -> Index | None:
    """The HNSW index the models put on ``column`` under create_embedding's own name, if any."""
    if table is None:
        return None
    name = derived_name(table.name, column, suffix="hnsw")
    return next((index for index in table.indexes if index.name == name and is_hnsw(index)), None)


def _create_embedding(table_name: str, column: str, spec: Any, schema: str | None, table: Table | None) -> Any:
    """create_embedding for an ``embedding_column``; it builds the index under the default name itself."""
    index = _default_index(table, column)
    params = index_params(index) if index is not None else None
    if spec.indexes_an_expression:  # bit or prefix: its index is over an expression the models do not declare
        params = spec.index
    source = spec.source if isinstance(spec.source, str) else list(spec.source)
    return CreateEmbeddingOp(
        table_name,
        column,
        source=source,
        model=spec.model,
        dtype=spec.dtype,
        m=params.m if params else None,
        ef_construction=params.ef_construction if params else 64,
        schema=schema,
        chunks=spec.chunks,
        prefix=spec.prefix,
    )


def _create_hnsw(
    op: alembic_ops.CreateIndexOp, tables: Tables, new_embeddings: set[str], new_tables: set[tuple[str | None, str]]
) -> Any:
    index = op.to_index()
    params = index_params(index)
    if params is None:
        return op
    table = tables.get((op.schema, op.table_name))
    spec = embedding_spec(table, params.column)
    default = _default_index(table, params.column)
    new = params.column in new_embeddings or (op.schema, op.table_name) in new_tables
    if new and spec is not None and default is not None and default.name == op.index_name:
        return None  # create_embedding builds it
    return CreateHnswIndexOp(
        str(op.index_name), op.table_name, params.column, m=params.m, ef_construction=params.ef_construction,
        ops=params.ops, schema=op.schema,
    )  # fmt: skip


def _drop_hnsw(op: alembic_ops.DropIndexOp, dropped_embeddings: set[str]) -> Any:
    index = op.to_index()
    params = index_params(index)
    if params is None:
        return op
    if params.column in dropped_embeddings:
        return None  # drop_embedding drops it
    return DropHnswIndexOp(
        str(op.index_name), op.table_name, schema=op.schema, column_name=params.column, m=params.m,
        ef_construction=params.ef_construction, ops=params.ops,
    )  # fmt: skip


def _drop_embedding(row: Any, schema: str | None, *, drop_column: bool = True) -> DropEmbeddingOp:
    return DropEmbeddingOp(
        row.table_name, row.column_name, schema=schema,
        source=source_argument(row.source, list(row.source_columns or [])), model=row.model, dtype=row.dtype,
        m=row.index_m if row.index_name is not None else None, ef_construction=row.index_ef_construction or 64,
        drop_column=drop_column, chunks=row_chunks(row), prefix=row.prefix,
    )  # fmt: skip


def _needs_install(autogen_context: AutogenContext, upgrade_ops: alembic_ops.UpgradeOps) -> bool:
    """Whether the migration uses pgvector's types or pgsim's operations on a database without pgsim."""
    connection = autogen_context.connection
    if (
        connection is None
        or connection.execute(text("SELECT pg_catalog.to_regclass('pgsim.migration'::pg_catalog.text)")).scalar()
        is not None
    ):
        return False
    for op in _all_ops(upgrade_ops.ops):
        if isinstance(op, (CreateEmbeddingOp, CreateHnswIndexOp)):
            return True
        columns = op.columns if isinstance(op, alembic_ops.CreateTableOp) else [getattr(op, "column", None)]
        if any(is_vector_type(getattr(column, "type", None)) for column in columns):
            return True
    return False


def _all_ops(ops: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for op in ops:
        flat.extend(_all_ops(op.ops) if isinstance(op, alembic_ops.ModifyTableOps) else [op])
    return flat


comparators.dispatch_for("autogenerate", priority=DispatchPriority.LAST)(compare)
