"""pgsim's SQL functions as SQLAlchemy functions: ``func.pgsim.cosine_similarity(a, b)`` and the like."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, Float, Text
from sqlalchemy.sql.functions import GenericFunction


class cosine_similarity(GenericFunction[float]):  # noqa: N801 - SQL's name
    """``pgsim.cosine_similarity(a, b)``: 1 - cosine distance, for the SELECT list."""

    type = Float()
    package = "pgsim"
    inherit_cache = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packagenames = ("pgsim",)


class version(GenericFunction[str]):  # noqa: N801 - SQL's name
    """``pgsim.version()``: the pgsim version that last changed the schema."""

    type = Text()
    package = "pgsim"
    inherit_cache = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packagenames = ("pgsim",)


class expect_model(GenericFunction[bool]):  # noqa: N801 - SQL's name
    """``pgsim.expect_model(schema, table, column, model, revision)``: true, or an error when the column holds
    another model's embeddings."""

    type = Boolean()
    package = "pgsim"
    inherit_cache = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packagenames = ("pgsim",)
