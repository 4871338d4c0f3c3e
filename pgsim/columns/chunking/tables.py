"""The chunk table of a chunked registration, and chunking added to or removed from a registration.

The table is made next to the registered table (same schema, same owner) and named ``<table>__<column>_chunks``
(cut, with a hash of the whole name, to PostgreSQL's 63 bytes): the document's primary key columns (same
names and types, a foreign key to the document ``ON DELETE CASCADE``, so a deleted document takes its chunks),
``chunk_no``, the chunk's character span ``span_start``/``span_end`` in the source text, ``digest`` (sha256 of
the chunk's text, so an unchanged chunk keeps its vector) and ``embedding``, with an HNSW cosine index. Row-level
security on it shows a role the chunks of the documents it may see, so a tenant's row-level security on the
document table holds for its chunks too. ``pgsim.chunking`` records it by OID.

Grants follow the document table's: the roles that may read the embedding column get SELECT on the chunk
table, those that may update it (workers) SELECT, INSERT and DELETE. Later grants: ``pgsim grant``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from pgsim.columns.chunking.settings import Chunks, checked_chunks
from pgsim.columns.chunking.splitting import window
from pgsim.columns.registry import (
    ChunkTable,
    Registration,
    chunk_table,
    has_triggers,
    queue_rows,
    require_registration,
)
from pgsim.db.catalog import pin_search_path, require_schema, vector_schema
from pgsim.db.names import MAX_IDENTIFIER_BYTES
from pgsim.encoding.encoder import encoder_for
from pgsim.errors import InvalidInput

log = logging.getLogger(__name__)

CHUNK_COLUMNS = ("chunk_no", "span_start", "span_end", "digest", "embedding")
READERS = "SELECT"
WORKERS = "SELECT, INSERT, DELETE"

# The roles (0: PUBLIC) granted a privilege on the table or on its column, other than the table's owner.
GRANTEES = """
SELECT DISTINCT a.grantee FROM (
    SELECT (pg_catalog.aclexplode(c.relacl)).* FROM pg_catalog.pg_class c WHERE c.oid = %(table)s
    UNION ALL
    SELECT (pg_catalog.aclexplode(t.attacl)).* FROM pg_catalog.pg_attribute t
    WHERE t.attrelid = %(table)s AND t.attname = %(column)s
) AS a
WHERE a.privilege_type = %(privilege)s
  AND a.grantee <> (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = %(table)s)
"""


@contextmanager
def caller_path_kept(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Inside a ``conn.transaction()`` block that pins the search_path: the caller's path back at its end. The
    block is a savepoint when the caller has a transaction open (psycopg's default), and a pinned path would
    outlive it there, until the caller's transaction ends. (After an error, the savepoint's rollback
    restores the path itself.)"""
    row = conn.execute("SELECT pg_catalog.current_setting('search_path')").fetchone()
    yield
    conn.execute("SELECT pg_catalog.set_config('search_path', %s, true)", [row[0] if row else ""])


def fitted_name(stem: str, suffix: str) -> str:
    """``<stem>_<suffix>``, or where that is past PostgreSQL's 63 bytes, the stem cut and a hash of the whole
    name before the suffix, so two long names that share their start still differ."""
    whole = f"{stem}_{suffix}"
    if len(whole.encode()) <= MAX_IDENTIFIER_BYTES:
        return whole
    tail = f"_{hashlib.sha256(whole.encode()).hexdigest()[:8]}_{suffix}"
    return stem.encode()[: MAX_IDENTIFIER_BYTES - len(tail.encode())].decode(errors="ignore") + tail


def chunk_table_name(table_name: str, column: str) -> str:
    return fitted_name(f"{table_name}__{column}", "chunks")


