"""pgsim's Alembic operations: ``op.install_pgsim()`` / ``op.uninstall_pgsim()``, ``op.create_hnsw_index(...)``
/ ``op.drop_hnsw_index(...)``.

Registered with ``Operations.register_operation`` when this module is imported; each has a ``reverse()`` so
autogenerate can render downgrades, and a typed, documented signature that ``help(op.create_hnsw_index)``
shows (Alembic copies the classmethod's). Names are checked before anything runs (PostgreSQL would cut a
long one silently) and quoted in the SQL; online, the column is checked to be a pgvector column first, so a
bad migration fails with a clear message and leaves the database as it was. ``concurrently=True`` runs in
Alembic's autocommit block, online and in ``--sql`` output alike.

``uninstall_pgsim()`` removes pgsim only from a database where no embedding column is registered any more:
pgsim's schema is shared by every application of the database, so one application's downgrade leaves it
(and the other applications' registrations) in place, with a warning. Autogenerate never renders it: the
reverse of ``install_pgsim()`` is :class:`KeepPgsimOp`, which renders nothing.
"""

from __future__ import annotations

from alembic.operations import MigrateOperation, Operations
from psycopg import sql

from pgsim.db.hnsw import DEFAULT_EF_CONSTRUCTION, DEFAULT_M, HNSW
from pgsim.db.names import MAX_IDENTIFIER_BYTES
from pgsim.errors import InvalidInput

# pgvector's HNSW operator classes (none is the default: an index names one); the prefix is the column type.
OPCLASSES = (
    *(f"{kind}_{metric}_ops" for kind in ("vector", "halfvec", "sparsevec") for metric in ("cosine", "l2", "ip", "l1")),
    "bit_hamming_ops",
    "bit_jaccard_ops",
)
# A built index of a registered column: the registry keeps its parameters (model switches build their index
# with them), and records it when the column had none. Guarded, so it runs offline and without pgsim alike.
REGISTRY_UPDATE = """DO $pgsim$ BEGIN
IF to_regclass('pgsim.embedding') IS NOT NULL THEN
    UPDATE pgsim.embedding SET index_name = {index}, index_m = {m}, index_ef_construction = {ef_construction}
    WHERE table_name = {table} AND table_schema = coalesce({schema}, current_schema())
      AND (index_name = {index} OR (index_name IS NULL AND column_name = {column} AND replaces IS NULL));
END IF;
END $pgsim$"""
# A dropped index that a registration recorded: it has no index any more (remove and model switches skip it).
REGISTRY_FORGET_INDEX = """DO $pgsim$ BEGIN
IF to_regclass('pgsim.embedding') IS NOT NULL THEN
    UPDATE pgsim.embedding SET index_name = NULL, index_m = NULL, index_ef_construction = NULL
    WHERE index_name = {index} AND table_schema = coalesce({schema}, current_schema());
END IF;
END $pgsim$"""


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"The {kind} name must be a non-empty string; got {name!r}.")
    if any(char in name for char in '";\\') or not name.isprintable():
        raise InvalidInput(
            f"The {kind} name {name!r} holds quotes, semicolons or control characters; use a plain name."
        )
    if len(name.encode()) > MAX_IDENTIFIER_BYTES:
        raise InvalidInput(
            f"The {kind} name {name!r} is {len(name.encode())} bytes; PostgreSQL keeps {MAX_IDENTIFIER_BYTES} "
            "and would cut it silently. Choose a shorter name."
        )
    return name


def check_schema(schema: str | None) -> str | None:
    return None if schema is None else check_name("schema", schema)


@Operations.register_operation("install_pgsim")
class InstallPgsimOp(MigrateOperation):
    """Apply every pgsim SQL file not yet in the ledger (what ``pgsim install`` does)."""

    @classmethod
    def install_pgsim(cls, operations: Operations) -> None:
        """Install pgsim's schema, or bring it up to this package's: ``CREATE EXTENSION vector`` if needed, then
        every SQL file of pgsim's that the ledger ``pgsim.migration`` does not list (what ``pgsim install``
        and the ``pgsim`` branch do; whichever runs second does nothing). Offline (``--sql``) it renders
        guarded blocks that check the ledger first."""
        operations.invoke(cls())

    def reverse(self) -> MigrateOperation:
        return KeepPgsimOp()


class KeepPgsimOp(MigrateOperation):
    """The reverse of :class:`InstallPgsimOp` in a generated downgrade: pgsim stays (other applications of the
    database may have registered columns), and nothing is rendered. Not an operation of its own."""

    def reverse(self) -> MigrateOperation:
        return InstallPgsimOp()


