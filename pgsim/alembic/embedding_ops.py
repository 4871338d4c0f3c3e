"""``op.create_embedding`` and ``op.drop_embedding``: a registered embedding column in a migration (the
column, its registry row and triggers, its index, and with ``chunks`` its chunk table), online through
pgsim's own functions, offline as SQL (a chunked one online only).
"""

from __future__ import annotations

from typing import Any

from alembic.operations import MigrateOperation, Operations
from psycopg import sql

from pgsim.alembic.ops import CreateHnswIndexOp, check_name, check_schema, offline, table_identifier
from pgsim.columns.chunking.settings import Chunks, checked_chunks
from pgsim.db.hnsw import DEFAULT_EF_CONSTRUCTION, HNSW
from pgsim.db.names import derived_name
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.errors import InvalidInput


@Operations.register_operation("create_embedding")
class CreateEmbeddingOp(MigrateOperation):
    """Add an embedding column kept in sync: column, registry row, triggers, HNSW index
    (:func:`pgsim.add_embedding`)."""

    def __init__(
        self,
        table_name: str,
        column_name: str,
        *,
        source: str | list[str],
        model: str = DEFAULT_MODEL,
        dtype: str = "vector",
        m: int | None = 16,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        schema: str | None = None,
        chunks: Chunks | None = None,
        prefix: int | None = None,
    ) -> None:
        self.table_name = check_name("table", table_name)
        self.column_name = check_name("column", column_name)
        self.source, self.model, self.dtype, self.schema = source, model, dtype, check_schema(schema)
        self.index = HNSW(m, ef_construction) if m is not None else None
        self.chunks = checked_chunks(chunks)
        self.prefix = prefix

    @classmethod
    def create_embedding(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        *,
        source: str | list[str],
        model: str = DEFAULT_MODEL,
        dtype: str = "vector",
        m: int | None = 16,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        schema: str | None = None,
        chunks: Chunks | None = None,
        prefix: int | None = None,
    ) -> None:
        """Register ``table_name.column_name`` as the embedding of ``source`` (a column, a list of columns, or
        an SQL expression over the table) by ``model``, as :func:`pgsim.add_embedding` does: the column
        (``dtype`` of the model's dimension, added unless it exists with that type), the registry row, the
        triggers that queue rows for the workers, and an HNSW index (``m``, ``ef_construction``; ``m=None``:
        no index), and with ``chunks`` (:class:`pgsim.Chunks`) the chunk table the documents are kept in as
        chunks; ``prefix`` (prefix storage, for a Matryoshka-trained model): the index holds each vector's
        first ``prefix`` values. The existing rows are queued. The model is not loaded: its dimension and revision come
        from its files. Online it needs the psycopg driver; offline it renders
        ``SELECT pgsim.register_embedding(...)`` and the ``CREATE INDEX`` (a chunked column is refused offline:
        its chunk table is made by pgsim's Python code)."""
        operations.invoke(
            cls(table_name, column_name, source=source, model=model, dtype=dtype, m=m,
                ef_construction=ef_construction, schema=schema, chunks=chunks, prefix=prefix)
        )  # fmt: skip

    def reverse(self) -> MigrateOperation:
        return DropEmbeddingOp(
            self.table_name, self.column_name, schema=self.schema, source=self.source, model=self.model,
            dtype=self.dtype, m=self.index.m if self.index else None,
            ef_construction=self.index.ef_construction if self.index else 64, chunks=self.chunks, prefix=self.prefix,
        )  # fmt: skip

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table_name}" if self.schema else self.table_name

    def offline_statements(self) -> list[sql.Composed]:
        """The SQL that registers the column without asking the database anything beforehand:
        pgsim.register_embedding (with the model's dimension and revision read here), then the index."""
        from pgsim.columns.registry import checked_prefix, columns_expression
        from pgsim.encoding.models import model_dimension, model_revision

        if self.chunks is not None:
            raise InvalidInput(
                f"create_embedding of {self.qualified_table}.{self.column_name} with chunks= cannot be rendered as "
                "SQL (offline mode, --sql): its chunk table is made by pgsim's Python code. Run this migration "
                "online, or create the column without chunks= offline and chunk it online later "
                "(op.change_embedding(..., chunks=...))."
            )
        if isinstance(self.source, str):
            expression = sql.Identifier(self.source).as_string(None) if self.source.isidentifier() else self.source
            columns = [self.source] if self.source.isidentifier() else None
        else:
            expression, columns = columns_expression(self.source), list(self.source)
        index_name = derived_name(self.table_name, self.column_name, suffix="hnsw") if self.index else None
        dimension = model_dimension(self.model)
        prefix = checked_prefix(self.prefix, self.model, dimension, self.dtype)
        if prefix is not None and self.chunks is not None:
            raise InvalidInput("prefix storage does not take chunks yet: chunk a vector or halfvec column.")
        register = sql.SQL(
            "SELECT pgsim.register_embedding(target => {table}::regclass, column_name => {column}, source => {source}, "
            "model => {model}, model_revision => {revision}, dimension => {dimension}, dtype => {dtype}, "
            "index_name => {index_name}, index_m => {m}, index_ef_construction => {ef_construction}, "
            "source_columns => {columns}::name[], queue_existing => true, prefix => {prefix})"
        ).format(
            table=sql.Literal(table_identifier(self.table_name, self.schema).as_string(None)),
            column=sql.Literal(self.column_name),
            source=sql.Literal(expression),
            model=sql.Literal(self.model),
            revision=sql.Literal(model_revision(self.model)),
            dimension=sql.Literal(dimension),
            dtype=sql.Literal(self.dtype),
            prefix=sql.Literal(prefix),
            index_name=sql.Literal(index_name),
            m=sql.Literal(self.index.m if self.index else None),
            ef_construction=sql.Literal(self.index.ef_construction if self.index else None),
            columns=sql.Literal(columns),
        )
        if self.index is None or index_name is None:
            return [register]
        if self.dtype == "bit":  # binary-quantised storage: the index is over an expression (pgsim.bit_index)
            bits = sql.SQL("CREATE INDEX {} ON {} USING hnsw ((binary_quantize({})::bit({})) bit_hamming_ops) "
                           "WITH (m = {}, ef_construction = {})").format(  # fmt: skip
                sql.Identifier(index_name), table_identifier(self.table_name, self.schema),
                sql.Identifier(self.column_name), sql.Literal(model_dimension(self.model)),
                sql.Literal(self.index.m), sql.Literal(self.index.ef_construction),
            )  # fmt: skip
            return [register, bits]
        if prefix is not None:  # prefix storage: the index is over the vectors' prefix (pgsim.prefix_index)
            head = sql.SQL("CREATE INDEX {} ON {} USING hnsw ((subvector({}, 1, {})::vector({})) vector_cosine_ops) "
                           "WITH (m = {}, ef_construction = {})").format(  # fmt: skip
                sql.Identifier(index_name), table_identifier(self.table_name, self.schema),
                sql.Identifier(self.column_name), sql.Literal(prefix), sql.Literal(prefix),
                sql.Literal(self.index.m), sql.Literal(self.index.ef_construction),
            )  # fmt: skip
            return [register, head]
        build = CreateHnswIndexOp(
            index_name, self.table_name, self.column_name, m=self.index.m,
            ef_construction=self.index.ef_construction, ops=f"{self.dtype}_cosine_ops", schema=self.schema,
        )  # fmt: skip
        return [register, build.statement()]


