"""Registered embedding columns: which table.column holds embeddings of which source text and model.

``add_embedding`` adds the column (or adopts an existing one of the model's dimension), a row in
``pgsim.embedding``, two triggers that queue rows for the workers (an INSERT without an embedding; an
UPDATE that changes a source column and not the embedding), the HNSW index, and queues the rows already
there. Everything but a ``CONCURRENTLY`` index build happens in one transaction: an error changes nothing.
``remove_embedding`` undoes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgsim.db.hnsw import HNSW, create_hnsw_index
from pgsim.db.names import derived_name, table_identifier, table_parts
from pgsim.encoding.encoder import DEFAULT_MODEL, Encoder
from pgsim.errors import InvalidInput

DTYPES = ("vector", "halfvec")
# Separator between source columns given as a list: a paragraph break, which tokenizers treat as space.
COLUMN_SEPARATOR = "\n\n"
DEFAULT_HNSW = HNSW()


@dataclass(frozen=True)
class Registration:
    """One row of ``pgsim.embedding``."""

    id: int
    schema: str
    table_name: str
    column: str
    source: str  # SQL expression over the table's columns
    source_columns: tuple[str, ...]
    key_columns: tuple[str, ...]
    model: str
    model_revision: str
    dimension: int
    dtype: str
    index_name: str | None
    index: HNSW | None
    created_column: bool
    replaces: int | None

    @property
    def table(self) -> str:
        return f"{self.schema}.{self.table_name}"

    @property
    def table_sql(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table_name)

    @property
    def source_sql(self) -> sql.Composed:
        """The source text as an SQL expression (parenthesised, cast to text)."""
        return sql.SQL("(({})::text)").format(sql.SQL(self.source))

    @property
    def opclass(self) -> str:
        return f"{self.dtype}_cosine_ops"


@dataclass(frozen=True)
class _Table:
    schema: str
    name: str
    columns: dict[str, str]  # name -> format_type
    key_columns: tuple[str, ...]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def identifier(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


REGISTRY_COLUMNS = (
    "id, table_schema, table_name, column_name, source, source_columns, key_columns, model, model_revision, "
    "dimension, dtype, index_name, index_m, index_ef_construction, created_column, replaces"
)


def _registration(row: Sequence[Any]) -> Registration:
    (id_, schema, table, column, source, source_columns, key_columns, model, revision, dimension, dtype,
     index_name, m, ef_construction, created_column, replaces) = row  # fmt: skip
    return Registration(
        id=id_,
        schema=schema,
        table_name=table,
        column=column,
        source=source,
        source_columns=tuple(source_columns),
        key_columns=tuple(key_columns),
        model=model,
        model_revision=revision,
        dimension=dimension,
        dtype=dtype,
        index_name=index_name,
        index=HNSW(m, ef_construction) if m is not None else None,
        created_column=created_column,
        replaces=replaces,
    )


def registrations(conn: psycopg.Connection[Any]) -> list[Registration]:
    """Every registered embedding column (none when pgsim's sync schema is not installed)."""
    if conn.execute("SELECT to_regclass('pgsim.embedding')").fetchone() == (None,):
        return []
    query = "SELECT " + REGISTRY_COLUMNS + " FROM pgsim.embedding ORDER BY id"  # noqa: S608 - constant columns
    return [_registration(row) for row in conn.execute(query).fetchall()]


def get_registration(conn: psycopg.Connection[Any], table: str, column: str) -> Registration | None:
    """The registration of ``table.column``, or None. ``table`` may leave out its schema (search_path)."""
    if conn.execute("SELECT to_regclass('pgsim.embedding')").fetchone() == (None,):
        return None
    row = conn.execute(
        "SELECT "  # noqa: S608 - constant columns
        + REGISTRY_COLUMNS
        + """ FROM pgsim.embedding e
        WHERE (e.table_schema, e.table_name) = (
            SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.oid = to_regclass(%s))
          AND e.column_name = %s""",
        [table_identifier(table).as_string(conn), column],
    ).fetchone()
    return _registration(row) if row else None


def registration_by_id(conn: psycopg.Connection[Any], registration_id: int) -> Registration | None:
    query = "SELECT " + REGISTRY_COLUMNS + " FROM pgsim.embedding WHERE id = %s"  # noqa: S608 - constant columns
    row = conn.execute(query, [registration_id]).fetchone()
    return _registration(row) if row else None


def require_registration(conn: psycopg.Connection[Any], table: str, column: str) -> Registration:
    found = get_registration(conn, table, column)
    if found is None:
        raise InvalidInput(
            f"{table}.{column} is not a registered embedding column. Register it: pgsim add-embedding {table} "
            f"{column} --source <column>  (Python: pgsim.add_embedding(conn, {table!r}, {column!r}, source=...))"
        )
    return found


def add_embedding(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    *,
    source: str | Sequence[str] | sql.Composable,
    model: str = DEFAULT_MODEL,
    dtype: str = "vector",
    index: HNSW | None = DEFAULT_HNSW,
    concurrently: bool = False,
    queue_existing: bool = True,
    replaces: int | None = None,
    planned_index: HNSW | None = None,
    index_name: str | None = None,
) -> Registration:
    """Register ``table.column`` as the embedding of ``source`` under ``model``.

    ``source`` is a column name, a list of column names (joined by a blank line, NULLs skipped), or an SQL
    expression over the table's columns (a ``psycopg.sql.SQL`` or a string that is not a column name).
    The column is added as ``vector(d)`` or ``halfvec(d)`` with the model's dimension ``d``; an existing
    column of that type is adopted. Existing rows are queued for the workers unless ``queue_existing`` is
    false. ``concurrently`` builds the index without blocking writes (needs an autocommit connection).
    ``index_name`` names the index (default ``<table>_<column>_hnsw``); an HNSW index of that name on the
    column that exists already is adopted, not built again.
    (``replaces`` and ``planned_index`` are for :func:`change_model`: the index is recorded, built later.)"""
    if dtype not in DTYPES:
        raise InvalidInput(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    if concurrently and not conn.autocommit:
        raise InvalidInput("concurrently=True needs an autocommit connection (psycopg: autocommit=True).")
    if not isinstance(column, str) or not column:
        raise InvalidInput(f"The embedding column name must be a non-empty string; got {column!r}.")
    encoder = Encoder(model)
    dimension, revision = encoder.dimension, encoder.revision  # an unknown model fails here, before any change
    with conn.transaction():
        target = _read_table(conn, table)
        forget_dropped(conn)
        if get_registration(conn, target.qualified, column) is not None:
            raise InvalidInput(
                f"{target.qualified}.{column} is already registered; remove it first (pgsim remove-embedding)."
            )
        expression = _source_expression(conn, target, source)
        source_columns = _source_columns(conn, target, expression)
        _check_column(target, column, dtype, dimension, model)
        index_name = (index_name or derived_name(target.name, column, suffix="hnsw")) if index is not None else None
        recorded = index or planned_index
        adopt_index = index_name is not None and _relation_exists(conn, target.schema, index_name)
        if adopt_index and not _is_hnsw_index_on(conn, target, index_name, column):  # type: ignore[arg-type]
            raise InvalidInput(
                f"An index or table named {target.schema}.{index_name} already exists; drop or rename it."
            )
        try:
            row = conn.execute(
                """
                SELECT pgsim.register_embedding(target => %s::regclass, column_name => %s, source => %s,
                    model => %s, model_revision => %s, dimension => %s, dtype => %s, index_name => %s,
                    index_m => %s, index_ef_construction => %s, source_columns => %s::name[], replaces => %s)
                """,
                [
                    target.identifier.as_string(conn),
                    column,
                    expression,
                    model,
                    revision,
                    dimension,
                    dtype,
                    index_name,
                    recorded.m if recorded else None,
                    recorded.ef_construction if recorded else None,
                    list(source_columns),
                    replaces,
                ],  # fmt: skip
            ).fetchone()
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction):
            raise InvalidInput("pgsim's schema is missing or out of date here: run `pgsim install` first.") from None
        assert row is not None
        registration = registration_by_id(conn, row[0])
        assert registration is not None
        if index is not None and adopt_index:
            index = None  # the HNSW index of that name is there already (declared by the ORM, say)
        if index is not None and not concurrently:
            _build_index(conn, registration, concurrently=False)
        if queue_existing and not concurrently:
            queue_rows(conn, registration)
    if concurrently:  # outside the transaction that locked the table for ADD COLUMN and the triggers
        if queue_existing:
            queue_rows(conn, registration)  # rows written meanwhile were queued by the triggers
        if index is not None:
            _build_index(conn, registration, concurrently=True)
    return registration


def remove_embedding(conn: psycopg.Connection[Any], table: str, column: str, *, drop_column: bool = True) -> None:
    """Undo :func:`add_embedding`: triggers, queue entries, dead letters, registry row, index, and the column
    if pgsim added it (``drop_column=False`` keeps it). A model change still filling is removed with it."""
    with conn.transaction():
        registration = require_registration(conn, table, column)
        pending = conn.execute("SELECT id FROM pgsim.embedding WHERE replaces = %s", [registration.id]).fetchall()
        for (replacement_id,) in pending:
            replacement = registration_by_id(conn, replacement_id)
            assert replacement is not None
            _remove(conn, replacement, drop_column=True)
        _remove(conn, registration, drop_column=drop_column)


def _remove(conn: psycopg.Connection[Any], registration: Registration, *, drop_column: bool) -> None:
    """pgsim.unregister_embedding, with a clear error when other objects depend on the column."""
    try:
        with conn.transaction():
            conn.execute("SELECT pgsim.unregister_embedding(%s, %s)", [registration.id, drop_column])
    except psycopg.errors.DependentObjectsStillExist as exc:
        raise InvalidInput(
            f"Cannot drop {registration.table}.{registration.column}: {exc.diag.message_detail or exc}. "
            "Drop or change those objects first (nothing was removed)."
        ) from None


def forget_dropped(conn: psycopg.Connection[Any]) -> list[int]:
    """Follow renamed tables (their triggers carry the registration id) and forget the registrations of
    dropped ones, with their queue entries and dead letters. Returns the forgotten ids."""
    if conn.execute("SELECT to_regclass('pgsim.embedding')").fetchone() == (None,):
        return []
    with conn.transaction():
        conn.execute(
            """
            UPDATE pgsim.embedding e SET table_schema = n.nspname, table_name = c.relname
            FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE t.tgname = format('pgsim_%s_insert', e.id)
              AND (n.nspname, c.relname) <> (e.table_schema, e.table_name)
            """
        )
        gone = [
            registration_id
            for (registration_id,) in conn.execute(
                """
                DELETE FROM pgsim.embedding e
                WHERE NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgname = format('pgsim_%s_insert', e.id))
                RETURNING id
                """
            ).fetchall()
        ]
        if gone:
            conn.execute("DELETE FROM pgsim.queue WHERE embedding_id = ANY(%s)", [gone])
            conn.execute("DELETE FROM pgsim.dead_letter WHERE embedding_id = ANY(%s)", [gone])
    return gone


def key_match(registration: Registration, key: sql.Composable) -> sql.Composed:
    """``table.k = (jsonb_populate_record(NULL::table, key)).k AND ...``: the row a queued key names,
    compared in the key columns' own types, so the primary key index serves it."""
    record = sql.SQL("jsonb_populate_record(NULL::{}, {})").format(registration.table_sql, key)
    return sql.SQL(" AND ").join(
        sql.SQL("{}.{} = ({}).{}").format(registration.table_sql, sql.Identifier(name), record, sql.Identifier(name))
        for name in registration.key_columns
    )


def queue_rows(conn: psycopg.Connection[Any], registration: Registration, *, only_missing: bool = True) -> int:
    """Queue the rows whose embedding is missing (or all rows with text) and wake the workers; returns how many
    entries were added (pgsim.queue_rows)."""
    row = conn.execute("SELECT pgsim.queue_rows(%s, %s)", [registration.id, only_missing]).fetchone()
    assert row is not None
    return int(row[0])


def _read_table(conn: psycopg.Connection[Any], table: str) -> _Table:
    table_parts(table)
    found = conn.execute(
        """
        SELECT n.nspname, c.relname, c.relkind, c.oid
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = to_regclass(%s)
        """,
        [table_identifier(table).as_string(conn)],
    ).fetchone()
    if found is None:
        raise InvalidInput(f"Table {table!r} does not exist (or is not on the search_path).")
    schema, name, kind, oid = found
    if kind not in ("r", "p"):
        raise InvalidInput(f"{table!r} is not a table; embedding columns live in tables.")
    columns = dict(
        conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            [oid],
        ).fetchall()
    )
    keys = conn.execute(
        """
        SELECT a.attname FROM pg_index i
        CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.position
        """,
        [oid],
    ).fetchall()
    if not keys:
        raise InvalidInput(
            f"Table {schema}.{name} has no primary key, which pgsim needs to find a row again after encoding it. "
            f"Add one: ALTER TABLE {schema}.{name} ADD PRIMARY KEY (<column>);"
        )
    return _Table(schema, name, columns, tuple(key for (key,) in keys))