def add_chunks(
    conn: psycopg.Connection[Any], table: str, column: str, chunks: Chunks, *, queue: bool = True
) -> ChunkTable:
    """Chunk the documents of the registered embedding ``table.column``: make its chunk table and queue every
    row with text (unless ``queue`` is false), so the workers fill the chunks and write the column as their mean
    (pgsim.columns.chunking.sync_step). Only the table's owner may; in one transaction, every check first."""
    checked_chunks(chunks, required=True)
    with conn.transaction(), caller_path_kept(conn):
        registration = require_registration(conn, table, column)  # the name as the caller's search_path reads it
        pin_search_path(conn)
        require_schema(conn, "chunking", "chunked embeddings")
        _require_owner(conn, registration)
        encoder = encoder_for(registration.model)
        chunks.check(window(encoder), registration.model)
        if chunk_table(conn, registration) is not None:
            raise InvalidInput(
                f"{registration.table}.{column} is chunked already. Remove its chunks first: "
                f"pgsim.remove_chunks(conn, {registration.table!r}, {column!r})"
            )
        clash = sorted(set(registration.key_columns) & set(CHUNK_COLUMNS))
        if clash:
            raise InvalidInput(
                f"The primary key of {registration.table} has columns named {', '.join(clash)}, which the chunk "
                "table uses for itself; chunking needs a key with other column names."
            )
        name = chunk_table_name(registration.table_name, column)
        taken = relation_oid(conn, registration.schema, name)
        if taken is not None and _left_by_a_dropped_table(conn, registration, taken):
            log.warning("dropping %s.%s, the chunk table of a dropped table of that name", registration.schema, name)
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(registration.schema, name)))
        elif taken is not None and _recorded(conn, taken):  # another column's: a__b.c and a.b__c share the name
            name = fitted_name(f"{registration.table_name}__{column}", f"{_name_hash(registration, column)}_chunks")
        if relation_oid(conn, registration.schema, name) is not None:
            raise InvalidInput(
                f"{registration.schema}.{name} exists already; pgsim makes the chunk table there. Drop or rename it."
            )
        made = ChunkTable(registration.schema, name, chunks.tokens, chunks.overlap)
        _create(conn, registration, made)
        conn.execute(
            "INSERT INTO pgsim.chunking (embedding_id, table_oid, tokens, overlap, chunk_table) "
            "VALUES (%s, %s, %s, %s, pg_catalog.to_regclass(%s))",
            [registration.id, registration.table_oid, chunks.tokens, chunks.overlap, made.table_sql.as_string(conn)],
        )
        for privileges, statement in ((READERS, "SELECT"), (WORKERS, "UPDATE")):
            grant_to_column_grantees(conn, registration, made, privileges, statement)
        remake_triggers(conn, registration)
        if queue:
            queue_rows(conn, registration, only_missing=False)
        recorded = chunk_table(conn, registration)
    assert recorded is not None
    return recorded


