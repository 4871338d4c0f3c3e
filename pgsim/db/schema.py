"""Install and upgrade pgsim's schema from its SQL files (see :mod:`pgsim.db.sqlfiles`), recorded in a ledger.

Everything happens in one transaction under a transaction-scoped advisory lock, so two installers that
start together run one after the other and the second finds nothing left to do.

- Numbered files run once each, in order. One already applied whose text has changed since is refused:
  released files never change.
- Then every function file whose text differs from the one the ledger recorded runs. CREATE OR REPLACE
  keeps a function's identity, so the triggers and grants that use it stay. Before the file runs, the
  overloads of its name are marked with a setting (``pgsim.stale``); CREATE OR REPLACE gives a function
  exactly the settings its statement names, so an overload still marked afterwards is one the file no
  longer makes, and it is dropped: a changed signature leaves no old overload behind. The ledger records
  what each function file made (``objects``); what a file that is no longer shipped made is dropped.
- Function files run with search_path ``pg_catalog, pg_temp`` (``PINNED_PATH``), as their functions do,
  so nothing in them binds to an object another role made (in public, say). ``@extschema:vector@`` in an
  SQL file is the vector extension's schema (:meth:`SqlFile.render`); the ledger hashes the file as shipped.
- A database installed before the numbered files were squashed lists the old files in its ledger; there
  they are replaced by the squashed files, which make the same tables (``SQUASHES``), and the function
  files then apply as on any database.

:func:`install` does this on a connection; :func:`install_script` renders it as one SQL script for offline
migrations (``alembic upgrade --sql``), in which the function-file steps are the same DO blocks, so the
two routes share the ledger.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.abc import Traversable
from typing import Any

import psycopg
from psycopg import errors, sql

from pgsim.db.sqlfiles import FUNCTIONS, SQUASHES, SqlFile, Squash, function_files, sql_files
from pgsim.errors import ExtensionMissing, InstallError

# The search_path every pgsim function pins, and the installer's (numbered files aside): nothing on it is
# another role's. SET_PATH sets a path until the transaction ends.
PINNED_PATH = "pg_catalog, pg_temp"
SET_PATH = "SELECT pg_catalog.set_config('search_path', %s, true)"
# pg_advisory_xact_lock takes a bigint; this one is pgsim's ("pgsim" in ASCII).
ADVISORY_LOCK_KEY = 0x7067_7369_6D
LEDGER = """
CREATE SCHEMA IF NOT EXISTS pgsim;
CREATE TABLE IF NOT EXISTS pgsim.migration (
    name text PRIMARY KEY,
    sha256 text NOT NULL,
    package_version text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    objects text[]  -- what a function file made: 'function pgsim.rrf(bigint,integer)', 'view pgsim.sync_status'
);
"""
# Ledgers made before function files have no objects column.
LEDGER_OBJECTS = """DO $pgsim$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'pgsim.migration'::regclass AND attname = 'objects')
    THEN
        ALTER TABLE pgsim.migration ADD COLUMN objects text[];
    END IF;
END
$pgsim$;"""
# A ledger that lists squashed files as released lists the files that replaced them instead, applied when
# the last of the old ones was.
SQUASH = """DO $pgsim$
DECLARE
    listed text[] := ARRAY(SELECT name || ' ' || sha256 FROM pgsim.migration WHERE name = ANY({names})
                           ORDER BY name COLLATE "C");
BEGIN
    IF cardinality(listed) = 0 THEN
        RETURN;
    ELSIF listed <> {released} THEN
        RAISE EXCEPTION USING
            MESSAGE = format('This database''s pgsim ledger lists SQL files from before pgsim squashed them, '
                             'but not the complete set as released, which is all pgsim can upgrade from: %s',
                             array_to_string(listed, ', ')),
            HINT = 'Drop schema pgsim (DROP SCHEMA pgsim CASCADE, which also drops the triggers of registered '
                   'columns) and run pgsim install again.';
    END IF;
    INSERT INTO pgsim.migration (name, sha256, package_version, applied_at)
    SELECT squashed.name, squashed.sha256, last.package_version, last.applied_at
    FROM unnest({by_names}, {by_sha256s}) AS squashed(name, sha256),
         (SELECT package_version, applied_at FROM pgsim.migration WHERE name = ANY({names})
          ORDER BY applied_at DESC, name DESC LIMIT 1) AS last;
    DELETE FROM pgsim.migration WHERE name = ANY({names});
