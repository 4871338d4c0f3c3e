"""pgsim's own schema as Alembic revisions (the ``pgsim`` branch in ``pgsim/alembic/migrations/versions``).

Revision ``pgsim_0001`` applies the numbered file ``sql/0001_tables.sql``; ``pgsim_0002`` the numbered files
after it, then the function files, so that it brings the schema up to the package's. Both go through the
same ledger as ``pgsim install``: online on a psycopg connection with :func:`pgsim.db.schema.install`
(which also refuses a changed numbered file), otherwise as the guarded script of
:func:`pgsim.db.schema.install_script` (offline ``--sql``, other drivers). Whichever route runs second finds
the files in the ledger and does nothing.
"""

from __future__ import annotations

from typing import Any


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
    """Drop what pgsim's function files made (the triggers of registered columns with ``pgsim.enqueue``) and
    remove the files from the ledger."""
    from alembic import op

    from pgsim.db.schema import drop_functions_script

    op.execute(drop_functions_script())
