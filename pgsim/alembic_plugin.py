"""The ``alembic.plugins`` entry point: ``autogenerate_plugins=["alembic.autogenerate.*", "pgsim"]``.

Alembic loads this module while it is itself being imported, so it imports nothing of Alembic's beyond
``alembic.util`` and nothing of pgsim's Alembic code until a comparison runs.
"""

from __future__ import annotations

from typing import Any


def compare(autogen_context: Any, upgrade_ops: Any) -> Any:
    from pgsim.alembic.autogenerate import compare as pgsim_compare

    return pgsim_compare(autogen_context, upgrade_ops)


def setup(plugin: Any) -> None:
    from alembic.util import DispatchPriority

    plugin.add_autogenerate_comparator(compare, "autogenerate", priority=DispatchPriority.LAST)
