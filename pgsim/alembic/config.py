"""Alembic configuration helpers."""

from __future__ import annotations


def ini_url(dsn: str | None = None) -> str:
    """The SQLAlchemy URL of ``dsn``, else ``$PGSIM_DSN``, else pgsim's embedded server (started if needed),
    escaped for ``alembic.ini`` and ``config.set_main_option`` (which read ``%`` as interpolation)."""
    from pgsim.sqlalchemy.url import database_url

    return database_url(dsn).render_as_string(hide_password=False).replace("%", "%%")
