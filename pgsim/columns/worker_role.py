"""Which registrations a worker drains, and whether it may, as the role it runs as.

A worker runs code other roles wrote: the registered source expression, the triggers of the table (and of
its partitions and inheritance children, and of pgsim's own tables), with the worker's rights. So:

- A worker drains only what it works for: registrations of tables it owns, or whose embedding column it
  may update (pgsim grant worker). Names are resolved to OIDs; a change under way is followed only into
  another column of the same table.
- Those tables must have one owner, or the owners the worker was told to trust (``owners``): otherwise the
  code of one owner would run with the worker's rights on another owner's table.
- A session that is, or may become (SET ROLE, RESET ROLE), a superuser or BYPASSRLS role refuses tables
  whose code is owned by roles that are neither, unless ``allow_superuser``.

Every query here runs under a pinned search_path: an operator or function another role put on the session's
path would otherwise run inside the very check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from pgsim.columns.registry import Registration, chunk_table, forget_dropped, registrations, require_registration
from pgsim.db.catalog import pin_search_path, resolve_table
from pgsim.errors import InvalidInput

# The registrations the current role works for: it has its table owner's privileges, or may update the
# embedding column (the predicate of pgsim.queue's row-level security, 0005_trusted_reads.sql).
WORKABLE = """
SELECT e.id, o.rolname FROM pgsim.embedding e
JOIN pg_catalog.pg_class c ON c.oid = e.table_oid
JOIN pg_catalog.pg_roles o ON o.oid = c.relowner
LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = e.table_oid AND a.attname = e.column_name
    AND a.attnum > 0 AND NOT a.attisdropped
WHERE pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE')
   OR coalesce(pg_catalog.has_column_privilege(e.table_oid, a.attnum, 'UPDATE'), false)
"""

# For a privileged session (the session user, or a role it may SET ROLE to, is a superuser or BYPASSRLS),
# the roles whose code a drain of %(tables)s runs and who lack those rights: (table, role) pairs. Code is
# what a write to the table runs: the owners of the table, its partitions and inheritance children, their
# trigger functions, the functions and operators their constraints, indexes, defaults and generated columns
# and their columns' domains call, and pgsim's own tables (the worker writes its queue).
UNTRUSTED_CODE = """
WITH RECURSIVE tree(root, relid) AS (
    SELECT t, t FROM pg_catalog.unnest(%(tables)s::pg_catalog.oid[]) AS t
    UNION  -- the chunk tables the worker writes too (pgsim.columns.chunking), under their documents' table
    SELECT c.root, c.relid FROM ROWS FROM (pg_catalog.unnest(%(chunk_roots)s::pg_catalog.oid[]),
                                           pg_catalog.unnest(%(chunk_tables)s::pg_catalog.oid[])) AS c(root, relid)
    UNION
    SELECT tree.root, i.inhrelid FROM tree JOIN pg_catalog.pg_inherits i ON i.inhparent = tree.relid
), expressions(root, classid, objid) AS (
    SELECT tree.root, 'pg_catalog.pg_constraint'::pg_catalog.regclass, k.oid
    FROM tree JOIN pg_catalog.pg_constraint k ON k.conrelid = tree.relid
    UNION
    SELECT tree.root, 'pg_catalog.pg_class'::pg_catalog.regclass, x.indexrelid
    FROM tree JOIN pg_catalog.pg_index x ON x.indrelid = tree.relid
    UNION
    SELECT tree.root, 'pg_catalog.pg_attrdef'::pg_catalog.regclass, d.oid
    FROM tree JOIN pg_catalog.pg_attrdef d ON d.adrelid = tree.relid
    UNION
    SELECT tree.root, 'pg_catalog.pg_constraint'::pg_catalog.regclass, k.oid
    FROM tree JOIN pg_catalog.pg_attribute a ON a.attrelid = tree.relid AND a.attnum > 0
    JOIN pg_catalog.pg_constraint k ON k.contypid = a.atttypid
), called(root, function) AS (
    SELECT e.root, d.refobjid FROM expressions e JOIN pg_catalog.pg_depend d ON d.classid = e.classid
        AND d.objid = e.objid AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
    UNION
    SELECT e.root, o.oprcode::pg_catalog.oid FROM expressions e JOIN pg_catalog.pg_depend d ON d.classid = e.classid
        AND d.objid = e.objid AND d.refclassid = 'pg_catalog.pg_operator'::pg_catalog.regclass
    JOIN pg_catalog.pg_operator o ON o.oid = d.refobjid
    UNION
    SELECT tree.root, g.tgfoid FROM tree JOIN pg_catalog.pg_trigger g ON g.tgrelid = tree.relid
    UNION
    SELECT s.root, s.function
    FROM ROWS FROM (pg_catalog.unnest(%(roots)s::pg_catalog.oid[]),
                    pg_catalog.unnest(%(source_calls)s::pg_catalog.oid[])) AS s(root, function)
), code(root, owner) AS (
    SELECT tree.root, c.relowner FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.relid
    UNION
    SELECT called.root, p.proowner FROM called JOIN pg_catalog.pg_proc p ON p.oid = called.function
    UNION
    SELECT tree.root, n.nspowner FROM tree, pg_catalog.pg_namespace n WHERE n.nspname = 'pgsim'
    UNION
    SELECT tree.root, c.relowner FROM tree, pg_catalog.pg_class c
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pgsim'
)
SELECT DISTINCT code.root::pg_catalog.regclass::pg_catalog.text, o.rolname
FROM code JOIN pg_catalog.pg_roles o ON o.oid = code.owner
WHERE (%(super)s AND NOT o.rolsuper) OR (%(bypass)s AND NOT (o.rolsuper OR o.rolbypassrls))
ORDER BY 1, 2
"""

# Whether the session user, or a role it may become, is a superuser, or may bypass row-level security.
PRIVILEGED_SESSION = """
SELECT coalesce(pg_catalog.bool_or(r.rolsuper), false),
       coalesce(pg_catalog.bool_or(r.rolsuper OR r.rolbypassrls), false)