END
$pgsim$;"""
# The functions and views named after a function file, as ledger objects ('<type> <identity>').
MADE = """ARRAY(
        SELECT object FROM (SELECT 'pg_proc'::regclass AS classid, p.oid AS objid FROM pg_proc p
              WHERE p.pronamespace = 'pgsim'::regnamespace AND p.proname = {function}
              UNION ALL
              SELECT 'pg_class'::regclass, c.oid FROM pg_class c
              WHERE c.relnamespace = 'pgsim'::regnamespace AND c.relname = {function} AND c.relkind = 'v'
        ) AS made, pg_identify_object(made.classid, made.objid, 0) AS o,
        LATERAL (SELECT o.type || ' ' || o.identity AS object) AS named
        ORDER BY object COLLATE "C")"""
# A function file is current where the ledger lists its text and everything it made is still there (a
# numbered file may have dropped a view to change a table: the view's file makes it again).
CURRENT = "EXISTS (SELECT 1 FROM pgsim.migration WHERE name = {name} AND sha256 = {sha256} AND objects <@ {made})"
FUNCTION_FILE = """DO $pgsim$
DECLARE
    saved text := pg_catalog.current_setting('search_path');
    routine regprocedure;
    made text[];
BEGIN
    PERFORM pg_catalog.set_config('search_path', {path}, true);
    IF {current} THEN
        PERFORM pg_catalog.set_config('search_path', saved, true);
        RETURN;
    END IF;
    FOR routine IN SELECT oid FROM pg_proc WHERE pronamespace = 'pgsim'::regnamespace AND proname = {function} LOOP
        EXECUTE format('ALTER ROUTINE %s SET pgsim.stale = %L', routine, 'yes');
    END LOOP;
    EXECUTE {text};
    FOR routine IN SELECT oid FROM pg_proc WHERE pronamespace = 'pgsim'::regnamespace AND proname = {function}
                   AND 'pgsim.stale=yes' = ANY(proconfig) LOOP
        EXECUTE format('DROP ROUTINE %s', routine);
    END LOOP;
    made := {made};
    IF cardinality(made) = 0 THEN
        RAISE EXCEPTION 'pgsim SQL file % made no function or view pgsim.%', {name}, {function};
    END IF;
    INSERT INTO pgsim.migration (name, sha256, package_version, objects)
    VALUES ({name}, {sha256}, {version}, made)
    ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256, package_version = excluded.package_version,
                                     applied_at = excluded.applied_at, objects = excluded.objects;
    PERFORM pg_catalog.set_config('search_path', saved, true);
END
$pgsim$;"""
# What the function files that are not shipped (any more) made is dropped, and the ledger forgets them.
RETIRE = """DO $pgsim$
DECLARE
    retired record;
    object text;
BEGIN
    FOR retired IN SELECT name, objects FROM pgsim.migration
                   WHERE name LIKE {functions} AND name <> ALL({shipped}) ORDER BY name COLLATE "C" LOOP
        FOREACH object IN ARRAY coalesce(retired.objects, '{{}}') LOOP
            EXECUTE format('DROP %s IF EXISTS %s', split_part(object, ' ', 1), substr(object, strpos(object, ' ') + 1))
                || {cascade};
        END LOOP;
        DELETE FROM pgsim.migration WHERE name = retired.name;
    END LOOP;
END
$pgsim$;"""
NUMBERED_FILE = """DO $pgsim$
DECLARE
    saved text := current_setting('search_path');
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgsim.migration WHERE name = {name}) THEN
        PERFORM set_config('search_path', {path}, true);
        EXECUTE {text};
        INSERT INTO pgsim.migration (name, sha256, package_version) VALUES ({name}, {sha256}, {version});
        PERFORM set_config('search_path', saved, true);
    END IF;
