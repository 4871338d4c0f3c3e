"""The SQLAlchemy URL of pgsim's database: ``$PGSIM_DSN``, a DSN you pass, or the embedded server."""

from __future__ import annotations

from sqlalchemy.engine import URL


def database_url(dsn: str | None = None, *, data_dir: str | None = None) -> URL:
    """A ``postgresql+psycopg`` URL for ``dsn``, else ``$PGSIM_DSN``, else pgsim's embedded server (started
    if needed). ``create_async_engine`` takes the same URL and uses psycopg's async driver."""
    from psycopg.conninfo import conninfo_to_dict

    from pgsim.db.connection import resolve_dsn

    params = conninfo_to_dict(resolve_dsn(dsn, data_dir))
    # every other libpq parameter (host, port, sslmode, sslrootcert, options, connect_timeout, ...) rides in
    # the query string, which SQLAlchemy's psycopg dialect hands to psycopg.connect as it is
    query = {key: str(value) for key, value in params.items() if key not in ("user", "password", "dbname") and value}
    return URL.create(
        "postgresql+psycopg",
        username=str(params["user"]) if params.get("user") else None,
        password=str(params["password"]) if params.get("password") else None,
        database=str(params["dbname"]) if params.get("dbname") else None,
        query=query,
    )