@Operations.register_operation("uninstall_pgsim")
class UninstallPgsimOp(MigrateOperation):
    """Drop schema pgsim (its registry, queue and functions; not the vector extension) when no embedding
    column is registered any more."""

    @classmethod
    def uninstall_pgsim(cls, operations: Operations) -> None:
        """Drop schema ``pgsim`` (registry, queue, cache, functions; the ``vector`` extension stays), but only
        when no embedding column of any table is registered any more: while one is, pgsim stays and a
        warning names the registered columns (pgsim's schema is the whole database's, and other
        applications may use it). Drop their embeddings first (``op.drop_embedding``, ``pgsim
        remove-embedding``) to remove pgsim too. Offline (``--sql``) the script checks at run time and
        raises a WARNING instead of dropping. Autogenerate never renders this operation."""
        operations.invoke(cls())

    def reverse(self) -> MigrateOperation:
        return InstallPgsimOp()


@Operations.register_operation("create_hnsw_index")
class CreateHnswIndexOp(MigrateOperation):
    def __init__(
        self,
        index_name: str,
        table_name: str,
        column_name: str,
        *,
        m: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ops: str = "vector_cosine_ops",
        schema: str | None = None,
        concurrently: bool = False,
    ) -> None:
        self.index_name = check_name("index", index_name)
        self.table_name = check_name("table", table_name)
        self.column_name = check_name("column", column_name)
        self.hnsw = HNSW(m, ef_construction)
        if ops not in OPCLASSES:
            raise InvalidInput(f"ops must be one of {', '.join(OPCLASSES)}; got {ops!r}.")
        self.ops = ops
        self.schema = check_schema(schema)
        self.concurrently = concurrently

    @classmethod
    def create_hnsw_index(
        cls,
        operations: Operations,
        index_name: str,
        table_name: str,
        column_name: str,
        *,
        m: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ops: str = "vector_cosine_ops",
        schema: str | None = None,
        concurrently: bool = False,
    ) -> None:
        """Build an HNSW index ``index_name`` on ``table_name.column_name`` with pgvector's operator class
        ``ops`` (any of them: ``vector_cosine_ops``, ``halfvec_l2_ops``, ``bit_hamming_ops``, ...) and
        ``m``, ``ef_construction``. Online, the column is checked to exist and to be of the operator class's
        type first. ``concurrently=True`` builds it without blocking writes, in Alembic's autocommit block.
        When the index is on a registered embedding column, the registry records it."""
        operations.invoke(
            cls(index_name, table_name, column_name, m=m, ef_construction=ef_construction, ops=ops, schema=schema,
                concurrently=concurrently)
        )  # fmt: skip

    def reverse(self) -> MigrateOperation:
        return DropHnswIndexOp(
            self.index_name, self.table_name, schema=self.schema, concurrently=self.concurrently,
            column_name=self.column_name, m=self.hnsw.m, ef_construction=self.hnsw.ef_construction, ops=self.ops,
        )  # fmt: skip

    def registry_update(self) -> sql.Composed:
        """The registry's record of the index (see REGISTRY_UPDATE)."""
        return sql.SQL(REGISTRY_UPDATE).format(
            m=sql.Literal(self.hnsw.m),
            ef_construction=sql.Literal(self.hnsw.ef_construction),
            index=sql.Literal(self.index_name),
            table=sql.Literal(self.table_name),
            column=sql.Literal(self.column_name),
            schema=sql.Literal(self.schema),
        )

    def statement(self) -> sql.Composed:
        table = table_identifier(self.table_name, self.schema)
        return sql.SQL(
            "CREATE INDEX {concurrently}{index} ON {table} USING hnsw ({column} {ops}) "
            "WITH (m = {m}, ef_construction = {ef_construction})"
        ).format(
            concurrently=sql.SQL("CONCURRENTLY " if self.concurrently else ""),
            index=sql.Identifier(self.index_name),
            table=table,
            column=sql.Identifier(self.column_name),
            ops=sql.SQL(self.ops),
            m=sql.Literal(self.hnsw.m),
            ef_construction=sql.Literal(self.hnsw.ef_construction),
        )


@Operations.register_operation("drop_hnsw_index")
class DropHnswIndexOp(MigrateOperation):
    def __init__(
        self,
        index_name: str,
        table_name: str | None = None,
        *,
        schema: str | None = None,
        concurrently: bool = False,
        column_name: str | None = None,
        m: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ops: str = "vector_cosine_ops",
    ) -> None:
        self.index_name = check_name("index", index_name)
        self.table_name = table_name if table_name is None else check_name("table", table_name)
        self.schema = check_schema(schema)
        self.concurrently = concurrently
        self.column_name, self.m, self.ef_construction, self.ops = column_name, m, ef_construction, ops

    @classmethod
    def drop_hnsw_index(
        cls,
        operations: Operations,
        index_name: str,
        table_name: str | None = None,
        *,
        schema: str | None = None,
        concurrently: bool = False,
        column_name: str | None = None,
        m: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ops: str = "vector_cosine_ops",
    ) -> None:
        """Drop the HNSW index ``index_name`` (``concurrently=True``: without blocking writes, in Alembic's
        autocommit block); a registration that recorded it forgets it. ``table_name``, ``column_name``,
        ``m``, ``ef_construction`` and ``ops`` say what to build again in the reverse (autogenerate's
        downgrade); the drop itself needs only the name."""
        operations.invoke(
            cls(index_name, table_name, schema=schema, concurrently=concurrently, column_name=column_name, m=m,
                ef_construction=ef_construction, ops=ops)
        )  # fmt: skip

    def reverse(self) -> MigrateOperation:
        if self.table_name is None or self.column_name is None:
            raise InvalidInput("drop_hnsw_index needs table_name and column_name to be reversed.")
        return CreateHnswIndexOp(
            self.index_name, self.table_name, self.column_name, m=self.m, ef_construction=self.ef_construction,
            ops=self.ops, schema=self.schema, concurrently=self.concurrently,
        )  # fmt: skip

    def registry_update(self) -> sql.Composed:
        """The registry forgets the index if it recorded it (see REGISTRY_FORGET_INDEX)."""
        return sql.SQL(REGISTRY_FORGET_INDEX).format(
            index=sql.Literal(self.index_name), schema=sql.Literal(self.schema)
        )

    def statement(self) -> sql.Composed:
        index = table_identifier(self.index_name, self.schema)  # an index lives in its table's schema
        return sql.SQL("DROP INDEX {concurrently}{index}").format(
            concurrently=sql.SQL("CONCURRENTLY " if self.concurrently else ""), index=index
        )


