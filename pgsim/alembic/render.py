"""How pgsim's operations are written into a migration file: ``op.create_embedding(...)`` and the others, with
the imports they need; Alembic's own renderers for tables and columns gain the imports of pgsim's and
pgvector's column types, which Alembic names but does not import."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import renderers
from alembic.autogenerate.api import AutogenContext
from alembic.operations import ops as alembic_ops

from pgsim.alembic.change_ops import ChangeEmbeddingOp
from pgsim.alembic.chunk_ops import RemoveChunksOp
from pgsim.alembic.embedding_ops import CreateEmbeddingOp, DropEmbeddingOp
from pgsim.alembic.ops import CreateHnswIndexOp, DropHnswIndexOp, InstallPgsimOp, KeepPgsimOp, UninstallPgsimOp


def is_vector_type(column_type: Any) -> bool:
    return type(column_type).__module__.startswith(("pgsim.", "pgvector."))


def _with_type_imports(render: Any) -> Any:
    """Alembic's renderer for ``op.create_table`` / ``op.add_column`` / ``op.alter_column``, adding the import
    of each pgsim or pgvector column type it names (Alembic writes ``pgsim.sqlalchemy.types.Embedding(...)``
    but imports only SQLAlchemy's own modules)."""

    def render_with_imports(autogen_context: AutogenContext, op: Any) -> Any:
        if isinstance(op, alembic_ops.CreateTableOp):
            types = [getattr(column, "type", None) for column in op.columns]
        elif isinstance(op, alembic_ops.AlterColumnOp):
            types = [op.existing_type, op.modify_type]
        else:
            types = [op.column.type]
        for column_type in types:
            if is_vector_type(column_type):
                autogen_context.imports.add(f"import {type(column_type).__module__}")
        return render(autogen_context, op)

    return render_with_imports


class _Code(str):
    """An argument rendered as this code, not as its repr."""

    def __repr__(self) -> str:
        return str(self)


def _chunks(autogen_context: AutogenContext, chunks: Any) -> Any:
    """``chunks=`` as code: ``pgsim.Chunks(tokens, overlap)`` (with ``import pgsim``), False, or None."""
    if chunks is None or chunks is False:
        return chunks
    autogen_context.imports.add("import pgsim")
    return _Code(f"pgsim.Chunks({int(chunks.tokens)}, {int(chunks.overlap)})")


def _render(autogen_context: AutogenContext, name: str, *args: Any, **kwargs: Any) -> str:
    autogen_context.imports.add("import pgsim.alembic  # registers op.create_embedding, op.create_hnsw_index, ...")
    rendered = [repr(arg) for arg in args]
    rendered += [f"{key}={value!r}" for key, value in kwargs.items() if value is not None or key == "m"]
    return f"op.{name}({', '.join(rendered)})"


@renderers.dispatch_for(InstallPgsimOp)
def _render_install_pgsim(autogen_context: AutogenContext, op: InstallPgsimOp) -> str:
    return _render(autogen_context, "install_pgsim")


@renderers.dispatch_for(UninstallPgsimOp)
def _render_uninstall_pgsim(autogen_context: AutogenContext, op: UninstallPgsimOp) -> str:
    return _render(autogen_context, "uninstall_pgsim")


@renderers.dispatch_for(KeepPgsimOp)
def _render_keep_pgsim(autogen_context: AutogenContext, op: KeepPgsimOp) -> list[str]:
    return []  # a generated downgrade leaves pgsim installed: other applications may use it


@renderers.dispatch_for(ChangeEmbeddingOp)
def _render_change_embedding(autogen_context: AutogenContext, op: ChangeEmbeddingOp) -> list[str]:
    if op.prefix is not None and (op.source, op.dtype, op.chunks) == (None, None, None):  # the model: for its sizes
        held = f"the first {op.prefix} values of each vector" if op.prefix else "the whole vectors"
        comment = f"# the index of {op.table_name}.{op.column_name} is built again over {held}; nothing is re-embedded"
    elif op.reverting:
        comment = (
            f"# back to the previous definition: every row of {op.table_name} is embedded again (a change "
            "the workers have not finished is cancelled instead)"
        )
    else:
        comment = (
            f"# every row of {op.table_name} is embedded again, into {op.next_column}; searches use "
            f"{op.column_name} until pgsim's worker has filled it and switches over"
        )
    call = _render(
        autogen_context, "change_embedding", op.table_name, op.column_name, source=op.source, model=op.model,
        dtype=op.dtype, **({"m": op.m, "ef_construction": op.ef_construction} if op.m is not None else {}),
        schema=op.schema, chunks=_chunks(autogen_context, op.chunks), prefix=op.prefix,
    )  # fmt: skip
    return [comment, call]


@renderers.dispatch_for(RemoveChunksOp)
def _render_remove_chunks(autogen_context: AutogenContext, op: RemoveChunksOp) -> list[str]:
    comment = f"# the documents of {op.table_name}.{op.column_name} are no longer kept as chunks (re-embedded whole)"
    call = _render(
        autogen_context, "remove_chunks", op.table_name, op.column_name,
        tokens=op.chunks.tokens if op.chunks else None, overlap=op.chunks.overlap if op.chunks else None,
        schema=op.schema,
    )  # fmt: skip
    return [comment, call]


@renderers.dispatch_for(CreateEmbeddingOp)
def _render_create_embedding(autogen_context: AutogenContext, op: CreateEmbeddingOp) -> str:
    return _render(
        autogen_context, "create_embedding", op.table_name, op.column_name, source=op.source, model=op.model,
        dtype=op.dtype, m=op.index.m if op.index else None,
        ef_construction=op.index.ef_construction if op.index else None, schema=op.schema,
        chunks=_chunks(autogen_context, op.chunks), prefix=op.prefix,
    )  # fmt: skip


@renderers.dispatch_for(DropEmbeddingOp)
def _render_drop_embedding(autogen_context: AutogenContext, op: DropEmbeddingOp) -> str:
    return _render(
        autogen_context, "drop_embedding", op.table_name, op.column_name, source=op.source, model=op.model,
        dtype=op.dtype, m=op.m, ef_construction=op.ef_construction if op.m else None, schema=op.schema,
        drop_column=None if op.drop_column else False, chunks=_chunks(autogen_context, op.chunks),
        prefix=op.prefix,
    )  # fmt: skip


@renderers.dispatch_for(CreateHnswIndexOp)
def _render_create_hnsw_index(autogen_context: AutogenContext, op: CreateHnswIndexOp) -> str:
    return _render(
        autogen_context, "create_hnsw_index", op.index_name, op.table_name, op.column_name, m=op.hnsw.m,
        ef_construction=op.hnsw.ef_construction, ops=op.ops, schema=op.schema,
        concurrently=op.concurrently or None,
    )  # fmt: skip


@renderers.dispatch_for(DropHnswIndexOp)
def _render_drop_hnsw_index(autogen_context: AutogenContext, op: DropHnswIndexOp) -> str:
    return _render(
        autogen_context, "drop_hnsw_index", op.index_name, op.table_name, schema=op.schema,
        column_name=op.column_name, m=op.m, ef_construction=op.ef_construction, ops=op.ops,
        concurrently=op.concurrently or None,
    )  # fmt: skip


for _op in (alembic_ops.CreateTableOp, alembic_ops.AddColumnOp, alembic_ops.AlterColumnOp):
    renderers.dispatch_for(_op, replace=True)(_with_type_imports(renderers.dispatch(_op)))