def _source_expression(
    conn: psycopg.Connection[Any], target: _Table, source: str | Sequence[str] | sql.Composable
) -> str:
    """The source as SQL text: quoted column names, or the user's expression as given."""
    if isinstance(source, sql.Composable):
        return source.as_string(conn)
    if isinstance(source, str):
        if source in target.columns:
            return sql.Identifier(source).as_string(conn)
        if not source.strip():
            raise InvalidInput("source is empty: name the column(s) that hold the text, or give an SQL expression.")
        return source
    names = list(source)
    if not names or not all(isinstance(name, str) for name in names):
        raise InvalidInput(
            f"source must be a column name, a list of column names, or an SQL expression; got {source!r}."
        )
    unknown = [name for name in names if name not in target.columns]
    if unknown:
        raise InvalidInput(
            f"Table {target.qualified} has no column {', '.join(map(repr, unknown))}; its columns are "
            f"{', '.join(target.columns)}."
        )
    return columns_expression(names)


def columns_expression(names: Sequence[str]) -> str:
    """The source expression of a list of columns: the column, or ``concat_ws`` with a blank line."""
    if len(names) == 1:
        return sql.Identifier(names[0]).as_string(None)
    return (
        sql.SQL("concat_ws({}, {})")
        .format(sql.Literal(COLUMN_SEPARATOR), sql.SQL(", ").join(map(sql.Identifier, names)))
        .as_string(None)
    )


