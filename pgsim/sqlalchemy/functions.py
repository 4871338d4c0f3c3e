"""pgsim's SQL functions as SQLAlchemy functions: ``func.pgsim.cosine_similarity(a, b)`` and the like."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Boolean, Float, Text
from sqlalchemy.sql.functions import GenericFunction

T = TypeVar("T")


class _PgsimFunction(GenericFunction[T]):
    """A function of schema ``pgsim``, rendered with its schema name. (SQLAlchemy registers a function by
    the ``package`` in its own class body, so each subclass names it.)"""

    _register = False
    inherit_cache = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packagenames = ("pgsim",)


class cosine_similarity(_PgsimFunction[float]):  # noqa: N801 - SQL's name
    """``pgsim.cosine_similarity(a, b)``: 1 - cosine distance, for the SELECT list."""

    type = Float()
    package = "pgsim"
    inherit_cache = True


class version(_PgsimFunction[str]):  # noqa: N801 - SQL's name
    """``pgsim.version()``: the pgsim version that last changed the schema."""

    type = Text()
    package = "pgsim"
    inherit_cache = True


class expect_model(_PgsimFunction[bool]):  # noqa: N801 - SQL's name
    """``pgsim.expect_model(schema, table, column, model, revision)``: true, or an error when the column holds
    another model's embeddings."""

    type = Boolean()
    package = "pgsim"
    inherit_cache = True


class rrf(_PgsimFunction[float]):  # noqa: N801 - SQL's name
    """``pgsim.rrf(rank, k=60)``: one list's reciprocal-rank-fusion term, 1 / (k + rank); 0 for a NULL rank."""

    type = Float()
    package = "pgsim"
    inherit_cache = True


class nearest_label(_PgsimFunction[str]):  # noqa: N801 - SQL's name
    """``pgsim.nearest_label(embedding, labels, label_vectors)``: the label whose vector is nearest."""

    type = Text()
    package = "pgsim"
    inherit_cache = True