END
$pgsim$;"""


@dataclass
class InstallReport:
    applied: list[str] = field(default_factory=list)
    already_applied: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # function files no longer shipped, whose functions went

    @property
    def changed(self) -> bool:
        return bool(self.applied or self.dropped)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pgsim")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def install(
    conn: psycopg.Connection[Any], *, upto: str | None = None, directory: Traversable | None = None
) -> InstallReport:
    """Create or upgrade schema ``pgsim`` in the connected database. Safe to run any number of times.
    ``upto`` (a numbered file's name, or its number such as ``"0001"``) stops after that file, before the
    function files. ``directory`` holds the SQL files instead of the package (tests install an earlier
    release's files with it)."""
    numbered = sql_files(directory)
    chosen = files_upto(upto, numbered)
    functions = function_files(directory) if upto is None else []
    report = InstallReport()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [ADVISORY_LOCK_KEY])
        vector_schema = _ensure_vector_extension(conn)
        # SET LOCAL outlives a savepoint until the caller's transaction ends: put the caller's path back after.
        saved = conn.execute("SELECT pg_catalog.current_setting('search_path')").fetchone()
        conn.execute(SET_PATH, [PINNED_PATH])
        for statement in _ledger_statements(numbered):
            _run(conn, statement, "Upgrading pgsim's ledger")
        ledger = dict(conn.execute("SELECT name, sha256 FROM pgsim.migration").fetchall())
        _check_ledger(ledger, numbered)
        conn.execute(SET_PATH, [_search_path(vector_schema)])
        for file in chosen:
            if file.name in ledger:
                report.already_applied.append(file.name)
                continue
            _run(conn, file.render(vector_schema), f"pgsim SQL file {file.name}")
            conn.execute(
                "INSERT INTO pgsim.migration (name, sha256, package_version) VALUES (%s, %s, %s)",
                [file.name, file.sha256, package_version()],
            )
            report.applied.append(file.name)
        conn.execute(SET_PATH, [PINNED_PATH])
        current = _current(conn, functions)
        for file in functions:
            if file.name in current:
                report.already_applied.append(file.name)
                continue
            _run(conn, _file_block(FUNCTION_FILE, file, PINNED_PATH, vector_schema), f"pgsim SQL file {file.name}")
            report.applied.append(file.name)
        if upto is None:
            shipped = {file.name for file in functions}
            report.dropped = sorted(name for name in ledger if _is_function_file(name) and name not in shipped)
            _run(conn, _retire_block(shipped), "Dropping the functions pgsim no longer ships")
        conn.execute(SET_PATH, [saved[0] if saved else ""])
    return report


def files_upto(upto: str | None = None, files: list[SqlFile] | None = None) -> list[SqlFile]:
    """The numbered files in order, up to and including ``upto`` (a name or its four-digit number)."""
    files = sql_files() if files is None else files
    if upto is None:
        return files
    chosen = [file for file in files if file.name == upto or file.name.split("_", 1)[0] == upto]
    if not chosen:
        raise InstallError(f"No pgsim SQL file {upto!r}; the files are {', '.join(f.name for f in files)}.")
    return files[: files.index(chosen[0]) + 1]


def install_script(upto: str | None = None, vector_schema: str = "public", *, after: str | None = None) -> str:
    """The install as one SQL script, for offline migrations (``alembic upgrade --sql``): each numbered file
    runs only where the ledger does not list it yet, each function file only where it is not current
    (``CURRENT``), so the script and ``pgsim install`` share the ledger. With ``upto`` it stops
    after that numbered file, before the function files; ``after`` (a numbered file) leaves out the files
    up to and including it (an Alembic revision renders only its own)."""
    numbered = sql_files()
    chosen = files_upto(upto, numbered)
    if after is not None:
        chosen = chosen[len(files_upto(after, numbered)) :]
    path = _search_path(vector_schema)
    parts = [
        f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY});",
        "CREATE EXTENSION IF NOT EXISTS vector;",
        *_ledger_statements(numbered),
    ]
    for file in chosen:
        parts.append(_file_block(NUMBERED_FILE, file, path, vector_schema))
    if upto is None:
        functions = function_files()
        parts.extend(_file_block(FUNCTION_FILE, file, PINNED_PATH, vector_schema) for file in functions)
        parts.append(_retire_block({file.name for file in functions}))
    return "\n\n".join(parts) + "\n"


def drop_functions_script() -> str:
    """SQL that drops what every function file made and removes the files from the ledger (the Alembic
    branch's downgrade). CASCADE: the triggers of registered columns go with ``pgsim.enqueue``."""
    return _retire_block(set(), cascade=True) + "\n"