def _source_columns(conn: psycopg.Connection[Any], target: _Table, expression: str) -> tuple[str, ...]:
    """The table's columns that ``expression`` reads, found from the dependencies of a throwaway view; and
    a clear error when the expression is not valid SQL over the table."""
    probe = sql.SQL("SELECT (({})::text) AS source FROM {}").format(sql.SQL(expression), target.identifier)
    try:
        with conn.transaction() as tx:
            # With a parameter, psycopg sends one statement that PostgreSQL parses alone: an expression that
            # tries to end the statement and start another fails here instead of running.
            conn.execute(sql.SQL("{} WHERE %s LIMIT 0").format(probe), [False])
            conn.execute(sql.SQL("CREATE TEMP VIEW pgsim_source_probe AS {}").format(probe))
            rows = conn.execute(
                """
                SELECT DISTINCT a.attname, a.attnum FROM pg_depend d
                JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                WHERE r.ev_class = 'pg_temp.pgsim_source_probe'::regclass AND d.refobjid = %s::regclass
                ORDER BY a.attnum
                """,
                [target.identifier.as_string(conn)],
            ).fetchall()
            raise psycopg.Rollback(tx)
    except psycopg.errors.UndefinedColumn as exc:
        raise InvalidInput(
            f"source {expression!r}: {exc.diag.message_primary}. The columns of {target.qualified} are "
            f"{', '.join(target.columns)}."
        ) from None
    except psycopg.Error as exc:
        raise InvalidInput(
            f"source {expression!r} is not an SQL expression over {target.qualified}: {exc.diag.message_primary or exc}"
        ) from None
    columns = tuple(name for name, _ in rows)
    if not columns:
        raise InvalidInput(
            f"source {expression!r} reads no column of {target.qualified}, so every row would embed alike."
        )
    return columns


