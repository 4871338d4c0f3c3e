"""psycopg 3 adaptation: pgvector's types, checked numpy vectors, and query text encoded when bound.

    conn = psycopg.connect(dsn)
    pgsim.psycopg.register(conn)
    conn.execute(
        "SELECT package FROM packages WHERE section = %s ORDER BY embedding <=> %s LIMIT 10",
        ["libs", pgsim.Text("parse json")],
    )

The text is encoded on the Python side by the connection's model when psycopg binds the parameter, so
the statement stays one SQL query that an HNSW index can serve. A ``vector`` or ``halfvec`` value read on a
registered connection is a :class:`VectorArray`: a 1-D float32 numpy array, as the ORM gives it too.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql
from psycopg.adapt import Dumper, Loader, PyFormat
from psycopg.pq import Format
from psycopg.types import TypeInfo

from pgsim.encoding.encoder import Vector, check_vector, encoder_for
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.errors import InstallError, InvalidInput


class VectorArray(np.ndarray):
    """A stored vector as pgsim reads it, from psycopg and from the ORM alike: a 1-D float32 numpy array
    (``halfvec`` values widened to float32, exactly). It also answers ``to_list()`` and ``to_numpy()``, as
    pgvector's ``Vector`` does, so code written against that keeps working."""

    def to_list(self) -> list[float]:
        return np.asarray(self).tolist()  # type: ignore[no-any-return]

    def to_numpy(self) -> npt.NDArray[np.float32]:
        return np.asarray(self)


def vector_array(values: Any) -> VectorArray:
    """``values`` (a sequence of numbers, pgvector's text form ``[1,2,3]``, a ``pgvector.Vector`` or
    ``HalfVector``) as a :class:`VectorArray`."""
    if isinstance(values, str):
        inner = values.strip()[1:-1]
        values = [float(part) for part in inner.split(",")] if inner.strip() else []
    to_numpy = getattr(values, "to_numpy", None)
    array = np.asarray(to_numpy() if callable(to_numpy) else values, dtype=np.float32)
    return array.reshape(-1).view(VectorArray)


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


class CatalogTypeInfo(TypeInfo):
    """:class:`psycopg.types.TypeInfo` whose look-up names only pg_catalog's objects. psycopg's own compares
    ``t.oid = to_regtype(...)`` unqualified on the session's search_path, where a role that may create
    objects in a schema on it (``public``) can plant an ``=(oid, regtype)``, an exact match that PostgreSQL
    prefers to pg_catalog's ``=(oid, oid)``, and have it run with the rights of whoever connects (the rule in
    pgsim.db.catalog). The type's name is still found on the caller's path, as ``::regtype`` finds it."""

    @classmethod
    def _get_info_query(cls, conn: psycopg.BaseConnection[Any]) -> sql.SQL:
        return sql.SQL(
            "SELECT t.typname AS name, t.oid, t.typarray AS array_oid, "
            "t.oid::pg_catalog.regtype::pg_catalog.text AS regtype, t.typdelim AS delimiter "
            "FROM pg_catalog.pg_type t "
            "WHERE t.oid OPERATOR(pg_catalog.=) pg_catalog.to_regtype(%(name)s::pg_catalog.text)::pg_catalog.oid"
        )


PGVECTOR_TYPES = ("vector", "bit", "halfvec", "sparsevec")  # what pgvector.psycopg.register_vector adapts


def register(conn: psycopg.Connection[Any], model: str = DEFAULT_MODEL) -> None:
    """Adapt pgvector's types and :class:`Text` on ``conn``; ``model`` encodes Text that names none."""
    if isinstance(conn, psycopg.AsyncConnection):
        raise InvalidInput(
            "pgsim.register takes a psycopg.Connection; for an AsyncConnection: await pgsim.register_async(conn)."
        )
    infos = {name: CatalogTypeInfo.fetch(conn, name) for name in PGVECTOR_TYPES}
    _require_vector(conn, infos["vector"])
    _register_pgvector(conn, infos)
    _register_dumpers(conn, infos["vector"], model)


async def register_async(conn: psycopg.AsyncConnection[Any], model: str = DEFAULT_MODEL) -> None:
    """:func:`register` for an async connection. Encoding a query runs on the event loop's thread."""
    infos = {name: await CatalogTypeInfo.fetch(conn, name) for name in PGVECTOR_TYPES}
    _require_vector(conn, infos["vector"])
    _register_pgvector(conn, infos)
    _register_dumpers(conn, infos["vector"], model)


def _register_pgvector(conn: psycopg.BaseConnection[Any], infos: Mapping[str, TypeInfo | None]) -> None:
    """pgvector.psycopg.register_vector's adapters, from types looked up as :class:`CatalogTypeInfo` does
    (register_vector looks them up with psycopg's own query)."""
    from pgvector.psycopg.bit import register_bit_info
    from pgvector.psycopg.halfvec import register_halfvec_info
    from pgvector.psycopg.sparsevec import register_sparsevec_info
    from pgvector.psycopg.vector import register_vector_info

    register_vector_info(conn, infos["vector"])
    register_bit_info(conn, infos["bit"])
    for name, register_info in (("halfvec", register_halfvec_info), ("sparsevec", register_sparsevec_info)):
        info = infos[name]
        if info is not None:
            register_info(conn, info)


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
    for oid in _vector_oids(conn, vector_oid):
        conn.adapters.register_loader(oid, _VectorTextLoader)
        conn.adapters.register_loader(oid, _VectorBinaryLoader if oid == vector_oid else _HalfvecBinaryLoader)


def _vector_oids(conn: psycopg.BaseConnection[Any], vector_oid: int) -> list[int]:
    """The OIDs of ``vector`` and, where pgvector has it, ``halfvec`` (pgvector's registration has fetched both
    into the connection's types)."""
    found = conn.adapters.types.get("halfvec")
    return [vector_oid] if found is None else [vector_oid, found.oid]


class _VectorTextLoader(Loader):
    """``[1,2,3]`` (vector or halfvec, text format) as a VectorArray."""

    format = Format.TEXT

    def load(self, data: Any) -> VectorArray:
        return vector_array(bytes(data).decode())


class _VectorBinaryLoader(Loader):
    """pgvector's binary ``vector``: dimensions (uint16), unused (uint16), big-endian float32s."""

    format = Format.BINARY
    element = ">f4"

    def load(self, data: Any) -> VectorArray:
        buffer = bytes(data)
        (dimensions, _) = struct.unpack_from(">HH", buffer)
        values = np.frombuffer(buffer, dtype=self.element, count=dimensions, offset=4)
        return values.astype(np.float32).view(VectorArray)


class _HalfvecBinaryLoader(_VectorBinaryLoader):
    """pgvector's binary ``halfvec``: the same header, big-endian float16s (widened to float32, exactly)."""

    element = ">f2"
