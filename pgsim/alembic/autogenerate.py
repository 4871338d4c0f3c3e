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
- a registered column whose type the models changed (dtype, or the dimension of another model) is removed
  and registered again: ``op.drop_embedding``, ``op.create_embedding`` (ALTER COLUMN TYPE would be refused
  by its triggers, and the registry would keep the old type);
- HNSW indexes become ``op.create_hnsw_index`` / ``op.drop_hnsw_index``; a change of ``m``,
  ``ef_construction`` or operator class, which Alembic does not compare, becomes a drop and a create;
- nothing in schema ``pgsim`` (pgsim's own tables and indexes, seen with ``include_schemas=True``) is
  touched; a database without pgsim gets ``op.install_pgsim()`` first when the migration needs pgvector's
  types or pgsim's operations;
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
from alembic.operations import ops as alembic_ops
from alembic.util import DispatchPriority, PriorityDispatchResult
from sqlalchemy import Column, Index, Table, text

from pgsim.alembic.embedding_ops import CreateEmbeddingOp, DropEmbeddingOp
from pgsim.alembic.index_compare import Tables, index_params, is_hnsw, rebuild_changed_indexes
from pgsim.alembic.ops import CreateHnswIndexOp, DropHnswIndexOp, InstallPgsimOp
from pgsim.alembic.render import is_vector_type
from pgsim.columns.registry import columns_expression
from pgsim.db.names import derived_name

log = logging.getLogger(__name__)
DONE = "pgsim_compared"  # AutogenContext attribute: the comparator ran already (plugin and import both active)


def compare(autogen_context: AutogenContext, upgrade_ops: alembic_ops.UpgradeOps) -> PriorityDispatchResult:
    """The ``autogenerate`` comparator (after Alembic's own): rewrites and adds operations in place."""
    if getattr(autogen_context, DONE, False) or autogen_context.dialect.name != "postgresql":
        return PriorityDispatchResult.CONTINUE
    setattr(autogen_context, DONE, True)
    tables = _metadata_tables(autogen_context)
    registered = _registrations(autogen_context)
    new_tables = {(op.schema, op.table_name) for op in upgrade_ops.ops if isinstance(op, alembic_ops.CreateTableOp)}
    dropped_tables = {(op.schema, op.table_name) for op in upgrade_ops.ops if isinstance(op, alembic_ops.DropTableOp)}
    changes = _Changes(tables, registered, new_tables, dropped_tables)
    upgrade_ops.ops[:] = [rewritten for op in upgrade_ops.ops for rewritten in _rewrite(op, changes)]
    rebuild_changed_indexes(autogen_context, upgrade_ops, tables, changes.recreated)
    _warn_about_changed_embeddings(tables, registered, changes.recreated)
    if _needs_install(autogen_context, upgrade_ops):
        upgrade_ops.ops.insert(0, InstallPgsimOp())
    return PriorityDispatchResult.CONTINUE


def _metadata_tables(autogen_context: AutogenContext) -> dict[tuple[str | None, str], Table]:
    default_schema = autogen_context.dialect.default_schema_name
    return {
        (table.schema if table.schema != default_schema else None, table.name): table
        for table in autogen_context.sorted_tables
    }


def _registrations(autogen_context: AutogenContext) -> dict[tuple[str | None, str, str], Any]:
    """pgsim.embedding's rows by (schema or None for the default one, table, column)."""
    connection = autogen_context.connection
    if connection is None or connection.execute(text("SELECT to_regclass('pgsim.embedding')")).scalar() is None:
        return {}
    default_schema = autogen_context.dialect.default_schema_name
    rows = connection.execute(
        text(
            "SELECT table_schema, table_name, column_name, source, source_columns, model, dtype, index_name, "
            "index_m, index_ef_construction, created_column FROM pgsim.embedding WHERE replaces IS NULL"
        )
    ).all()
    return {(row[0] if row[0] != default_schema else None, row[1], row[2]): row for row in rows}


def _embedding_spec(table: Table | None, column: str) -> Any:
    if table is None or column not in table.c:
        return None
    return table.c[column].info.get("pgsim")


Registered = dict[tuple[str | None, str, str], Any]
TableKey = tuple[str | None, str]


@dataclass
class _Changes:
    """What the rewrite knows of the whole comparison; ``recreated`` collects the registered columns it
    removes and registers again (their index rebuilds and warnings are left out)."""

    tables: Tables
    registered: Registered
    new_tables: set[TableKey]
    dropped_tables: set[TableKey]
    recreated: set[tuple[str | None, str, str]] = field(default_factory=set)

    def registered_on(self, schema: str | None, table_name: str) -> list[Any]:
        return [row for key, row in self.registered.items() if key[:2] == (schema, table_name)]


def _rewrite(op: Any, changes: _Changes) -> list[Any]:
    """``op`` as pgsim's operations (a list: a new table is followed by its embeddings)."""
    if getattr(op, "schema", None) == "pgsim":
        return []  # pgsim's own tables and indexes, seen with include_schemas=True
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
    retyped = {
        op.column_name
        for op in modify.ops
        if isinstance(op, alembic_ops.AlterColumnOp)
        and op.modify_type is not None
        and (schema, name, op.column_name) in registered
        and _embedding_spec(table, op.column_name) is not None
    }
    changes.recreated.update((schema, name, column) for column in retyped)
    covered_indexes = {  # dropped with the registrations of a dropped table
        row.index_name for row in changes.registered_on(schema, name) if (schema, name) in changes.dropped_tables
    }
    result: list[Any] = []
    for op in modify.ops:
        if isinstance(op, alembic_ops.AddColumnOp) and op.column.name in new_embeddings:
            result.append(_create_embedding(name, op.column.name, op.column.info["pgsim"], schema, table))
        elif isinstance(op, alembic_ops.DropColumnOp) and op.column_name in dropped_embeddings:
            row = registered[(schema, name, op.column_name)]
            # unregistering drops the column only when pgsim added it; Alembic's drop_column drops the others
            result.extend([_drop_embedding(row, schema), None if row.created_column else op])
        elif isinstance(op, alembic_ops.AlterColumnOp) and op.column_name in retyped:
            result.extend(_recreate_embedding(op, registered[(schema, name, op.column_name)], table))
        elif isinstance(op, alembic_ops.CreateIndexOp):
            result.append(_create_hnsw(op, changes.tables, new_embeddings | retyped, changes.new_tables))
        elif isinstance(op, alembic_ops.DropIndexOp):
            result.append(None if op.index_name in covered_indexes else _drop_hnsw(op, dropped_embeddings | retyped))
        else:
            result.append(op)
    return [op for op in result if op is not None]


def _recreate_embedding(op: alembic_ops.AlterColumnOp, row: Any, table: Table | None) -> list[Any]:
    """A registered column of another type: removed and registered again, its rows queued to be embedded.
    A column pgsim did not add is dropped in between (unregistering keeps it); the downgrade adds it back
    with its old type (the reverse of that drop_column) before registering it again."""
    log.info("%s.%s changes type (%s -> %s): removing and registering it again", op.table_name, op.column_name,
             op.existing_type, op.modify_type)  # fmt: skip
    assert table is not None
    result: list[Any] = [_drop_embedding(row, op.schema)]
    if not row.created_column:
        old = Column(op.column_name, op.existing_type, nullable=op.existing_nullable is not False)
        result.append(
            alembic_ops.DropColumnOp(
                op.table_name, op.column_name, schema=op.schema,
                _reverse=alembic_ops.AddColumnOp(op.table_name, old, schema=op.schema),
            )
        )  # fmt: skip
    result.append(_create_embedding(op.table_name, op.column_name, table.c[op.column_name].info["pgsim"], op.schema,
                                    table))  # fmt: skip
    return result


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
    )


