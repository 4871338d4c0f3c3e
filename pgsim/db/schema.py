"""Install and upgrade pgsim's schema: apply the numbered SQL files once each, recorded in a ledger.

Everything happens in one transaction under a transaction-scoped advisory lock, so two installers that
start together run one after the other and the second finds nothing left to do. A file already applied
whose text has changed since is refused: released files are append-only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors, sql

from pgsim.db.sqlfiles import SqlFile, sql_files
from pgsim.errors import ExtensionMissing, InstallError

# pg_advisory_xact_lock takes a bigint; this one is pgsim's ("pgsim" in ASCII).
ADVISORY_LOCK_KEY = 0x7067_7369_6D
LEDGER = """
CREATE SCHEMA IF NOT EXISTS pgsim;
CREATE TABLE IF NOT EXISTS pgsim.migration (
    name text PRIMARY KEY,
    sha256 text NOT NULL,
    package_version text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass
class InstallReport:
    applied: list[str] = field(default_factory=list)
    already_applied: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.applied)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pgsim")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def install(conn: psycopg.Connection[Any], *, upto: str | None = None) -> InstallReport:
    """Create or upgrade schema ``pgsim`` in the connected database. Safe to run any number of times.
    ``upto`` (a file name, or its number such as ``"0002"``) stops after that file."""
    files = sql_files()
    chosen = files_upto(upto)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [ADVISORY_LOCK_KEY])
        vector_schema = _ensure_vector_extension(conn)
        conn.execute(LEDGER.encode())
        ledger = dict(conn.execute("SELECT name, sha256 FROM pgsim.migration").fetchall())
        _check_ledger(ledger, files)
        # SET LOCAL outlives a savepoint until the caller's transaction ends: put the caller's path back after.
        saved = conn.execute("SELECT current_setting('search_path')").fetchone()
        conn.execute(sql.SQL("SET LOCAL search_path = pgsim, {}, pg_catalog").format(sql.Identifier(vector_schema)))
        report = InstallReport()
        for file in chosen:
            if file.name in ledger:
                report.already_applied.append(file.name)
                continue
            _apply(conn, file)
            report.applied.append(file.name)
        conn.execute("SELECT set_config('search_path', %s, true)", [saved[0] if saved else ""])
    return report


def files_upto(upto: str | None = None) -> list[SqlFile]:
    """The SQL files in order, up to and including ``upto`` (a name or its four-digit number)."""
    files = sql_files()
    if upto is None:
        return files
    chosen = [file for file in files if file.name == upto or file.name.split("_", 1)[0] == upto]
    if not chosen:
        raise InstallError(f"No pgsim SQL file {upto!r}; the files are {', '.join(f.name for f in files)}.")
    return files[: files.index(chosen[0]) + 1]


def install_script(upto: str | None = None, vector_schema: str = "public", *, only_last: bool = False) -> str:
    """The install as one SQL script, for offline migrations (``alembic upgrade --sql``): each file runs only
    where the ledger does not list it yet, so the script and ``pgsim install`` share the ledger.
    ``only_last`` renders the file ``upto`` names alone (an Alembic revision's own file)."""
    parts = [
        "CREATE EXTENSION IF NOT EXISTS vector;",
        LEDGER.strip(),
        f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY});",
    ]
    guarded = sql.SQL(
        "DO $pgsim$\nDECLARE\n    saved text := current_setting('search_path');\nBEGIN\n"
        "    IF NOT EXISTS (SELECT 1 FROM pgsim.migration WHERE name = {name}) THEN\n"
        "        PERFORM set_config('search_path', {path}, true);\n"
        "        EXECUTE {text};\n"
        "        INSERT INTO pgsim.migration (name, sha256, package_version) VALUES ({name}, {sha256}, {version});\n"
        "        PERFORM set_config('search_path', saved, true);\n"
        "    END IF;\nEND\n$pgsim$;"
    )
    chosen = files_upto(upto)
    for file in chosen[-1:] if only_last else chosen:
        if "$pgsim$" in file.text:
            raise InstallError(f"pgsim SQL file {file.name} contains $pgsim$, which the offline script quotes with.")
        statement = guarded.format(
            name=sql.Literal(file.name),
            path=sql.Literal(f"pgsim, {sql.Identifier(vector_schema).as_string()}, pg_catalog"),
            text=sql.Literal(file.text),
            sha256=sql.Literal(file.sha256),
            version=sql.Literal(package_version()),
        )
        parts.append(statement.as_string())
    return "\n\n".join(parts) + "\n"


def applied_files(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    """(name, package version) of every applied file; empty when pgsim is not installed."""
    if conn.execute("SELECT to_regclass('pgsim.migration')").fetchone() == (None,):
        return []
    rows = conn.execute("SELECT name, package_version FROM pgsim.migration ORDER BY name").fetchall()
    return [(name, version) for name, version in rows]


def _ensure_vector_extension(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'vector'").fetchone()
    if row is not None:
        return str(row[0]).strip('"')
    database, role = conn.execute("SELECT current_database(), current_user").fetchone() or ("?", "?")
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    except errors.InsufficientPrivilege:
        raise ExtensionMissing(
            f"The pgvector extension is not installed in database {database!r}, and role {role!r} may not "
            f"create it. Ask an administrator to run, in database {database!r}:  CREATE EXTENSION vector;  "
            "then run pgsim install again."
        ) from None
    except (errors.UndefinedFile, errors.FeatureNotSupported) as exc:
        raise ExtensionMissing(
            f"This PostgreSQL server has no pgvector ({exc.diag.message_primary}). Install pgvector 0.8 or "
            "newer on the server (https://github.com/pgvector/pgvector#installation), or use pgsim's "
            "embedded server by leaving out --dsn."
        ) from None
    return _ensure_vector_extension(conn)


def _check_ledger(ledger: dict[str, str], files: list[SqlFile]) -> None:
    known = {file.name: file for file in files}
    for name, digest in sorted(ledger.items()):
        file = known.get(name)
        if file is None:
            raise InstallError(
                f"This database has pgsim SQL file {name} applied, which this pgsim package does not ship: "
                "it was installed by a newer pgsim. Upgrade the pgsim package (pip install -U pgsim)."
            )
        if file.sha256 != digest:
            raise InstallError(
                f"pgsim SQL file {name} was applied with sha256 {digest[:12]}…, but the packaged file now has "
                f"{file.sha256[:12]}…. Applied files must never change: restore {name} as it was released and put "
                "the change in a new numbered file."
            )


def _apply(conn: psycopg.Connection[Any], file: SqlFile) -> None:
    try:
        conn.execute(file.text.encode())
    except psycopg.Error as exc:
        raise InstallError(f"pgsim SQL file {file.name} failed: {exc}".strip()) from exc
    conn.execute(
        "INSERT INTO pgsim.migration (name, sha256, package_version) VALUES (%s, %s, %s)",
        [file.name, file.sha256, package_version()],
    )
