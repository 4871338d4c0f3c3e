"""Autogenerate for a registered column whose definition the models changed (its source, model, dtype, chunks
or prefix): ``op.change_embedding(...)`` with the models' definition, reversed by another ``op.change_embedding``
back to the registered one (a change of prefix alone names only the prefix: the index is built again, nothing
is re-embedded); chunks the models no longer declare (and nothing else changed) are
``op.remove_chunks(...)``, reversed by a change that chunks the documents again. A change under way (a
``<column>_next`` still filling) counts as the column's definition, so autogenerate run before the workers
have switched over renders nothing for it, and leaves its column and index alone.
"""

from __future__ import annotations

import logging
from typing import Any

from alembic.operations import MigrateOperation
from sqlalchemy import Table

from pgsim.alembic.change_ops import ChangeEmbeddingOp, ChunksArgument
from pgsim.alembic.chunk_ops import RemoveChunksOp
from pgsim.alembic.index_compare import Tables, index_params
from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.prefix_change import PrefixArgument
from pgsim.columns.registry import columns_expression

log = logging.getLogger(__name__)

ColumnKey = tuple[str | None, str, str]  # (schema, or None for the default one; table; column)
TableKey = tuple[str | None, str]


def embedding_spec(table: Table | None, column: str) -> Any:
    """The ``EmbeddingSpec`` the models declare on ``table.column`` (``embedding_column``), or None."""
    if table is None or column not in table.c:
        return None
    return table.c[column].info.get("pgsim")


def source_argument(source: str, columns: list[str]) -> str | list[str]:
    """The registry's source expression as create_embedding's ``source``: the column list, in the order the
    expression names them, when that is what it was made from (the registry lists them in the table's)."""
    from psycopg import sql

    ordered = sorted(columns, key=lambda name: source.find(sql.Identifier(name).as_string(None)))
    if ordered and source == columns_expression(ordered):
        return ordered
    return source


def row_chunks(row: Any) -> Chunks | None:
    """The chunk settings of a registration row (``chunk_tokens``/``chunk_overlap``), or None."""
    return Chunks(int(row.chunk_tokens), int(row.chunk_overlap)) if row.chunk_tokens is not None else None


def declared_source(spec: Any) -> str:
    """The source expression the registry would hold for ``spec``."""
    return spec.source if isinstance(spec.source, str) else columns_expression(list(spec.source))


def plan_changes(
    tables: Tables, registered: dict[ColumnKey, Any], pending: dict[int, Any], skip: set[TableKey]
) -> dict[ColumnKey, MigrateOperation | None]:
    """For each registered column the models keep (on a table in neither ``skip``): a change_embedding when
    the models' source, model, dtype or chunks differ from the registration's (or from the change under way's),
    a remove_chunks when only the declared chunks went;
    None when a change under way has the models' definition already: nothing to render, and its column,
    type and index are the workers' until they switch over."""
    planned: dict[ColumnKey, MigrateOperation | None] = {}
    for key, row in registered.items():
        schema, name, column = key
        spec = embedding_spec(tables.get((schema, name)), column)
        if (schema, name) in skip or spec is None:
            continue
        under_way = pending.get(row.id)
        current = under_way if under_way is not None else row
        wanted = (declared_source(spec), spec.model, spec.dtype)
        chunks, declared_chunks = row_chunks(current), getattr(spec, "chunks", None)
        prefix, declared_prefix = current.prefix, getattr(spec, "prefix", None)
        same = (current.source, current.model, current.dtype) == wanted
        if same and chunks == declared_chunks and prefix == declared_prefix:
            if under_way is not None:
                planned[key] = None
            continue
        log.info("Detected changed embedding %s.%s: source %s, model %s, dtype %s, %s, prefix %s -> %s, %s, %s, %s, "
                 "prefix %s", name, column, current.source, current.model, current.dtype, chunks, prefix, *wanted,
                 declared_chunks, declared_prefix)  # fmt: skip
        if same and declared_chunks is None and chunks is not None and prefix == declared_prefix:
            planned[key] = RemoveChunksOp(name, column, tokens=chunks.tokens, overlap=chunks.overlap, schema=schema)
        else:  # a change of the prefix alone builds the index again and re-embeds nothing
            only_prefix = same and chunks == declared_chunks
            planned[key] = _change(tables[(schema, name)], key, spec, current, only_prefix=only_prefix)
    return planned


def _change(table: Table, key: ColumnKey, spec: Any, current: Any, *, only_prefix: bool) -> ChangeEmbeddingOp:
    """The change into ``spec``, linked with its reverse (back to ``current``); the index is sized only when
    the models' differs from the registered one. ``only_prefix``: the ops name the prefix alone."""
    schema, name, column = key
    declared = _declared_index(table, column)
    registered_index = (current.index_m, current.index_ef_construction)
    resize = declared is not None and (declared.m, declared.ef_construction) != registered_index
    sized = declared is not None and resize
    forward: dict[str, Any] = {
        "model": spec.model, "schema": schema, "m": declared.m if sized else None,
        "ef_construction": declared.ef_construction if sized else None,
        "prefix": _prefix_argument(getattr(spec, "prefix", None), current.prefix),
    }  # fmt: skip
    back: dict[str, Any] = {
        "model": current.model, "schema": schema, "m": current.index_m if resize else None,
        "ef_construction": current.index_ef_construction if resize else None,
        "prefix": _prefix_argument(current.prefix, getattr(spec, "prefix", None)),
    }  # fmt: skip
    if not only_prefix:  # else the ops name the prefix alone (and the model, whose trained sizes offline checks)
        forward.update(
            source=list(spec.source) if not isinstance(spec.source, str) else spec.source,
            dtype=spec.dtype,
            chunks=_chunks_argument(getattr(spec, "chunks", None), row_chunks(current)),
        )
        back.update(source=source_argument(current.source, list(current.source_columns or [])), dtype=current.dtype,
                    chunks=_chunks_argument(row_chunks(current), getattr(spec, "chunks", None)))  # fmt: skip
    forward_op = ChangeEmbeddingOp(name, column, **forward)
    back_op = ChangeEmbeddingOp(name, column, _reverse=forward_op, **back)
    back_op.reverting = True
    forward_op._reverse = back_op
    return forward_op


def _chunks_argument(wanted: Chunks | None, other: Chunks | None) -> ChunksArgument:
    """change_embedding's ``chunks=`` to go from ``other`` to ``wanted``: None when they agree (as registered),
    False when the chunks go."""
    if wanted == other:
        return None
    return wanted if wanted is not None else False


def _prefix_argument(wanted: int | None, other: int | None) -> PrefixArgument:
    """change_embedding's ``prefix=`` to go from ``other`` to ``wanted``: None when they agree (as registered),
    False when the index is to hold the whole vectors."""
    if wanted == other:
        return None
    return wanted if wanted is not None else False


def _declared_index(table: Table, column: str) -> Any:
    """The parameters of the HNSW index the models put on ``column`` (the first by name), or None."""
    for index in sorted(table.indexes, key=lambda index: str(index.name)):
        params = index_params(index)
        if params is not None and params.column == column:
            return params
    return None


def pending_columns(pending: dict[int, Any], schema: str | None, name: str, default_schema: str | None) -> set[str]:
    """The columns of changes under way on ``schema.name``: the workers' until they switch over."""
    return {
        row.column_name
        for row in pending.values()
        if row.table_name == name and (row.table_schema if row.table_schema != default_schema else None) == schema
    }
