"""pgsim's SQL files, read through importlib.resources from the installed package.

Two kinds, both in ``pgsim/db/sql``:

- numbered files (``0001_tables.sql``): tables, types and data migrations. Each runs once, in order, and
  never changes once released; a later change goes into a new numbered file.
- function files (``functions/knn.sql``): the function or view ``pgsim.<name>`` with all its overloads
  (and nothing else), written with ``CREATE OR REPLACE``. They run after the numbered files, again whenever
  their text changes, so a function's current body is always in one place (pgsim.db.schema says how old
  overloads and files go). A change PostgreSQL cannot make in place (a function's return type or parameter
  names, a view's columns) needs the file to drop the old object first.

Numbered files run before the function files, so they must not call pgsim's functions: a fresh install has
none yet.

Every function resolves names the same way whoever calls it, whatever their search_path (a role that can
create objects in a schema on the caller's path, public say, must not be able to shadow what pgsim calls:
PostgreSQL takes the best-matching overload across all schemas on the path, so putting pg_catalog first
does not stop it). So, in every function file:

- plpgsql functions pin ``SET search_path = pg_catalog, pg_temp``; SQL functions use SQL-standard bodies
  (``RETURN expr`` or ``BEGIN ATOMIC ... END``, whose names are bound when the function is created; a SET
  clause would stop PostgreSQL inlining them), as a view's are. The installer applies function files with
  that same path, so nothing in them binds to another role's object either (pgsim.db.schema).
- pgsim's own objects are named ``pgsim.<name>``; pgvector's (the ``vector`` and ``halfvec`` types, the
  ``<=>`` operator as ``OPERATOR(@extschema:vector@.<=>)``, its functions) ``@extschema:vector@.<name>``.
  ``@extschema:vector@`` is PostgreSQL's placeholder for a required extension's schema (``VECTOR_SCHEMA``),
  which the installer replaces with the vector extension's schema, quoted (:meth:`SqlFile.render`); the
  ledger hashes the file as shipped, so it is the same in every database. Dynamic SQL (EXECUTE) looks the
  schema up when it runs instead (``SELECT quote_ident(n.nspname) FROM pg_extension e JOIN pg_namespace
  n ...``: the placeholder's text is no string literal), and quotes what callers give with ``%I`` or
  ``regclass``, as always. Under the pinned path a ``regclass`` or ``regtype`` prints schema-qualified.
- Text from callers that a function runs (a filter, a source expression) resolves under the pinned path
  too: the caller qualifies its own functions and tables there. Two exceptions: ``knn_plan`` and
  ``estimate_rows``, which plan the caller's own filter for a search that runs under the caller's path (the
  Python and ORM searches), keep that path and qualify everything they call themselves (``pg_catalog.``).

The ledger (``pgsim.migration``) names a file as it is named here: ``0001_tables.sql``, ``functions/knn.sql``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable

from psycopg import sql

FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
FUNCTION_FILE_NAME = re.compile(r"^([a-z][a-z0-9_]*)\.sql$")
FUNCTIONS = "functions"
VECTOR_SCHEMA = "@extschema:vector@"


@dataclass(frozen=True)
class SqlFile:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def render(self, vector_schema: str) -> str:
        """The text to run: ``@extschema:vector@`` replaced by ``vector_schema``, quoted."""
        return self.text.replace(VECTOR_SCHEMA, sql.Identifier(vector_schema).as_string())

    @property
    def function(self) -> str:
        """The name of the function (or view) a function file makes: ``knn`` for ``functions/knn.sql``."""
        return self.name.removeprefix(f"{FUNCTIONS}/").removesuffix(".sql")


@dataclass(frozen=True)
class Squash:
    """Numbered files an earlier pgsim applied (name and sha256 of each, as released), since replaced by
    numbered files that make the same tables and types; their functions are in the function files."""

    replaced: tuple[tuple[str, str], ...]
    by: tuple[str, ...]


# Before function files, pgsim shipped these nine numbered files (kept verbatim in tests/db/states/pre-squash);
# a database it installed lists them in its ledger.
SQUASHES = (
    Squash(
        replaced=(
            ("0001_schema.sql", "eb1945795692f72e64d267eb50e3b72a41b9cb72d4314eb99b6a3d803d97e136"),
            ("0002_knn_plan.sql", "fe741959e73630b7d776abebb371782275a92a7bf1c74967b240baecf27c48fe"),
            ("0003_sync.sql", "3c0a249a1d03ed1def34fc0e6b7436474a50a1d090e780489741a55f63d20182"),
            ("0004_registration.sql", "a7f4dda472c6aff6c152532b9fa71f2305591f2d155e5ed26daf9c73343637ca"),
            ("0005_embedding_cache.sql", "57dcd75a8c80165f50d9f3621b2a504d9b49fe89f5849d0f30cbc893a7f39a6a"),
            ("0006_forget_dropped.sql", "30a2feaf78508f3ada81175b0ea55c346d8a7ae335b4de9387e6bcd0e74f18a5"),
            ("0007_quality.sql", "3a14dc769fbb6988f0302d77e05fedcab4631fbab94baa7495157029eae64814"),
            ("0008_drop_score_sample.sql", "d956944481a295bf82654740de4b430fe0d4366f74bc84513b99d28acaf82c7d"),
            ("0009_knn_embedded_only.sql", "ef8e212315600bf1299283d86f716618e900e990c03abc24bc5c98a4fd9ea2d7"),
        ),
        by=("0001_tables.sql",),
    ),
)


def sql_dir() -> Traversable:
    """``pgsim/db/sql``, in a wheel and in a source checkout alike."""
    return resources.files("pgsim.db") / "sql"


def sql_files(directory: Traversable | None = None) -> list[SqlFile]:
    """Every numbered file, in the order it must be applied."""
    found = [entry for entry in (directory or sql_dir()).iterdir() if FILE_NAME.match(entry.name)]
    return [SqlFile(entry.name, entry.read_text(encoding="utf-8")) for entry in sorted(found, key=lambda e: e.name)]


def function_files(directory: Traversable | None = None) -> list[SqlFile]:
    """Every function file, by name."""
    functions = (directory or sql_dir()) / FUNCTIONS
    if not functions.is_dir():
        return []
    found = [entry for entry in functions.iterdir() if FUNCTION_FILE_NAME.match(entry.name)]
    return [
        SqlFile(f"{FUNCTIONS}/{entry.name}", entry.read_text(encoding="utf-8"))
        for entry in sorted(found, key=lambda e: e.name)
    ]
