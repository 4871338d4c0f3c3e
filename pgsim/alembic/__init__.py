"""Alembic integration: pgsim's schema as the ``pgsim`` branch (``version_location()``). Needs
``pip install 'pgsim[alembic]'``."""

from pgsim._optional import require

require("alembic", "alembic")

from pgsim.alembic import ops  # noqa: E402 - registers op.install_pgsim, op.create_hnsw_index, ...
from pgsim.alembic.branch import upgrade_to, version_location  # noqa: E402

__all__ = ["ops", "upgrade_to", "version_location"]
