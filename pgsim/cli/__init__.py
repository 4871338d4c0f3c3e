"""The ``pgsim`` command."""

from pgsim.cli.main import main

__all__ = ["main"]