@Operations.register_operation("drop_embedding")
class DropEmbeddingOp(MigrateOperation):
    """Undo :class:`CreateEmbeddingOp` (:func:`pgsim.remove_embedding`): triggers, queue, index, and the
    column if pgsim added it (``drop_column=False`` keeps it: the table is dropped next, say)."""

    def __init__(
        self,
        table_name: str,
        column_name: str,
        *,
        schema: str | None = None,
        source: str | list[str] | None = None,
        model: str = DEFAULT_MODEL,
        dtype: str = "vector",
        m: int | None = 16,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        drop_column: bool = True,
        chunks: Chunks | None = None,
        prefix: int | None = None,
    ) -> None:
        self.table_name = check_name("table", table_name)
        self.column_name = check_name("column", column_name)
        self.schema, self.source, self.model, self.dtype = check_schema(schema), source, model, dtype
        self.m, self.ef_construction, self.drop_column = m, ef_construction, drop_column
        self.chunks = checked_chunks(chunks)
        self.prefix = prefix

    @classmethod
    def drop_embedding(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        *,
        schema: str | None = None,
        source: str | list[str] | None = None,
        model: str = DEFAULT_MODEL,
        dtype: str = "vector",
        m: int | None = 16,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        drop_column: bool = True,
        chunks: Chunks | None = None,
        prefix: int | None = None,
    ) -> None:
        """Remove the registration of ``table_name.column_name``, as :func:`pgsim.remove_embedding` does: its
        triggers, queue entries, dead letters, registry row, HNSW index and chunk table, a change of it still filling,
        and the column if pgsim added it (``drop_column=False`` keeps it). A view that depends on the column
        stops it with an error, and nothing is removed. ``source``, ``model``, ``dtype``, ``m``,
        ``ef_construction``, ``chunks`` and ``prefix`` say what to register again in the reverse (autogenerate's
        downgrade). Online it needs the psycopg driver; offline it renders ``SELECT pgsim.remove_embedding(...)``."""
        operations.invoke(
            cls(table_name, column_name, schema=schema, source=source, model=model, dtype=dtype, m=m,
                ef_construction=ef_construction, drop_column=drop_column, chunks=chunks, prefix=prefix)
        )  # fmt: skip

    def offline_statements(self) -> list[sql.Composed]:
        """The chunk tables of the registration (and of a change of it still filling) dropped, as
        :func:`pgsim.remove_embedding` drops them; then ``pgsim.remove_embedding``."""
        table = sql.Literal(table_identifier(self.table_name, self.schema).as_string(None))
        column = sql.Literal(self.column_name)
        chunk_tables = sql.SQL(OFFLINE_DROP_CHUNKS).format(table=table, column=column)
        remove = sql.SQL("SELECT pgsim.remove_embedding({table}::regclass, {column}{keep})").format(
            table=table, column=column, keep=sql.SQL("" if self.drop_column else ", drop_column => false")
        )
        return [chunk_tables, remove]

    def reverse(self) -> MigrateOperation:
        if self.source is None:
            raise InvalidInput("drop_embedding needs source= (and model=) to be reversed.")
        return CreateEmbeddingOp(
            self.table_name, self.column_name, source=self.source, model=self.model, dtype=self.dtype, m=self.m,
            ef_construction=self.ef_construction, schema=self.schema, chunks=self.chunks, prefix=self.prefix,
        )  # fmt: skip