def relation_oid(conn: psycopg.Connection[Any], schema: str, name: str) -> int | None:
    row = conn.execute(
        "SELECT pg_catalog.to_regclass(%s)::pg_catalog.oid", [sql.Identifier(schema, name).as_string(conn)]
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _recorded(conn: psycopg.Connection[Any], table_oid: int) -> bool:
    """Whether ``table_oid`` is the chunk table of a registration."""
    row = conn.execute("SELECT EXISTS (SELECT FROM pgsim.chunking WHERE chunk_table = %s::oid)", [table_oid]).fetchone()
    return bool(row and row[0])


def _name_hash(registration: Registration, column: str) -> str:
    return hashlib.sha256(f"{registration.table_name}.{column}".encode()).hexdigest()[:8]


def _left_by_a_dropped_table(conn: psycopg.Connection[Any], registration: Registration, table_oid: int) -> bool:
    """Whether the table ``table_oid`` is the chunk table of a document table dropped with ``CASCADE`` (which
    drops the foreign key and the row-level security policy, not the chunk table): a plain table (no partition,
    no inheritance) of the document table's owner, not recorded for any registration, without a foreign key or
    a policy but with row-level security on, whose columns are the chunk columns and its primary key's (that key
    being its other columns and ``chunk_no``), with the chunk table's HNSW index. Anything else is the user's."""
    row = conn.execute(  # under add_chunks' pinned search_path
        """
        SELECT c.relowner = d.relowner AND c.relrowsecurity AND NOT c.relispartition
          AND NOT EXISTS (SELECT FROM pg_inherits i WHERE i.inhrelid = c.oid OR i.inhparent = c.oid)
          AND NOT EXISTS (SELECT FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'f')
          AND NOT EXISTS (SELECT FROM pg_policy p WHERE p.polrelid = c.oid)
          AND NOT EXISTS (SELECT FROM pgsim.chunking r WHERE r.chunk_table = c.oid)
          AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a
               WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                 AND a.attname <> ALL (%(chunk_columns)s::name[]))
              = (SELECT array_agg(a.attname::text ORDER BY a.attname)
                 FROM pg_constraint k JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = ANY (k.conkey)
                 WHERE k.conrelid = c.oid AND k.contype = 'p' AND a.attname <> 'chunk_no')
          AND (SELECT count(*) FROM pg_attribute a
               WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                 AND a.attname = ANY (%(chunk_columns)s::name[])) = %(chunk_count)s
          AND EXISTS (SELECT FROM pg_constraint k JOIN pg_attribute a ON a.attrelid = k.conrelid
                        AND a.attnum = ANY (k.conkey)
                      WHERE k.conrelid = c.oid AND k.contype = 'p' AND a.attname = 'chunk_no')
          AND EXISTS (SELECT FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_am m ON m.oid = i.relam
                      WHERE x.indrelid = c.oid AND m.amname = 'hnsw' AND i.relname = %(index)s::name)
        FROM pg_class c, pg_class d
        WHERE c.oid = %(table)s::oid AND d.oid = %(documents)s::oid AND c.relkind = 'r'
        """,
        {
            "chunk_columns": list(CHUNK_COLUMNS),
            "chunk_count": len(CHUNK_COLUMNS),
            "index": fitted_name(chunk_table_name(registration.table_name, registration.column), "hnsw"),
            "table": table_oid,
            "documents": registration.table_oid,
        },
    ).fetchone()
    return bool(row and row[0])


def remove_chunks(conn: psycopg.Connection[Any], table: str, column: str) -> None:
    """Undo :func:`add_chunks`: the chunk table and its row in pgsim.chunking. The registration stays, and every
    row with text is queued: the column held its chunks' mean, and the workers write the whole text's vector."""
    with conn.transaction(), caller_path_kept(conn):
        registration = require_registration(conn, table, column)
        pin_search_path(conn)
        _require_owner(conn, registration)
        found = chunk_table(conn, registration)
        if found is None:
            raise InvalidInput(f"{registration.table}.{column} is not chunked.")
        conn.execute("DELETE FROM pgsim.chunking WHERE embedding_id = %s", [registration.id])
        conn.execute(sql.SQL("DROP TABLE {}").format(found.table_sql))
        remake_triggers(conn, registration)
        queue_rows(conn, registration, only_missing=False)


def remake_triggers(conn: psycopg.Connection[Any], registration: Registration) -> None:
    """The registration's triggers made again for what pgsim.chunking says now (a chunked registration queues
    rows written with a vector too: see pgsim.create_triggers). A registration that has none, frozen while a
    model change fills its successor, gets none."""
    if not has_triggers(conn, registration):
        return
    for kind in ("insert", "update", "hide"):
        conn.execute(
            sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                sql.Identifier(f"pgsim_{registration.id}_{kind}"), registration.table_sql
            )
        )
    conn.execute("SELECT pgsim.create_triggers(%s::pg_catalog.int4)", [registration.id])


def require_same_owner(conn: psycopg.Connection[Any], registration: Registration, table: ChunkTable) -> None:
    """Refuse a chunk table whose owner is not the document table's: ``ALTER TABLE ... OWNER TO`` on the
    documents leaves it with the former owner, whose triggers and policy there would run as the worker (and
    as every searching role), and who would read the new owner's chunks."""
    row = conn.execute(
        "SELECT d.relowner OPERATOR(pg_catalog.=) c.relowner, pg_catalog.pg_get_userbyid(d.relowner), "
        "pg_catalog.pg_get_userbyid(c.relowner) FROM pg_catalog.pg_class d, pg_catalog.pg_class c "
        "WHERE d.oid OPERATOR(pg_catalog.=) %s::pg_catalog.oid AND c.oid OPERATOR(pg_catalog.=) %s::pg_catalog.oid",
        [registration.table_oid, table.oid],
    ).fetchone()
    if row is None or not row[0]:
        new_owner, old_owner = (row[1], row[2]) if row else ("?", "?")
        raise InvalidInput(
            f"The chunk table {table.schema}.{table.name} of {registration.table}.{registration.column} belongs to "
            f"role {old_owner!r}, not to {new_owner!r}, the owner of {registration.table}: its owner changed, and "
            "pgsim neither writes nor searches chunks another role controls. Its owner now: "
            f"ALTER TABLE {table.table_sql.as_string(conn)} OWNER TO {sql.Identifier(str(new_owner)).as_string(conn)}"
        )


