"""psycopg 3 adaptation: pgvector's types, checked numpy vectors, and query text encoded when bound.

    conn = psycopg.connect(dsn)
    pgsim.psycopg.register(conn)
    conn.execute(
        "SELECT package FROM packages WHERE section = %s ORDER BY embedding <=> %s LIMIT 10",
        ["libs", pgsim.Text("parse json")],
    )

The text is encoded on the Python side by the connection's model when psycopg binds the parameter, so
the statement stays one SQL query that an HNSW index can serve.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.adapt import Dumper, PyFormat
from psycopg.pq import Format
from psycopg.types import TypeInfo

from pgsim.encoding.encoder import Vector, check_vector, encoder_for
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.errors import InstallError, InvalidInput


class Text:
    """Query text to bind where a vector is expected; encoded with ``model`` (else the connection's)."""

    __slots__ = ("text", "model", "_vectors")

    def __init__(self, text: str, model: str | None = None) -> None:
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput(f"pgsim.Text needs non-empty query text; got {text!r}.")
        self.text = text
        self.model = model
        self._vectors: dict[str, Vector] = {}

    def vector(self, default_model: str = DEFAULT_MODEL) -> Vector:
        """The query's embedding, computed once per model and kept for re-execution."""
        model = self.model or default_model
        vector = self._vectors.get(model)
        if vector is None:
            vector = self._vectors[model] = encoder_for(model).encode_query(self.text)
        return vector

    def __repr__(self) -> str:
        return f"Text({self.text!r}" + (f", model={self.model!r})" if self.model else ")")


def bindable(conn: psycopg.BaseConnection[Any], vector: Vector) -> Any:
    """``vector`` as ``conn`` can bind it: as it is where pgsim's (or pgvector's) adapters are registered, else
    as pgvector's text form, an untyped literal the server casts to the column's type (so every search works
    on a plain ``psycopg.connect(...)`` connection, without a round trip to look the type up)."""
    try:
        conn.adapters.get_dumper(type(vector), PyFormat.AUTO)
        return vector
    except psycopg.ProgrammingError:
        return "[" + ",".join(map(repr, vector.tolist())) + "]"


def register(conn: psycopg.Connection[Any], model: str = DEFAULT_MODEL) -> None:
    """Adapt pgvector's types and :class:`Text` on ``conn``; ``model`` encodes Text that names none."""
    from pgvector.psycopg import register_vector

    _require_vector(conn, TypeInfo.fetch(conn, "vector"))
    register_vector(conn)
    _register_dumpers(conn, TypeInfo.fetch(conn, "vector"), model)


async def register_async(conn: psycopg.AsyncConnection[Any], model: str = DEFAULT_MODEL) -> None:
    """:func:`register` for an async connection. Encoding a query runs on the event loop's thread."""
    from pgvector.psycopg import register_vector_async

    info = await TypeInfo.fetch(conn, "vector")
    _require_vector(conn, info)
    await register_vector_async(conn)
    _register_dumpers(conn, info, model)


def _require_vector(conn: psycopg.BaseConnection[Any], info: TypeInfo | None) -> None:
    if info is None:
        raise InstallError(
            f"Database {conn.info.dbname!r} has no pgvector 'vector' type: run `pgsim install` (or "
            "pgsim.install(conn)) first, or have an administrator run CREATE EXTENSION vector."
        )


def _register_dumpers(conn: psycopg.BaseConnection[Any], info: TypeInfo | None, model: str) -> None:
    from pgvector import Vector as PgVector

    assert info is not None
    vector_oid = info.oid

    class TextDumper(Dumper):
        oid = vector_oid
        format = Format.BINARY

        def dump(self, obj: Text) -> bytes:
            return PgVector(obj.vector(model)).to_binary()

    class CheckedVectorDumper(Dumper):
        oid = vector_oid
        format = Format.BINARY

        def dump(self, obj: Any) -> bytes:
            return PgVector(check_vector(obj)).to_binary()

    conn.adapters.register_dumper(Text, TextDumper)
    conn.adapters.register_dumper("numpy.ndarray", CheckedVectorDumper)
