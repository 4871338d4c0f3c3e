"""pgsim: PostgreSQL as a similarity-search engine.

Importing pgsim loads no model and starts no server; each happens on first use.
"""

from pgsim.database import connect, resolve_dsn
from pgsim.encode import DEFAULT_MODEL, Encoder, check_vector
from pgsim.errors import (
    ExtensionMissing,
    InstallError,
    InvalidInput,
    MissingDependency,
    ModelNotFound,
    PgsimError,
    ServerError,
)
from pgsim.install import InstallReport, install
from pgsim.psycopg import Text, register, register_async
from pgsim.search import Between, Hit, NoIndexWarning, Plan, Tuning, search
from pgsim.server import EmbeddedServer

__all__ = [
    "Between",
    "DEFAULT_MODEL",
    "EmbeddedServer",
    "Encoder",
    "ExtensionMissing",
    "Hit",
    "InstallError",
    "InstallReport",
    "InvalidInput",
    "MissingDependency",
    "ModelNotFound",
    "NoIndexWarning",
    "PgsimError",
    "Plan",
    "ServerError",
    "Text",
    "Tuning",
    "check_vector",
    "connect",
    "install",
    "register",
    "register_async",
    "resolve_dsn",
    "search",
]