def _require_owner(conn: psycopg.Connection[Any], registration: Registration) -> None:
    row = conn.execute(
        "SELECT pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE') FROM pg_catalog.pg_class c WHERE c.oid = %s",
        [registration.table_oid],
    ).fetchone()
    if not (row and row[0]):
        raise InvalidInput(f"Only the owner of {registration.table} may change how its documents are chunked.")


def _create(conn: psycopg.Connection[Any], registration: Registration, made: ChunkTable) -> None:
    """The chunk table, owned by the document table's owner, with its index and row-level security."""
    keys = conn.execute(
        "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a "
        "JOIN unnest(%s::text[]) WITH ORDINALITY AS k(name, position) ON k.name = a.attname "
        "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY k.position",
        [list(registration.key_columns), registration.table_oid],
    ).fetchall()
    if len(keys) != len(registration.key_columns):
        raise InvalidInput(f"The key columns of {registration.table} are not all there any more: re-register it.")
    key_list = sql.SQL(", ").join(sql.Identifier(name) for name, _ in keys)
    vector_type = sql.Identifier(vector_schema(conn), registration.column_type)
    conn.execute(
        sql.SQL(
            "CREATE TABLE {chunks} ({key_columns}, chunk_no integer NOT NULL, span_start integer NOT NULL, "
            "span_end integer NOT NULL, digest bytea NOT NULL, embedding {vector}({dimension}) NOT NULL, "
            "PRIMARY KEY ({keys}, chunk_no), FOREIGN KEY ({keys}) REFERENCES {table} ({keys}) "
            "ON DELETE CASCADE ON UPDATE CASCADE)"
        ).format(
            chunks=made.table_sql,
            # format_type under the pinned search_path: a type outside pg_catalog comes schema-qualified
            key_columns=sql.SQL(", ").join(
                sql.SQL("{} {} NOT NULL").format(sql.Identifier(n), sql.SQL(t)) for n, t in keys
            ),
            vector=vector_type,
            dimension=sql.Literal(registration.dimension),
            keys=key_list,
            table=registration.table_sql,
        )
    )
    index = registration.index
    options = sql.SQL(" WITH (m = {}, ef_construction = {})").format(
        sql.Literal(index.m), sql.Literal(index.ef_construction)
    ) if index is not None else sql.SQL("")  # fmt: skip
    conn.execute(
        sql.SQL("CREATE INDEX {} ON {} USING hnsw (embedding {}){}").format(
            sql.Identifier(fitted_name(made.name, "hnsw")),
            made.table_sql,
            sql.Identifier(vector_schema(conn), registration.opclass),
            options,
        )
    )
    # A chunk is visible to whoever may see its document: the document table's row-level security, if any,
    # holds for the chunks (the owner, as for any table, is not subject to it).
    match = sql.SQL(" AND ").join(
        sql.SQL("d.{0} = {1}.{0}").format(sql.Identifier(name), made.table_sql) for name, _ in keys
    )
    conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(made.table_sql))
    conn.execute(
        sql.SQL("CREATE POLICY follow_document ON {} FOR ALL USING (EXISTS (SELECT FROM {} AS d WHERE {}))").format(
            made.table_sql, registration.table_sql, match
        )
    )
    owner = conn.execute(
        "SELECT r.rolname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_roles r ON r.oid = c.relowner WHERE c.oid = %s",
        [registration.table_oid],
    ).fetchone()
    assert owner is not None
    conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(made.table_sql, sql.Identifier(owner[0])))


def grant_to_column_grantees(
    conn: psycopg.Connection[Any], registration: Registration, made: ChunkTable, privileges: str, statement: str
) -> None:
    """``privileges`` on the chunk table to every role granted ``statement`` on the embedding column (or on
    the whole document table)."""
    grantees = conn.execute(
        GRANTEES, {"table": registration.table_oid, "column": registration.column, "privilege": statement}
    ).fetchall()
    for (grantee,) in grantees:
        if int(grantee) == 0:
            role: sql.Composable = sql.SQL("PUBLIC")
        else:
            name = conn.execute("SELECT rolname FROM pg_catalog.pg_roles WHERE oid = %s", [grantee]).fetchone()
            if name is None:
                continue
            role = sql.Identifier(name[0])
        conn.execute(sql.SQL("GRANT {} ON TABLE {} TO {}").format(sql.SQL(privileges), made.table_sql, role))
