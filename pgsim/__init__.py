"""pgsim: PostgreSQL as a similarity-search engine.

Importing pgsim loads no model and starts no server; each happens on first use.
"""

from pgsim.database import connect, resolve_dsn
from pgsim.diversity import diverse_search
from pgsim.duplicates import near_duplicates
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
from pgsim.hubness import CorrectedHit, corrected_search, set_query_bank
from pgsim.hybrid import FusedHit, hybrid_search
from pgsim.index import HNSW
from pgsim.ingest import IngestReport, ingest
from pgsim.install import InstallReport, install
from pgsim.labels import label_rows
from pgsim.psycopg import Text, register, register_async
from pgsim.registry import Registration, add_embedding, change_model, get_registration, remove_embedding
from pgsim.relevance import RelevantHit, relevant_search
from pgsim.search import Between, Hit, NoIndexWarning, Plan, Tuning, search
from pgsim.server import EmbeddedServer
from pgsim.sync import SyncReport, Worker, backfill, sync

__all__ = [
    "HNSW",
    "Between",
    "CorrectedHit",
    "DEFAULT_MODEL",
    "EmbeddedServer",
    "Encoder",
    "ExtensionMissing",
    "FusedHit",
    "Hit",
    "InstallError",
    "IngestReport",
    "InstallReport",
    "InvalidInput",
    "MissingDependency",
    "ModelNotFound",
    "NoIndexWarning",
    "PgsimError",
    "Plan",
    "Registration",
    "RelevantHit",
    "ServerError",
    "SyncReport",
    "Text",
    "Tuning",
    "Worker",
    "add_embedding",
    "backfill",
    "change_model",
    "check_vector",
    "connect",
    "corrected_search",
    "diverse_search",
    "get_registration",
    "hybrid_search",
    "ingest",
    "install",
    "label_rows",
    "near_duplicates",
    "register",
    "register_async",
    "relevant_search",
    "remove_embedding",
    "resolve_dsn",
    "search",
    "set_query_bank",
    "sync",
]
