"""pgsim: PostgreSQL as a similarity-search engine.

Importing pgsim loads no model and starts no server; each happens on first use.
"""

from pgsim.columns.adding import add_embedding
from pgsim.columns.batches import SyncReport
from pgsim.columns.bulk_load import IngestReport, ingest
from pgsim.columns.chunking import Chunks, remove_chunks
from pgsim.columns.grants import grant, revoke
from pgsim.columns.model_change import change_embedding, change_model
from pgsim.columns.registry import Registration, get_registration, remove_embedding
from pgsim.columns.waiting import wait_for_sync
from pgsim.columns.worker import Worker, backfill, sync
from pgsim.db.calibration import Calibration
from pgsim.db.connection import connect, resolve_dsn
from pgsim.db.hnsw import HNSW
from pgsim.db.schema import InstallReport, install
from pgsim.db.server import EmbeddedServer
from pgsim.encoding.encoder import Encoder, check_vector
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.errors import (
    ExtensionMissing,
    InstallError,
    InvalidInput,
    MissingDependency,
    ModelNotFound,
    PgsimError,
    ReadOnlyStandby,
    SchemaMissing,
    ServerError,
)
from pgsim.knn.filtered import Hit, NoIndexWarning, search
from pgsim.knn.planner import Plan, Tuning
from pgsim.knn.statements import Between
from pgsim.psycopg import Text, register, register_async
from pgsim.quality.diversity import diverse_search
from pgsim.quality.duplicates import near_duplicates
from pgsim.quality.hubness import CorrectedHit, corrected_search, set_query_bank
from pgsim.quality.hybrid import FusedHit, hybrid_search
from pgsim.quality.index_calibration import calibrate
from pgsim.quality.labels import label_rows
from pgsim.quality.relevance import RelevantHit, relevant_search

__all__ = [
    "HNSW",
    "Between",
    "Calibration",
    "Chunks",
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
    "SchemaMissing",
    "Plan",
    "ReadOnlyStandby",
    "Registration",
    "RelevantHit",
    "ServerError",
    "SyncReport",
    "Text",
    "Tuning",
    "Worker",
    "add_embedding",
    "backfill",
    "calibrate",
    "change_embedding",
    "change_model",
    "check_vector",
    "connect",
    "corrected_search",
    "diverse_search",
    "get_registration",
    "grant",
    "hybrid_search",
    "ingest",
    "install",
    "label_rows",
    "near_duplicates",
    "register",
    "register_async",
    "relevant_search",
    "remove_chunks",
    "remove_embedding",
    "revoke",
    "resolve_dsn",
    "search",
    "set_query_bank",
    "sync",
    "wait_for_sync",
]