def _create_hnsw(
    op: alembic_ops.CreateIndexOp, tables: Tables, new_embeddings: set[str], new_tables: set[tuple[str | None, str]]
) -> Any:
    index = op.to_index()
    params = index_params(index)
    if params is None:
        return op
    table = tables.get((op.schema, op.table_name))
    spec = _embedding_spec(table, params.column)
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
        source=_source_argument(row.source, list(row.source_columns or [])), model=row.model, dtype=row.dtype,
        m=row.index_m if row.index_name is not None else None, ef_construction=row.index_ef_construction or 64,
        drop_column=drop_column,
    )  # fmt: skip


def _source_argument(source: str, columns: list[str]) -> str | list[str]:
    """The registry's source expression as create_embedding's ``source``: the column list when that is what
    it was made from."""
    if columns and source == columns_expression(columns):
        return columns
    return source


def _needs_install(autogen_context: AutogenContext, upgrade_ops: alembic_ops.UpgradeOps) -> bool:
    """Whether the migration uses pgvector's types or pgsim's operations on a database without pgsim."""
    connection = autogen_context.connection
    if connection is None or connection.execute(text("SELECT to_regclass('pgsim.migration')")).scalar() is not None:
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


def _warn_about_changed_embeddings(
    tables: Tables, registered: Registered, recreated: set[tuple[str | None, str, str]]
) -> None:
    """A registered column whose model or source the models changed (keeping its type: the others are
    registered again) needs re-embedding, which is no schema change: say how, render nothing."""
    for (schema, name), table in tables.items():
        for column in table.columns:
            spec = column.info.get("pgsim")
            row = registered.get((schema, name, column.name))
            if spec is None or row is None or (schema, name, column.name) in recreated:
                continue
            source = spec.source if isinstance(spec.source, str) else columns_expression(list(spec.source))
            if row[5] != spec.model or row[3] != source:
                log.warning(
                    "%s.%s is registered with model %s and source %s, the models say %s and %s: autogenerate "
                    "renders no change for that; run `pgsim change-model` (or remove and re-add the embedding).",
                    name, column.name, row[5], row[3], spec.model, source,
                )  # fmt: skip


comparators.dispatch_for("autogenerate", priority=DispatchPriority.LAST)(compare)
