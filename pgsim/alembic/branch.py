"""pgsim's own schema as Alembic revisions (the ``pgsim`` branch in ``pgsim/alembic/migrations/versions``).

Each revision applies one numbered ``sql/`` file through the same ledger as ``pgsim install``: online on a
psycopg connection with :func:`pgsim.install.install` (which also refuses a changed file), otherwise as the
guarded script of :func:`pgsim.install.install_script` (offline ``--sql``, other drivers). Whichever route
runs second finds the file in the ledger and does nothing.
"""

from __future__ import annotations

from typing import Any


def version_location() -> str:
    """The directory to add to Alembic's ``version_locations`` (``pgsim.alembic:migrations/versions`` names it
    too)."""
    from importlib import resources

    return str(resources.files("pgsim.alembic") / "migrations" / "versions")


def upgrade_to(file_number: str | None) -> None:
    """Apply pgsim's SQL files up to ``file_number`` (``"0002"``; None: all) in the running migration."""
    import psycopg
    from alembic import context, op

    from pgsim.db.schema import install, install_script

    if context.is_offline_mode():
        op.execute(install_script(upto=file_number, only_last=file_number is not None))
        return
    raw: Any = op.get_bind().connection.driver_connection
    if isinstance(raw, psycopg.Connection):
        install(raw, upto=file_number)
    else:
        op.execute(install_script(upto=file_number))