@Operations.implementation_for(InstallPgsimOp)
def _install_pgsim(operations: Operations, operation: InstallPgsimOp) -> None:
    from pgsim.alembic.branch import upgrade_to

    upgrade_to(None)


@Operations.implementation_for(UninstallPgsimOp)
def _uninstall_pgsim(operations: Operations, operation: UninstallPgsimOp) -> None:
    from pgsim.alembic.branch import unless_registered

    unless_registered("DROP SCHEMA IF EXISTS pgsim CASCADE", "uninstall_pgsim")


@Operations.implementation_for(CreateHnswIndexOp)
def _create_hnsw_index(operations: Operations, operation: CreateHnswIndexOp) -> None:
    _check_vector_column(operations, operation)
    _run(operations, operation.statement().as_string(), operation.concurrently)
    operations.execute(operation.registry_update().as_string())


@Operations.implementation_for(DropHnswIndexOp)
def _drop_hnsw_index(operations: Operations, operation: DropHnswIndexOp) -> None:
    _run(operations, operation.statement().as_string(), operation.concurrently)
    operations.execute(operation.registry_update().as_string())


def _run(operations: Operations, statement: str, concurrently: bool) -> None:
    if concurrently:  # CREATE/DROP INDEX CONCURRENTLY cannot run inside a transaction block
        with operations.get_context().autocommit_block():
            operations.execute(statement)
    else:
        operations.execute(statement)


def _check_vector_column(operations: Operations, operation: CreateHnswIndexOp) -> None:
    """Online: the column must exist and be a pgvector type matching ``ops``; offline there is nothing to ask."""
    if offline():
        return
    from sqlalchemy import text

    table = table_identifier(operation.table_name, operation.schema).as_string()
    found = (
        operations.get_bind()
        .execute(
            text(
                "SELECT pg_catalog.format_type(atttypid, NULL) FROM pg_catalog.pg_attribute "
                "WHERE attrelid OPERATOR(pg_catalog.=) "
                "CAST(pg_catalog.to_regclass(CAST(:table AS pg_catalog.text)) AS pg_catalog.oid) "
                "AND attname OPERATOR(pg_catalog.=) CAST(:column AS pg_catalog.name) AND NOT attisdropped"
            ),
            {"table": table, "column": operation.column_name},
        )
        .scalar()
    )
    if found is None:
        raise InvalidInput(f"{operation.table_name}.{operation.column_name} does not exist.")
    wanted = operation.ops.split("_", 1)[0]
    if found != wanted:
        raise InvalidInput(
            f"{operation.table_name}.{operation.column_name} is {found}, and an HNSW index with {operation.ops} "
            f"needs a {wanted} column."
        )


def table_identifier(table_name: str, schema: str | None) -> sql.Identifier:
    return sql.Identifier(schema, table_name) if schema else sql.Identifier(table_name)


def offline() -> bool:
    from alembic import context

    return bool(context.is_offline_mode())


def pgsim_operations() -> list[str]:
    """The names of pgsim's operations on Alembic's ``op`` (those registered by pgsim's modules)."""
    names = []
    for name in dir(Operations):
        operation = getattr(getattr(Operations, name), "__globals__", {}).get("op_cls")
        if operation is not None and operation.__module__.startswith("pgsim."):
            names.append(name)
    return names


def show_signatures() -> None:
    """Alembic's ``op`` module proxies every operation as ``name(*args, **kw)`` with its docstring; pgsim's get
    the signature of the operation itself, which ``help(op.create_embedding)`` and ``inspect.signature``
    show (without Alembic's ``self``)."""
    import inspect

    from alembic import op as op_module

    for name in pgsim_operations():
        proxy = getattr(op_module, name, None)
        if proxy is None:
            continue
        signature = inspect.signature(getattr(Operations, name))
        proxy.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