def _check_column(target: _Table, column: str, dtype: str, dimension: int, model: str) -> None:
    """An existing ``column`` must have the type the model gives (pgsim.register_embedding adopts it)."""
    wanted = f"{dtype}({dimension})"
    existing = target.columns.get(column)
    if existing is not None and existing != wanted:
        raise InvalidInput(
            f"Column {target.qualified}.{column} exists as {existing}, but model {model!r} gives {wanted}. Use another "
            "column name, or a model of that dimension."
        )


def _is_hnsw_index_on(conn: psycopg.Connection[Any], target: _Table, index_name: str, column: str) -> bool:
    row = conn.execute(
        """
        SELECT am.amname = 'hnsw' AND i.indnatts = 1 AND a.attname = %s
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
        WHERE i.indexrelid = to_regclass(%s) AND i.indrelid = to_regclass(%s)
        """,
        [column, sql.Identifier(target.schema, index_name).as_string(conn), target.identifier.as_string(conn)],
    ).fetchone()
    return bool(row and row[0])


def _relation_exists(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    return conn.execute("SELECT to_regclass(%s)", [sql.Identifier(schema, name).as_string(conn)]).fetchone() != (None,)


def _build_index(conn: psycopg.Connection[Any], registration: Registration, *, concurrently: bool) -> None:
    assert registration.index is not None and registration.index_name is not None
    create_hnsw_index(
        conn,
        registration.table,
        registration.column,
        registration.index_name,
        registration.index,
        opclass=registration.opclass,
        concurrently=concurrently,
    )


def change_model(
    conn: psycopg.Connection[Any],
    table: str,
    column: str,
    model: str,
    *,
    dtype: str | None = None,
    index: HNSW | None = None,
) -> Registration:
    """Start moving ``table.column`` to ``model``: a new column (``<column>_next``) registered for it, with
    every row queued. Searches keep using the old column and model meanwhile. When the workers have filled
    the new column, :func:`switch_over` (run by every drain) builds its index and, in one transaction,
    drops the old column and gives the new one its name. Returns the new registration."""
    old = require_registration(conn, table, column)
    if old.replaces is not None:
        raise InvalidInput(f"{old.table}.{old.column} is itself the target of a model change still being filled.")
    under_way = conn.execute("SELECT column_name FROM pgsim.embedding WHERE replaces = %s", [old.id]).fetchone()
    if under_way:
        raise InvalidInput(
            f"A model change of {old.table}.{old.column} is under way (into column {under_way[0]}); let the workers "
            f"finish it, or cancel it: pgsim remove-embedding {old.table} {under_way[0]}"
        )
    encoder = Encoder(model)
    if model == old.model and encoder.revision == old.model_revision:
        raise InvalidInput(f"{old.table}.{old.column} already holds embeddings of {model!r}.")
    next_column = derived_name(old.column, suffix="next")
    if next_column in _read_table(conn, old.table).columns:
        raise InvalidInput(
            f"Column {old.table}.{next_column} exists already (left by a cancelled change?); its vectors cannot be "
            "trusted to be the new model's. Drop it, then change the model again."
        )
    return add_embedding(
        conn,
        old.table,
        next_column,
        source=sql.SQL(old.source),
        model=model,
        dtype=dtype or old.dtype,
        index=None,  # the old column serves searches meanwhile: one bulk build at the switch beats row inserts
        queue_existing=True,
        replaces=old.id,
        planned_index=index or old.index,
    )


def switch_over(conn: psycopg.Connection[Any], new: Registration) -> bool:
    """Complete a model change whose new column has no queued row and no dead letter: build its index (sized,
    without blocking writes where the connection allows), then in one transaction drop the old column, its
    index and triggers and give the new column and index the old names. False (and nothing changed) while
    rows are queued or failed, when the change was cancelled meanwhile, or when the table stays locked."""
    assert new.replaces is not None
    old = registration_by_id(conn, new.replaces)
    if old is None or _pending(conn, new.id):
        return False
    index = new.index or old.index
    staged_index = derived_name(new.table_name, new.column, suffix="hnsw") if index else None
    if index and staged_index and not _valid_index_exists(conn, new.schema, staged_index):
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(new.schema, staged_index)))
        create_hnsw_index(
            conn, new.table, new.column, staged_index, index, opclass=new.opclass, concurrently=conn.autocommit
        )
    try:
        with conn.transaction():
            # Writers wait from here to the commit (readers only for the ALTERs): nothing can be queued meanwhile.
            # A worker that holds rows of this table keeps its batch; this switch gives up and comes back.
            conn.execute("SET LOCAL lock_timeout = '2s'")
            conn.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(new.table_sql))
            current = conn.execute(
                "SELECT replaces, column_name FROM pgsim.embedding WHERE id = %s FOR UPDATE", [new.id]
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
    _remove(conn, old, drop_column=False)
    conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(new.table_sql, sql.Identifier(old.column)))
    conn.execute(
        sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(
            new.table_sql, sql.Identifier(new.column), sql.Identifier(old.column)
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
        WHERE id = %s
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
        "SELECT EXISTS (SELECT 1 FROM pgsim.queue WHERE embedding_id = %(id)s) "
        "OR EXISTS (SELECT 1 FROM pgsim.dead_letter WHERE embedding_id = %(id)s)",
        {"id": registration_id},
    ).fetchone()
    return bool(row and row[0])


def _valid_index_exists(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    """An index of that name that is valid (a failed CONCURRENTLY build leaves an invalid one behind)."""
    row = conn.execute(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
        [sql.Identifier(schema, name).as_string(conn)],
    ).fetchone()
    return bool(row and row[0])
