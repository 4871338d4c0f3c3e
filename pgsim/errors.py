"""Errors raised by pgsim. Every message says what to do next."""

from __future__ import annotations


class PgsimError(Exception):
    """Base class of every error pgsim raises on purpose."""


class ServerError(PgsimError):
    """The embedded PostgreSQL server could not be started, reached or stopped."""


class InstallError(PgsimError):
    """pgsim's SQL schema could not be installed or upgraded."""


class ExtensionMissing(InstallError):
    """The pgvector extension is absent and this role may not create it."""


class ModelNotFound(PgsimError):
    """An embedding model could not be loaded from a package, a local path or the local cache."""


class InvalidInput(PgsimError, ValueError):
    """Text or a vector handed to pgsim cannot be used as it is."""


class SchemaMissing(InvalidInput):
    """pgsim's schema (or the part of it a call needs) is not installed in this database, or is older than
    this package: run ``pgsim install``."""


class MissingDependency(PgsimError, ImportError):
    """An optional integration was used without its extra installed."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"{module} is not installed; it comes with pgsim's '{extra}' extra: pip install 'pgsim[{extra}]'"
        )
        self.module = module
        self.extra = extra


class ReadOnlyStandby(PgsimError):
    """A call that writes was made on a hot standby (a read replica), where nothing can be written."""
