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

from pgsim.alembic.ops import check_name, check_schema, offline, table_identifier
from pgsim.columns.chunking.settings import Chunks
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
PrefixArgument = int | Literal[False] | None  # None: as registered; False: the index holds the whole vector


def check_chunks(chunks: Any) -> ChunksArgument:
    if chunks is None or chunks is False or isinstance(chunks, Chunks):
        return chunks
    raise InvalidInput(f"chunks must be pgsim.Chunks(tokens=..., overlap=...) or False (no chunks); got {chunks!r}.")


def check_prefix(prefix: Any) -> PrefixArgument:
    if prefix is None or prefix is False or (isinstance(prefix, int) and not isinstance(prefix, bool) and prefix > 0):
        return prefix
    raise InvalidInput(f"prefix must be a positive number of dimensions, or False (the whole vector); got {prefix!r}.")


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
        self.prefix = check_prefix(prefix)
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
            staged_names=sql.Literal(
                [derived_name(self.table_name, self.column_name, suffix=f"hnsw_prefix{n or ''}") for n in range(5)]
            ),
        )


# apply_change in SQL (the registration's columns compared as apply_change compares Definitions); a NULL
# source, model or dtype keeps the registered one. The columns a new source reads are found by
# register_embedding, in the table's order, as pgsim.change_embedding finds them. The new column gets the
# old one's column grants, as pgsim.change_embedding gives them. A chunked column is refused: its chunks are
# made by pgsim's Python code. A change of prefix alone builds the index again under a staging name (the first
# of {staged_names} that is free, or an index of this table's that is not its registered one) and swaps it in,
# as pgsim.columns.prefix_change does (without CONCURRENTLY: the script runs in a transaction).
OFFLINE_CHANGE = """DO $pgsim$
DECLARE
    target regclass := {table}::regclass;
    registered pgsim.embedding;
    changing pgsim.embedding;
    wanted_source text;
    wanted_model text;
    wanted_revision text;
    wanted_dtype text;
    wanted_prefix integer;
    granted record;
    chunked boolean;
    table_schema name;
    extension_schema name;
    key text;
    staged name;
    candidate name;
    holder record;
BEGIN
    SELECT * INTO registered FROM pgsim.embedding
    WHERE table_oid = target AND column_name = {column} AND replaces IS NULL;
    IF registered.id IS NULL THEN
        RAISE EXCEPTION '%.% is not a registered embedding column.', target, {column};
    END IF;
    IF pg_catalog.to_regclass('pgsim.chunking') IS NOT NULL THEN
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM pgsim.chunking WHERE embedding_id OPERATOR(pg_catalog.=) $1)'
            INTO chunked USING registered.id;
        IF chunked THEN
            RAISE EXCEPTION '%.% is chunked: its change runs online only, not from an offline (--sql) script.',
                target, {column} USING HINT = 'Run the migration online, or pgsim change-embedding.';
        END IF;
    END IF;
    wanted_source := coalesce({source}, registered.source);
    wanted_model := coalesce({model}, registered.model);
    wanted_revision := coalesce({revision}, registered.model_revision);
    wanted_dtype := coalesce({dtype}, registered.dtype);
    wanted_prefix := CASE WHEN {prefix_given} THEN {prefix}::integer ELSE registered.prefix END;
    IF wanted_prefix IS NOT NULL AND (wanted_dtype <> 'vector'
                                      OR wanted_prefix >= coalesce({dimension}, registered.dimension)) THEN
        RAISE EXCEPTION 'prefix=% needs a vector column of more than % dimensions (%.% would be % of %).',
            wanted_prefix, wanted_prefix, target, {column}, wanted_dtype, coalesce({dimension}, registered.dimension);
    END IF;
    SELECT * INTO changing FROM pgsim.embedding WHERE replaces = registered.id AND table_oid = target;
    IF changing.id IS NOT NULL THEN
        IF ROW(changing.source, changing.model, changing.model_revision, changing.dtype, changing.prefix)
           IS NOT DISTINCT FROM ROW(wanted_source, wanted_model, wanted_revision, wanted_dtype, wanted_prefix) THEN
            RETURN;  -- under way: the workers finish it
        END IF;
        PERFORM pgsim.unregister_embedding(changing.id, true);  -- cancelled, as pgsim.remove_embedding does
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = target
                       AND tgname = pg_catalog.format('pgsim_%s_insert', registered.id)) THEN
            PERFORM pgsim.create_triggers(registered.id);
            PERFORM pgsim.queue_rows(registered.id, false);
        END IF;
    END IF;
    IF (registered.source, registered.model, registered.model_revision, registered.dtype)
       = (wanted_source, wanted_model, wanted_revision, wanted_dtype) THEN
        IF registered.prefix IS NOT DISTINCT FROM wanted_prefix THEN
            RETURN;
        END IF;
        IF registered.index_name IS NOT NULL AND registered.index_m IS NOT NULL THEN  -- the vectors stay
            SELECT n.nspname INTO table_schema FROM pg_catalog.pg_class c
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = target;
            SELECT n.nspname INTO extension_schema FROM pg_catalog.pg_extension x
            JOIN pg_catalog.pg_namespace n ON n.oid = x.extnamespace WHERE x.extname = 'vector';
            FOREACH candidate IN ARRAY {staged_names}::name[] LOOP
                CONTINUE WHEN candidate = registered.index_name;
                SELECT c.relkind, i.indrelid INTO holder FROM pg_catalog.pg_class c
                LEFT JOIN pg_catalog.pg_index i ON i.indexrelid = c.oid
                WHERE c.relnamespace = pg_catalog.to_regnamespace(table_schema) AND c.relname = candidate;
                IF NOT FOUND THEN
                    staged := candidate;
                ELSIF holder.relkind = 'i' AND holder.indrelid = target THEN  -- left by an interrupted change
                    EXECUTE pg_catalog.format('DROP INDEX %I.%I', table_schema, candidate);
                    staged := candidate;
                END IF;
                EXIT WHEN staged IS NOT NULL;
            END LOOP;
            IF staged IS NULL THEN
                RAISE EXCEPTION 'No free name for the new index of %.%: other objects hold %.', target, {column},
                    {staged_names}::name[] USING HINT = 'Rename them first.';
            END IF;
            key := CASE WHEN wanted_prefix IS NULL THEN pg_catalog.quote_ident({column})
                   ELSE pg_catalog.format('((%I.subvector(%I, 1, %s))::%I.vector(%s))', extension_schema,
                                          {column}, wanted_prefix, extension_schema, wanted_prefix) END;
            EXECUTE pg_catalog.format(
                'CREATE INDEX %I ON %s USING hnsw (%s %I.vector_cosine_ops) WITH (m = %s, ef_construction = %s)',
                staged, target, key, extension_schema, coalesce({m}, registered.index_m),
                coalesce({ef_construction}, registered.index_ef_construction));
            EXECUTE pg_catalog.format('DROP INDEX IF EXISTS %I.%I', table_schema, registered.index_name);
            EXECUTE pg_catalog.format('ALTER INDEX %I.%I RENAME TO %I', table_schema, staged, registered.index_name);
            UPDATE pgsim.embedding SET index_m = coalesce({m}, index_m),
                index_ef_construction = coalesce({ef_construction}, index_ef_construction)
            WHERE id = registered.id;
        END IF;
        UPDATE pgsim.embedding SET prefix = wanted_prefix WHERE id = registered.id;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = target AND attname = {next_column}
               AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'Column %.% exists already (left by a cancelled change?).', target, {next_column}
            USING HINT = 'Its vectors cannot be trusted to be the new definition''s. Drop it, then run this again.';
    END IF;
    PERFORM pgsim.register_embedding(target => target, column_name => {next_column}, source => wanted_source,
        model => wanted_model, model_revision => wanted_revision,
        dimension => coalesce({dimension}, registered.dimension), dtype => wanted_dtype, index_name => NULL,
        index_m => coalesce({m}, registered.index_m),
        index_ef_construction => coalesce({ef_construction}, registered.index_ef_construction),
        source_columns => CASE WHEN {source}::text IS NULL THEN registered.source_columns END,
        queue_existing => true, replaces => registered.id, stale => registered.stale, prefix => wanted_prefix);
    FOR granted IN SELECT a.privilege_type, a.grantee FROM pg_catalog.pg_attribute c
                   CROSS JOIN LATERAL pg_catalog.aclexplode(c.attacl) AS a
                   WHERE c.attrelid = target AND c.attname = registered.column_name
                     AND a.privilege_type IN ('SELECT', 'INSERT', 'UPDATE', 'REFERENCES') LOOP
        EXECUTE pg_catalog.format('GRANT %s (%I) ON %s TO %s', granted.privilege_type, {next_column}, target,
            CASE WHEN granted.grantee = 0 THEN 'PUBLIC' ELSE granted.grantee::regrole::text END);
    END LOOP;
    IF wanted_source <> registered.source THEN
        PERFORM pgsim.freeze_embedding(registered.id);
    END IF;
END
$pgsim$"""


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