# pgsim.remove_embedding leaves a chunk table (its pgsim.chunking row goes with the registration): dropped first.
# Dynamic SQL: pgsim.chunking is not there before pgsim's chunks migration.
OFFLINE_DROP_CHUNKS = """DO $pgsim$
DECLARE
    target regclass := {table}::regclass;
    chunk_table regclass;
BEGIN
    IF pg_catalog.to_regclass('pgsim.chunking') IS NULL THEN
        RETURN;
    END IF;
    FOR chunk_table IN EXECUTE 'SELECT k.chunk_table::pg_catalog.regclass FROM pgsim.chunking k '
        'JOIN pgsim.embedding e ON e.id OPERATOR(pg_catalog.=) k.embedding_id '
        'LEFT JOIN pgsim.embedding r ON r.id OPERATOR(pg_catalog.=) e.replaces '
        'WHERE e.table_oid OPERATOR(pg_catalog.=) $1 AND (e.replaces IS NULL AND e.column_name '
        'OPERATOR(pg_catalog.=) $2 OR r.replaces IS NULL AND r.column_name OPERATOR(pg_catalog.=) $2)'
        USING target, {column}::pg_catalog.name LOOP
        EXECUTE pg_catalog.format('DROP TABLE %s', chunk_table);
    END LOOP;
END
$pgsim$"""


def psycopg_connection(operations: Operations, what: str) -> Any:
    import psycopg

    raw = operations.get_bind().connection.driver_connection
    if not isinstance(raw, psycopg.Connection):
        raise InvalidInput(f"{what} needs the synchronous psycopg driver (postgresql+psycopg://).")
    return raw


@Operations.implementation_for(CreateEmbeddingOp)
def _create_embedding(operations: Operations, operation: CreateEmbeddingOp) -> None:
    from pgsim.columns.adding import add_embedding
    from pgsim.db.schema import install

    if offline():
        for statement in operation.offline_statements():
            operations.execute(statement.as_string(None))
        return
    raw = psycopg_connection(operations, "create_embedding")
    install(raw)
    add_embedding(raw, operation.qualified_table, operation.column_name, source=operation.source,
                  model=operation.model, dtype=operation.dtype, index=operation.index,
                  chunks=operation.chunks, prefix=operation.prefix)  # fmt: skip


@Operations.implementation_for(DropEmbeddingOp)
def _drop_embedding(operations: Operations, operation: DropEmbeddingOp) -> None:
    from pgsim.columns.registry import remove_embedding

    if offline():
        for statement in operation.offline_statements():
            operations.execute(statement.as_string(None))
        return
    raw = psycopg_connection(operations, "drop_embedding")
    table = f"{operation.schema}.{operation.table_name}" if operation.schema else operation.table_name
    remove_embedding(raw, table, operation.column_name, drop_column=operation.drop_column)