FROM pg_catalog.pg_roles r WHERE pg_catalog.pg_has_role(SESSION_USER, r.oid, 'MEMBER')
"""

# The functions and operators' functions a source expression calls, from a throwaway view's dependencies.
SOURCE_CALLS = """
SELECT DISTINCT coalesce(o.oprcode::pg_catalog.oid, d.refobjid) FROM pg_catalog.pg_depend d
JOIN pg_catalog.pg_rewrite r ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = r.oid
LEFT JOIN pg_catalog.pg_operator o ON d.refclassid = 'pg_catalog.pg_operator'::pg_catalog.regclass
    AND o.oid = d.refobjid
WHERE r.ev_class = 'pg_temp.pgsim_source_calls'::pg_catalog.regclass
  AND d.refclassid IN ('pg_catalog.pg_proc'::pg_catalog.regclass, 'pg_catalog.pg_operator'::pg_catalog.regclass)
"""


def worker_targets(
    conn: psycopg.Connection[Any],
    table: str | None,
    column: str | None,
    *,
    owners: Sequence[str] | None = None,
    allow_superuser: bool = False,
) -> list[Registration]:
    """The registrations a drain of ``table.column`` (or of everything) takes, checked as above."""
    with conn.transaction():
        pin_search_path(conn)
        forget_dropped(conn)
        workable = dict(conn.execute(WORKABLE).fetchall())
        every = [r for r in registrations(conn) if r.id in workable]
        if table is None:
            targets = every
        elif column is not None:
            chosen = require_registration(conn, table, column)
            if chosen.id not in workable:
                raise InvalidInput(f"This role does not work for {chosen.table} (pgsim grant worker ROLE).")
            targets = [r for r in every if r.id == chosen.id or _replaces(r, chosen)]
        else:
            oid = resolve_table(conn, table).oid
            targets = [r for r in every if r.table_oid == oid]
            if not targets:
                raise InvalidInput(
                    f"Table {table!r} has no registered embedding column that this role works for "
                    "(pgsim add-embedding; pgsim grant worker ROLE)."
                )
        if owners is not None:
            targets = [r for r in targets if workable[r.id] in owners]
        elif not allow_superuser and len({workable[r.id] for r in targets}) > 1:
            listed = ", ".join(sorted({f"{r.table} (owner {workable[r.id]})" for r in targets}))
            raise InvalidInput(
                f"This worker works for tables of several owners: {listed}. The source or triggers of one owner's "
                "table would run with its rights on the others'. Say whose tables it keeps in sync: "
                "owners=[...] (pgsim worker --owner ROLE), or run one worker role per owner."
            )
        if not allow_superuser:
            _refuse_untrusted_code(conn, targets)
    return targets


def _replaces(registration: Registration, chosen: Registration) -> bool:
    """A change under way of ``chosen``: another column of the same table."""
    return registration.replaces == chosen.id and registration.table_oid == chosen.table_oid


def _refuse_untrusted_code(conn: psycopg.Connection[Any], targets: list[Registration]) -> None:
    row = conn.execute(PRIVILEGED_SESSION).fetchone()
    super_, bypass = row if row else (False, False)
    if not (super_ or bypass):
        return  # the code runs with no rights its owners lack
    roots, calls = [], []
    chunked = [(r.table_oid, found.oid) for r in targets if (found := chunk_table(conn, r)) is not None]
    for registration in targets:
        for function in _source_calls(conn, registration):
            roots.append(registration.table_oid)
            calls.append(function)
    rows = conn.execute(
        UNTRUSTED_CODE,
        {"tables": [r.table_oid for r in targets], "roots": roots, "source_calls": calls, "super": super_,
         "bypass": bypass, "chunk_roots": [root for root, _ in chunked],
         "chunk_tables": [table for _, table in chunked]},
    ).fetchall()  # fmt: skip
    if rows:
        listed = ", ".join(f"{table} ({role})" for table, role in rows)
        raise InvalidInput(
            "This worker's session is, or may become (SET ROLE), a superuser or BYPASSRLS role, and a drain "
            f"would run code of roles that are not with those rights: {listed} (source expressions, triggers, "
            "constraints, pgsim's own tables). Run it as a worker role that logs in as itself (pgsim grant "
            "worker ROLE; see the docs' security page) or as the table's owner, or pass allow_superuser=True "
            "(pgsim worker --allow-superuser) if you trust those roles as superusers."
        )


def _source_calls(conn: psycopg.Connection[Any], registration: Registration) -> list[int]:
    """The functions (and operators' functions) ``registration``'s source calls, as the workers bind it."""
    try:
        with conn.transaction() as probe:
            conn.execute(
                sql.SQL("CREATE TEMP VIEW pgsim_source_calls AS SELECT {} AS source FROM {}").format(
                    registration.source_sql, registration.table_sql
                )
            )
            found = [int(oid) for (oid,) in conn.execute(SOURCE_CALLS).fetchall()]
            raise psycopg.Rollback(probe)
    except (psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedFunction):
        return []  # a source that no longer binds (a column dropped after a change of source) runs nothing
    return found


def qualified_table(conn: psycopg.Connection[Any], table: str | None) -> str | None:
    """``table`` as ``schema.table``, resolved on the session's search_path with pg_catalog put first (so
    that only the table's name, and no operator or function, can come from a schema another role writes);
    done before a drain pins the path to pg_catalog alone."""
    if table is None:
        return None
    with conn.transaction():
        row = conn.execute("SELECT pg_catalog.current_setting('search_path')").fetchone()
        path = f"pg_catalog, {row[0]}" if row and row[0].strip() else "pg_catalog"
        conn.execute("SELECT pg_catalog.set_config('search_path', %s, true)", [path])
        return resolve_table(conn, table).qualified
