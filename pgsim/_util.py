"""Optional dependencies, imported only when used; a missing one names the extra that brings it."""

from __future__ import annotations

import importlib
from types import ModuleType

from pgsim.errors import MissingDependency


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` saying ``pip install 'pgsim[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(module.split(".")[0], extra) from None
