"""``op.remove_chunks``: a chunked embedding column's documents no longer kept as chunks
(:func:`pgsim.remove_chunks`); every row is queued, and the workers embed its whole text again. The reverse
chunks them again in the background (``op.change_embedding(..., chunks=pgsim.Chunks(tokens, overlap))``).

Like ``op.change_embedding``, it does what the database needs to end up without chunks: nothing when the
column has none; a change still filling into another definition is cancelled; a change into the same
definition with chunks is cancelled too. Online only: offline (``--sql``) it is refused, as the chunk table
and triggers are pgsim's Python code's.
"""

from __future__ import annotations

from alembic.operations import MigrateOperation, Operations

from pgsim.alembic.change_ops import ChangeEmbeddingOp, apply_change
from pgsim.alembic.ops import check_name, check_schema, offline
from pgsim.columns.chunking.settings import Chunks
from pgsim.errors import InvalidInput


@Operations.register_operation("remove_chunks")
class RemoveChunksOp(MigrateOperation):
    """Stop keeping the documents of a registered column as chunks (:func:`pgsim.remove_chunks`)."""

    def __init__(
        self,
        table_name: str,
        column_name: str,
        *,
        tokens: int | None = None,
        overlap: int = 0,
        schema: str | None = None,
        _reverse: MigrateOperation | None = None,
    ) -> None:
        self.table_name = check_name("table", table_name)
        self.column_name = check_name("column", column_name)
        self.schema = check_schema(schema)
        self.chunks = Chunks(tokens, overlap) if tokens is not None else None
        self._reverse = _reverse

    @classmethod
    def remove_chunks(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        *,
        tokens: int | None = None,
        overlap: int = 0,
        schema: str | None = None,
    ) -> None:
        """Drop the chunk table of the registered column ``table_name.column_name`` and its row in
        ``pgsim.chunking``, as :func:`pgsim.remove_chunks` does; the column's vectors and triggers stay (searches
        return rows by their own vector again). ``tokens`` and ``overlap`` say what to chunk again in the reverse
        (autogenerate's downgrade). Nothing when the column is not chunked. Online only (psycopg driver)."""
        operations.invoke(cls(table_name, column_name, tokens=tokens, overlap=overlap, schema=schema))

    def reverse(self) -> MigrateOperation:
        if self._reverse is not None:
            return self._reverse
        if self.chunks is None:
            raise InvalidInput("remove_chunks needs tokens= (and overlap=) to be reversed.")
        back = ChangeEmbeddingOp(
            self.table_name, self.column_name, schema=self.schema, chunks=self.chunks, _reverse=self
        )
        back.reverting = True
        return back

    def as_change(self) -> ChangeEmbeddingOp:
        return ChangeEmbeddingOp(self.table_name, self.column_name, schema=self.schema, chunks=False)


@Operations.implementation_for(RemoveChunksOp)
def _remove_chunks(operations: Operations, operation: RemoveChunksOp) -> None:
    from pgsim.alembic.embedding_ops import psycopg_connection

    if offline():
        raise InvalidInput(
            f"remove_chunks of {operation.table_name}.{operation.column_name} cannot be rendered as SQL (offline "
            "mode, --sql): the chunk table and triggers are pgsim's Python code's. Run this migration online, or "
            "run pgsim.remove_chunks(conn, table, column) yourself."
        )
    apply_change(psycopg_connection(operations, "remove_chunks"), operation.as_change())
