"""Column types for embeddings, on pgvector's own ``VECTOR``/``HALFVEC``: they know their model, check
vectors before anything is sent, read them as float32 numpy arrays, and compare with text encoded on the
Python side.

    Doc.embedding.nearest("parse json")      # ORDER BY embedding <=> :q   (the text encoded when bound)
    Doc.embedding.distance(vector)           # embedding <=> :q
    Doc.embedding.similarity("parse json")   # 1 - (embedding <=> :q)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pgvector.sqlalchemy import HALFVEC, VECTOR
from sqlalchemy import Float, literal
from sqlalchemy.orm.base import LoaderCallableStatus
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.types import TypeEngine

from pgsim.encoding.encoder import check_vector
from pgsim.errors import InvalidInput
from pgsim.psycopg import vector_array
from pgsim.sqlalchemy.offload import query_vector

NEAREST = "pgsim_nearest"  # annotation that marks an ORDER BY term as pgsim's k-NN ordering


class _EmbeddingComparator(TypeEngine.Comparator[Any]):
    """``nearest``, ``distance`` and ``similarity`` by cosine distance, the operator HNSW indexes serve."""

    type: Any

    def distance(self, query: Any) -> ColumnElement[float]:
        """Cosine distance to ``query`` (text, encoded with the column's model, or a vector)."""
        return self.expr.op("<=>", return_type=Float)(self.type.query_parameter(query))

    def nearest(self, query: Any) -> ColumnElement[float]:
        """For ORDER BY: nearest first. Under a filter, pgsim's session hook keeps k rows coming back."""
        expression = self.distance(query)
        return expression._annotate({NEAREST: self.expr})

    def similarity(self, query: Any) -> ColumnElement[float]:
        """Cosine similarity, 1 - distance: for the SELECT list (no index serves a condition on it)."""
        return literal(1.0, Float) - self.distance(query)


class _EmbeddingMixin:
    """What both storage types share: the model that fills the column, and checked binds."""

    dim: int | None
    model: str | None

    def query_parameter(self, query: Any) -> BindParameter[Any]:
        """``query`` as a bound parameter: text is encoded with the column's model when it is bound."""
        if query is None:
            raise InvalidInput("nearest/distance/similarity need a query: text or a vector, not None.")
        if isinstance(query, str):
            if self.model is None:
                raise InvalidInput(
                    "This column has no model to encode text with: declare it with embedding_column(model=...) "
                    "or pass a vector."
                )
            if not query.strip():
                raise InvalidInput("The query text is empty; pass the words to search for.")
            return BindParameter(None, query, type_=QueryText(self.dim, self.model), unique=True)
        return BindParameter(None, check_vector(query, self.dim), type_=self, unique=True)  # type: ignore[arg-type]

    def compare_values(self, x: Any, y: Any) -> bool:
        """Equal vectors, whatever holds them (numpy arrays, lists, pgvector's HalfVector): the ORM's
        change tracking compares with this, and ``==`` on arrays is no answer."""
        if x is None or y is None or isinstance(x, LoaderCallableStatus) or isinstance(y, LoaderCallableStatus):
            return x is y  # NO_VALUE: a new object's history before anything was stored
        try:
            return bool(np.array_equal(_as_array(x), _as_array(y)))
        except (TypeError, ValueError):
            return x is y

    def bind_processor(self, dialect: Any) -> Any:
        parent = super().bind_processor(dialect)  # type: ignore[misc]
        dimension = self.dim

        def process(value: Any) -> Any:
            if value is None:
                return None
            if isinstance(value, str):
                raise InvalidInput(
                    "An embedding column takes a vector, not text: let pgsim encode the source on flush, or "
                    "compare with text through .nearest()/.distance()."
                )
            return parent(check_vector(value, dimension))

        return process

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        """A stored vector as a float32 numpy array (:class:`pgsim.psycopg.VectorArray`), whatever the driver
        hands over: pgvector's text form, or its ``Vector``/``HalfVector`` where its adapters are registered."""

        def process(value: Any) -> Any:
            return None if value is None else vector_array(value)

        return process


def _as_array(value: Any) -> Any:
    to_numpy = getattr(value, "to_numpy", None)  # pgvector's Vector/HalfVector
    return np.asarray(to_numpy() if callable(to_numpy) else value, dtype=np.float32)  # as stored, as checked


class Embedding(_EmbeddingMixin, VECTOR):
    """``vector(dim)`` holding embeddings made by ``model``."""

    cache_ok = True
    comparator_factory = _EmbeddingComparator  # type: ignore[assignment]

    def __init__(self, dim: int | None = None, model: str | None = None) -> None:
        super().__init__(dim)
        self.model = model


class HalfEmbedding(_EmbeddingMixin, HALFVEC):
    """``halfvec(dim)`` holding embeddings made by ``model`` (half the storage, same ranking here)."""

    cache_ok = True
    comparator_factory = _EmbeddingComparator  # type: ignore[assignment]

    def __init__(self, dim: int | None = None, model: str | None = None) -> None:
        super().__init__(dim)
        self.model = model


class QueryText(VECTOR):
    """A bound query text, encoded with ``model`` when the statement runs (a recent query is not encoded
    again; under ``AsyncSession`` the model runs off the event loop)."""

    cache_ok = True

    def __init__(self, dim: int | None, model: str) -> None:
        super().__init__(dim)
        self.model = model

    def bind_processor(self, dialect: Any) -> Any:
        parent = super().bind_processor(dialect)
        model, dimension = self.model, self.dim

        def process(value: Any) -> Any:
            vector = query_vector(model, value) if isinstance(value, str) else value
            return parent(check_vector(vector, dimension))

        return process
