"""pgsim's own schema as Alembic revisions (the ``pgsim`` branch in ``pgsim/alembic/migrations/versions``).

Revision ``pgsim_0001`` applies the numbered file ``sql/0001_tables.sql``; ``pgsim_0002`` the numbered files
after it, then the function files, so that it brings the schema up to the package's. Both go through the
same ledger as ``pgsim install``: online on a psycopg connection with :func:`pgsim.db.schema.install`
(which also refuses a changed numbered file), otherwise as the guarded script of
:func:`pgsim.db.schema.install_script` (offline ``--sql``, other drivers). Whichever route runs second finds
the files in the ledger and does nothing.

Going down never takes pgsim from under a registered column: pgsim's schema serves every application of the
database, each with its own Alembic history, so ``pgsim@base`` (drop schema ``pgsim``), ``pgsim@pgsim_0001``
(drop its functions, and with them every registered column's triggers) and ``op.uninstall_pgsim()`` change
nothing while an embedding column of any table is registered, and warn (:func:`unless_registered`).
"""

from __future__ import annotations

import logging
from typing import Any

from psycopg import sql

log = logging.getLogger(__name__)

# The registered columns of tables that exist ("schema.table.column"), or NULL: what keeps pgsim installed.
REGISTERED = """SELECT pg_catalog.string_agg(pg_catalog.format('%s.%I', e.table_oid::regclass, e.column_name), ', '
    ORDER BY e.id) FROM pgsim.embedding e JOIN pg_catalog.pg_class c ON c.oid = e.table_oid"""
HINT = "Remove those embeddings first (op.drop_embedding, pgsim remove-embedding TABLE COLUMN) to remove pgsim too."
# A statement that removes pgsim (or part of it), run only while no column is registered. pgsim's deferred
# constraints are checked first: a registration removed earlier in the transaction leaves trigger events
# that would refuse DROP TABLE pgsim.embedding ("pending trigger events").
GUARDED = """DO $pgsim_guard$
DECLARE
    registered text;
    deferred record;
BEGIN
    IF pg_catalog.to_regclass('pgsim.embedding') IS NOT NULL THEN
        registered := ({registered});
    END IF;
    IF registered IS NOT NULL THEN
        RAISE WARNING 'pgsim: % skipped: pgsim stays, embedding columns are registered: %', {what}, registered
            USING HINT = {hint};
        RETURN;
    END IF;
    FOR deferred IN SELECT con.conname FROM pg_catalog.pg_constraint con
                    WHERE con.connamespace = pg_catalog.to_regnamespace('pgsim') AND con.condeferrable LOOP
        EXECUTE pg_catalog.format('SET CONSTRAINTS pgsim.%I IMMEDIATE', deferred.conname);
    END LOOP;
    EXECUTE {statement};
END
$pgsim_guard$"""


def version_location() -> str:
    """The directory to add to Alembic's ``version_locations`` (``pgsim.alembic:migrations/versions`` names it
    too)."""
    from importlib import resources

    return str(resources.files("pgsim.alembic") / "migrations" / "versions")


def upgrade_to(file_number: str | None, *, after: str | None = None) -> None:
    """Apply pgsim's SQL files in the running migration: the numbered files up to ``file_number``
    (``"0001"``), or with None all of them and then the function files. An offline script (``--sql``) leaves
    out the numbered files up to ``after``, which an earlier revision rendered."""
    import psycopg
    from alembic import context, op

    from pgsim.db.schema import install, install_script

    if context.is_offline_mode():
        op.execute(install_script(upto=file_number, after=after))
        return
    raw: Any = op.get_bind().connection.driver_connection
    if isinstance(raw, psycopg.Connection):
        install(raw, upto=file_number)
    else:
        op.execute(install_script(upto=file_number))


def downgrade_functions() -> None:
    """Drop what pgsim's function files made and remove the files from the ledger, unless a column is
    registered (its triggers call ``pgsim.enqueue``, and would go with it)."""
    from pgsim.db.schema import drop_functions_script

    unless_registered(drop_functions_script().strip().removesuffix(";"), "dropping pgsim's functions")


def downgrade_schema() -> None:
    """Drop schema ``pgsim`` (the ``vector`` extension stays: other tables may use it), unless a column is
    registered."""
    unless_registered("DROP SCHEMA IF EXISTS pgsim CASCADE", "dropping schema pgsim")


def unless_registered(statement: str, what: str) -> None:
    """Run ``statement`` (one statement that removes pgsim or part of it) in the running migration only
    while no embedding column of an existing table is registered; otherwise log a warning that names them,
    and change nothing. Offline, the script makes the same check when it runs (a DO block that raises a
    WARNING instead)."""
    from alembic import context, op

    if not context.is_offline_mode():
        from sqlalchemy import text

        bind = op.get_bind()
        if bind.execute(text("SELECT pg_catalog.to_regclass('pgsim.embedding')")).scalar() is not None:
            registered = bind.execute(text(REGISTERED)).scalar()
            if registered is not None:
                log.warning("%s skipped: pgsim stays, embedding columns are registered: %s. %s", what, registered,
                            HINT)  # fmt: skip
                return
    op.execute(guarded(statement, what))


def guarded(statement: str, what: str) -> str:
    """``statement`` in a DO block that runs it only while no column is registered (see GUARDED)."""
    return (
        sql.SQL(GUARDED)
        .format(
            registered=sql.SQL(REGISTERED),
            what=sql.Literal(what),
            hint=sql.Literal(HINT),
            statement=sql.Literal(statement),
        )
        .as_string(None)
    )
