"""Alembic integration: pgsim's operations (``op.create_embedding``, ``op.create_hnsw_index``, ...),
autogenerate for embedding columns and HNSW indexes, and pgsim's schema as the ``pgsim`` branch
(``version_location()``). Needs ``pip install 'pgsim[alembic]'``."""

from pgsim._util import require

require("alembic", "alembic")

# importing them registers op.create_embedding, op.create_hnsw_index, ... and the autogenerate comparator
from pgsim.alembic import autogenerate, change_ops, chunk_ops, embedding_ops, ops, render  # noqa: E402
from pgsim.alembic.branch import upgrade_to, version_location  # noqa: E402
from pgsim.alembic.config import ini_url  # noqa: E402

ops.show_signatures()  # help(op.create_embedding) shows its parameters, not Alembic's proxy's (*args, **kw)

__all__ = [
    "autogenerate",
    "change_ops",
    "chunk_ops",
    "embedding_ops",
    "ini_url",
    "ops",
    "render",
    "upgrade_to",
    "version_location",
]
