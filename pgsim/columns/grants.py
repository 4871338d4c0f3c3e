"""Least-privilege roles for a shared database: the GRANTs each kind of role needs, run by pgsim.

- ``search``: an application role that searches. USAGE on schema pgsim and SELECT on its registry, query
  banks and sync status; reading the searched tables stays the table owner's grant (``tables`` adds SELECT
  on those tables).
- ``worker``: a role that keeps registrations in sync, and no more. The queue and dead letters (row-level
  security limits it to the tables it works for), the content-hash cache, and on each registered table
  SELECT of the key and source columns and UPDATE of the embedding column only. On a table with row-level
  security, a policy that shows the worker every row: a row the worker cannot see cannot be embedded.
- ``register``: a table owner who is not pgsim's owner and adds embeddings to its own tables (row-level
  security on the registry limits each owner to its own tables).

pgsim's objects are granted by pgsim's owner, a table's privileges by the table's owner: run as a role
that is both, one call does all; otherwise each runs it for what it owns, and at least one part must apply.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import psycopg
from psycopg import sql

from pgsim.columns.registry import Registration, chunk_table, registrations
from pgsim.db.catalog import has_schema_table, pinned_path, require_schema, resolve_table
from pgsim.errors import InvalidInput

log = logging.getLogger(__name__)

Kind = Literal["search", "worker", "register"]
KINDS: tuple[Kind, ...] = ("search", "worker", "register")

_READ = "SELECT"
_WRITE = "SELECT, INSERT, UPDATE, DELETE"
_CHUNK_WORKER = "SELECT, INSERT, DELETE"  # a worker replaces a document's chunks: deletes them, inserts the new
PGSIM_PRIVILEGES: dict[Kind, tuple[tuple[str, str], ...]] = {
    "search": (
        ("embedding", _READ),
        ("query_bank", _READ),
        ("sync_status", _READ),
        ("calibration", _READ),
        ("chunking", _READ),
    ),
    "worker": (
        ("embedding", _READ),
        ("chunking", _READ),
        ("sync_status", _READ),
        ("queue", _WRITE),
        ("dead_letter", _WRITE),
        ("embedding_cache", "SELECT, INSERT"),
    ),
    "register": (
        ("embedding", _WRITE),
        ("query_bank", _READ),
        ("sync_status", _READ),
        ("queue", _WRITE),
        ("dead_letter", _WRITE),
        ("embedding_cache", "SELECT, INSERT"),
        ("calibration", _WRITE),
        ("chunking", _WRITE),
    ),
}


def grant(conn: psycopg.Connection[Any], kind: Kind, role: str, *, tables: Sequence[str] | None = None) -> list[str]:
    """Give ``role`` what a ``kind`` role needs (see the module's text); the statements run, in order.
    ``tables``: for ``worker``, the registered tables it works for (default: every registered table the
    current role owns); for ``search``, tables it may then read (default: none). Run it again after
    registering more tables; it changes nothing that is already granted."""
    return _apply(conn, kind, role, tables, revoke=False)


def revoke(conn: psycopg.Connection[Any], kind: Kind, role: str, *, tables: Sequence[str] | None = None) -> list[str]:
    """Undo :func:`grant` for ``role``: the same privileges taken back (USAGE on schema pgsim too, which
    every kind shares: grant a role's other kind again after), the worker's policies dropped."""
    return _apply(conn, kind, role, tables, revoke=True)


# Catalog reads here are fully qualified, their parameters cast (the rule in pgsim.db.catalog): they run with
# the rights of a table's or pgsim's owner, on whatever search_path the caller's session has.
TABLE_OWNER = "SELECT relowner FROM pg_catalog.pg_class WHERE oid OPERATOR(pg_catalog.=) %s::pg_catalog.oid"
PGSIM_OWNER = (
    "SELECT nspowner FROM pg_catalog.pg_namespace WHERE nspname OPERATOR(pg_catalog.=) 'pgsim'::pg_catalog.name"
)
ROLE_EXISTS = "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) %s::pg_catalog.name"


def _apply(
    conn: psycopg.Connection[Any], kind: Kind, role: str, tables: Sequence[str] | None, *, revoke: bool
) -> list[str]:
    if kind not in KINDS:
        raise InvalidInput(f"Unknown kind of role {kind!r}; pgsim grants {', '.join(KINDS)}.")
    usage = conn.execute(
        "SELECT pg_catalog.has_schema_privilege(CURRENT_USER, 'pgsim'::pg_catalog.text, 'USAGE'::pg_catalog.text)"
    ).fetchone()
    if not (usage and usage[0]):
        raise InvalidInput(
            "The current role may not use schema pgsim: run this as pgsim's owner, or as a table's owner that "
            "pgsim's owner made a register role (pgsim grant register ROLE)."
        )
    require_schema(conn, "queue", f"pgsim {'revoke' if revoke else 'grant'}")
    if conn.execute(ROLE_EXISTS, [role]).fetchone() is None:
        raise InvalidInput(f"There is no role {role!r}; create it first (CREATE ROLE).")
    statements: list[sql.Composed] = []
    owns_pgsim = _owns(conn, PGSIM_OWNER)
    if owns_pgsim:
        statements += _pgsim_statements(kind, role, revoke, has_schema_table(conn, "chunking"))
    table_statements = _table_statements(conn, kind, role, tables, revoke)
    if not owns_pgsim and not table_statements:
        raise InvalidInput(
            "Nothing to grant as this role: pgsim's objects are granted by the owner of schema pgsim, and a "
            "table's privileges by the table's owner. Run this as one of them."
        )
    if not owns_pgsim:
        log.info("not the owner of schema pgsim: its objects are left to that owner to grant")
    texts = [statement.as_string(conn) for statement in statements + table_statements]
    with conn.transaction():
        for statement in statements + table_statements:
            conn.execute(statement)
    return texts


def _pgsim_statements(kind: Kind, role: str, revoke: bool, chunking_installed: bool) -> list[sql.Composed]:
    grantee = sql.Identifier(role)
    schema = _grant(revoke, sql.SQL("USAGE"), sql.SQL("SCHEMA {}").format(sql.Identifier("pgsim")), grantee)
    objects = [
        _grant(revoke, sql.SQL(privileges), sql.SQL("TABLE {}").format(sql.Identifier("pgsim", name)), grantee)
        for name, privileges in PGSIM_PRIVILEGES[kind]
        if name != "chunking" or chunking_installed
    ]
    return [*objects, schema] if revoke else [schema, *objects]


def _table_statements(
    conn: psycopg.Connection[Any], kind: Kind, role: str, tables: Sequence[str] | None, revoke: bool
) -> list[sql.Composed]:
    grantee = sql.Identifier(role)
    if kind == "search":
        statements: list[sql.Composed] = []
        for table in tables or ():
            found = resolve_table(conn, table)
            _require_owner(conn, found.oid, found.qualified)
            statements.append(_grant(revoke, sql.SQL("SELECT"), sql.SQL("TABLE {}").format(found.identifier), grantee))
            for registration in registrations(conn):  # the chunks of the table's chunked embeddings too
                chunks = chunk_table(conn, registration) if registration.table_oid == found.oid else None
                if chunks is not None:
                    on = sql.SQL("TABLE {}").format(chunks.table_sql)
                    statements.append(_grant(revoke, sql.SQL("SELECT"), on, grantee))
        return statements
    if kind == "register" or tables == []:
        return []
    statements = []
    for registration in _worked_for(conn, tables):
        on = sql.SQL("TABLE {}").format(registration.table_sql)
        read = dict.fromkeys([*registration.key_columns, *registration.source_columns, registration.column])
        statements += [
            _grant(revoke, sql.SQL("SELECT ({})").format(sql.SQL(", ").join(map(sql.Identifier, read))), on, grantee),
            _grant(revoke, sql.SQL("UPDATE ({})").format(sql.Identifier(registration.column)), on, grantee),
        ]
        chunks = chunk_table(conn, registration)
        if chunks is not None:
            on_chunks = sql.SQL("TABLE {}").format(chunks.table_sql)
            statements.append(_grant(revoke, sql.SQL(_CHUNK_WORKER), on_chunks, grantee))
        statements += _worker_policies(conn, registration, role, revoke)
    return statements


def _worked_for(conn: psycopg.Connection[Any], tables: Sequence[str] | None) -> list[Registration]:
    """The registrations a worker grant covers: of ``tables`` (the current role must own them), or of every
    registered table the current role owns."""
    if tables is None:
        return [r for r in registrations(conn) if _owns(conn, TABLE_OWNER, r.table_oid)]
    chosen: list[Registration] = []
    for table in tables:
        found = resolve_table(conn, table)
        _require_owner(conn, found.oid, found.qualified)
        of_table = [r for r in registrations(conn) if r.table_oid == found.oid]
        if not of_table:
            raise InvalidInput(
                f"{found.qualified} has no registered embedding column to work for (pgsim add-embedding)."
            )
        chosen += of_table
    return chosen


def _worker_policies(
    conn: psycopg.Connection[Any], registration: Registration, role: str, revoke: bool
) -> list[sql.Composed]:
    """On a table with row-level security: policies that let the worker see and update every row. They are
    named after the role's OID (role names can be longer than a policy name), and only a policy for exactly
    that role with ``USING (true)`` counts as pgsim's: anything else of that name is left alone."""
    secured = conn.execute(
        "SELECT relrowsecurity FROM pg_catalog.pg_class WHERE oid OPERATOR(pg_catalog.=) %s::pg_catalog.oid",
        [registration.table_oid],
    ).fetchone()
    if not (secured and secured[0]):
        return []
    statements: list[sql.Composed] = []
    for command, clause in (("SELECT", "USING (true)"), ("UPDATE", "USING (true) WITH CHECK (true)")):
        with pinned_path(conn):  # ||, = on arrays and text: pg_catalog's only
            row = conn.execute(
                "SELECT 'pgsim_worker_' || r.oid || '_' || %(command)s::text, EXISTS (SELECT 1 FROM pg_policy p "
                "WHERE p.polrelid = %(table)s::oid AND p.polname = ('pgsim_worker_' || r.oid || '_' || "
                "%(command)s::text)::name AND p.polroles = ARRAY[r.oid] AND pg_get_expr(p.polqual, p.polrelid) = "
                "'true'::text) FROM pg_roles r WHERE r.rolname = %(role)s::name",
                {"command": command.lower(), "table": registration.table_oid, "role": role},
            ).fetchone()
        assert row is not None  # the role was checked to exist
        name, ours = row
        if revoke and ours:
            statements.append(sql.SQL("DROP POLICY {} ON {}").format(sql.Identifier(name), registration.table_sql))
        elif not revoke and not ours:
            statements.append(
                sql.SQL("CREATE POLICY {} ON {} FOR {} TO {} {}").format(
                    sql.Identifier(name),
                    registration.table_sql,
                    sql.SQL(command),
                    sql.Identifier(role),
                    sql.SQL(clause),
                )  # fmt: skip
            )
    return statements


def _grant(revoke: bool, privileges: sql.Composable, on: sql.Composable, grantee: sql.Identifier) -> sql.Composed:
    if revoke:
        return sql.SQL("REVOKE {} ON {} FROM {}").format(privileges, on, grantee)
    return sql.SQL("GRANT {} ON {} TO {}").format(privileges, on, grantee)


def _owns(conn: psycopg.Connection[Any], owner_query: str, *params: Any) -> bool:
    """Whether the current role has the privileges of the owner that ``owner_query`` returns."""
    row = conn.execute(
        f"SELECT pg_catalog.pg_has_role(CURRENT_USER, ({owner_query}), 'USAGE')", list(params)
    ).fetchone()
    return bool(row and row[0])


def _require_owner(conn: psycopg.Connection[Any], oid: int, name: str) -> None:
    if not _owns(conn, TABLE_OWNER, oid):
        raise InvalidInput(f"Only the owner of {name} may grant privileges on it; run this as that role.")
