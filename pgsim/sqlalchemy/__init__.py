"""SQLAlchemy 2.x integration: embedding columns, k-NN comparators that combine with filters in one query,
encode-on-flush checked against the database's registration, and hybrid search, the relevance threshold and
near-duplicates over mapped classes. Needs ``pip install 'pgsim[sqlalchemy]'`` and the psycopg driver (postgresql+psycopg://)."""

from pgsim._util import require

require("sqlalchemy", "sqlalchemy")

from pgsim.sqlalchemy import functions  # noqa: E402
from pgsim.sqlalchemy.async_quality import (  # noqa: E402
    hybrid_search_async,
    near_duplicates_async,
    relevant_search_async,
)
from pgsim.sqlalchemy.columns import (  # noqa: E402
    EmbeddingSpec,
    embedding_column,
    hnsw_index,
    register_embeddings,
    register_embeddings_sync,
)
from pgsim.sqlalchemy.definition import DefinitionMismatch  # noqa: E402
from pgsim.sqlalchemy.flush import encode_on_flush  # noqa: E402
from pgsim.sqlalchemy.quality import (  # noqa: E402
    FusedMatch,
    RelevantMatch,
    hybrid_search,
    near_duplicates,
    relevant_search,
)
from pgsim.sqlalchemy.types import Embedding, HalfEmbedding  # noqa: E402
from pgsim.sqlalchemy.url import database_url  # noqa: E402

__all__ = [
    "DefinitionMismatch",
    "Embedding",
    "EmbeddingSpec",
    "FusedMatch",
    "HalfEmbedding",
    "RelevantMatch",
    "database_url",
    "embedding_column",
    "encode_on_flush",
    "functions",
    "hnsw_index",
    "hybrid_search",
    "hybrid_search_async",
    "near_duplicates",
    "near_duplicates_async",
    "register_embeddings",
    "register_embeddings_sync",
    "relevant_search",
    "relevant_search_async",
]