def applied_files(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    """(name, package version) of every applied file, the most recently applied last; empty when pgsim is
    not installed."""
    if conn.execute("SELECT pg_catalog.to_regclass('pgsim.migration'::pg_catalog.text)").fetchone() == (None,):
        return []
    rows = conn.execute(
        'SELECT name, package_version FROM pgsim.migration ORDER BY applied_at, name COLLATE "C"'
    ).fetchall()
    return [(name, version) for name, version in rows]


def _ensure_vector_extension(conn: psycopg.Connection[Any]) -> str:
    found = "SELECT extnamespace::pg_catalog.regnamespace::pg_catalog.text FROM pg_catalog.pg_extension WHERE"
    row = conn.execute(found + " extname OPERATOR(pg_catalog.=) 'vector'::pg_catalog.name").fetchone()
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
        if _is_function_file(name):  # re-applied when changed, dropped when gone
            continue
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


def _is_function_file(name: str) -> bool:
    return name.startswith(f"{FUNCTIONS}/")


def _search_path(vector_schema: str) -> str:
    """What the numbered files run with: pg_catalog first (nothing another role made in the vector
    extension's schema, say public, can shadow a built-in), then pgsim and the vector extension's schema."""
    return f"pg_catalog, pgsim, {sql.Identifier(vector_schema).as_string()}, pg_temp"


def _ledger_statements(numbered: list[SqlFile]) -> list[str]:
    """The ledger, brought up to date: created, given its objects column, squashed files renamed."""
    have = {file.name: file for file in numbered}
    squashes = [squash for squash in SQUASHES if all(name in have for name in squash.by)]
    return [LEDGER.strip(), LEDGER_OBJECTS, *(_squash_block(squash, have) for squash in squashes)]


def _squash_block(squash: Squash, have: dict[str, SqlFile]) -> str:
    return _sql(
        SQUASH,
        names=_text_array(name for name, _ in squash.replaced),
        released=_text_array(sorted(f"{name} {digest}" for name, digest in squash.replaced)),
        by_names=_text_array(squash.by),
        by_sha256s=_text_array(have[name].sha256 for name in squash.by),
    )


def _file_block(template: str, file: SqlFile, path: str, vector_schema: str) -> str:
    """``template`` (NUMBERED_FILE, FUNCTION_FILE) filled in for ``file``, run with search_path ``path``."""
    if "$pgsim$" in file.text:
        raise InstallError(f"pgsim SQL file {file.name} contains $pgsim$, which pgsim's SQL blocks quote with.")
    values = _file_values(file)
    text = sql.Literal(file.render(vector_schema))
    literals = dict(path=sql.Literal(path), text=text, version=sql.Literal(package_version()))
    return _sql(template, current=sql.SQL(CURRENT).format(**values), **values, **literals)


def _file_values(file: SqlFile) -> dict[str, sql.Composable]:
    function = sql.Literal(file.function)
    made = sql.SQL(MADE).format(function=function)
    return dict(name=sql.Literal(file.name), sha256=sql.Literal(file.sha256), function=function, made=made)


def _current(conn: psycopg.Connection[Any], functions: list[SqlFile]) -> set[str]:
    """The function files that need not run again (CURRENT)."""
    if not functions:
        return set()
    checks = sql.SQL(", ").join(sql.SQL(CURRENT).format(**_file_values(file)) for file in functions)
    row = conn.execute(sql.SQL("SELECT {}").format(checks)).fetchone() or ()
    return {file.name for file, current in zip(functions, row, strict=True) if current}


def _retire_block(shipped: set[str], *, cascade: bool = False) -> str:
    return _sql(
        RETIRE,
        functions=sql.Literal(f"{FUNCTIONS}/%"),
        shipped=_text_array(sorted(shipped)),
        cascade=sql.Literal(" CASCADE" if cascade else ""),
    )


def _sql(template: str, **values: sql.Composable) -> str:
    return sql.SQL(template).format(**values).as_string()


def _text_array(values: Iterable[str]) -> sql.Composable:
    return sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(sql.Literal(value) for value in values))


def _run(conn: psycopg.Connection[Any], statement: str, what: str) -> None:
    try:
        conn.execute(statement.encode())
    except psycopg.Error as exc:
        raise InstallError(f"{what} failed: {exc}".strip()) from exc
