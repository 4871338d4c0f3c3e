"""``embedding_column``: an ORM column that holds embeddings of other columns, and the hooks that fill it.

    class Doc(Base):
        __tablename__ = "docs"
        id: Mapped[int] = mapped_column(primary_key=True)
        section: Mapped[str]
        description: Mapped[str]
        embedding = embedding_column(source="description", index=HNSW(m=16))

- The column is ``vector(d)`` (or ``halfvec(d)``) with ``d`` read from the model's files (nothing loads).
- ``index`` adds an HNSW index to the table, so ``create_all`` and Alembic see it.
- ``sync="flush"``: one ``before_flush`` hook encodes every new object, and every changed object whose
  source changed, in one batch per model. ``sync="worker"``: the database's triggers queue the rows and
  ``pgsim worker`` embeds them (any SQL expression can be the source then).
- ``create_all`` installs pgsim first (``CREATE EXTENSION vector`` and schema ``pgsim``); after it, on a
  psycopg connection, the column is registered in ``pgsim.embedding`` (with its
  triggers), so rows written by other clients are embedded too; see :func:`register_embeddings`.
- Assigning a vector of the wrong dimension (or with NaN) to the attribute is an error at once.
- ``chunks=pgsim.Chunks(tokens, overlap)`` registers the column chunked (see :func:`pgsim.add_embedding`):
  ``.nearest()`` then returns documents ranked by their best chunk, once the worker has made the chunks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pgvector.sqlalchemy import HALFVEC, VECTOR
from sqlalchemy import Column, Index, Table, event
from sqlalchemy.orm import MappedColumn, Mapper, Session, mapped_column
from sqlalchemy.sql.elements import quoted_name

from pgsim.columns.adding import DEFAULT_HNSW
from pgsim.columns.chunking.settings import Chunks, checked_chunks
from pgsim.columns.registry import DTYPES, checked_prefix
from pgsim.db.hnsw import DEFAULT_EF_CONSTRUCTION, DEFAULT_M, HNSW
from pgsim.db.names import derived_name
from pgsim.encoding.models import DEFAULT_MODEL, model_dimension
from pgsim.errors import InvalidInput
from pgsim.sqlalchemy.flush import check_assignments, encode_bulk_insert, encode_on_flush
from pgsim.sqlalchemy.types import Embedding, HalfEmbedding

log = logging.getLogger(__name__)
SYNC_MODES = ("flush", "worker")
HNSW_INFO = "pgsim_hnsw"  # Index.info key: the HNSW parameters of an index made by hnsw_index()
DEFAULT_INDEX = "pgsim_default_index"  # Index.info key: the index embedding_column added by itself


@dataclass(frozen=True)
class EmbeddingSpec:
    """What ``embedding_column`` declared; kept in the column's ``info["pgsim"]``."""

    source: tuple[str, ...] | str  # column names, or an SQL expression (sync="worker" only)
    model: str
    dtype: str
    index: HNSW | None
    sync: str
    chunks: Chunks | None = None  # the documents are also kept as chunks (pgsim.chunking)
    prefix: int | None = None  # prefix storage: the index holds each vector's first ``prefix`` values

    @property
    def indexes_an_expression(self) -> bool:
        """Bit or prefix storage: the index is over an expression of the column (binary_quantize, subvector),
        which the models do not declare and pgsim.add_embedding builds itself."""
        return self.dtype == "bit" or self.prefix is not None

    @property
    def source_sql(self) -> Any:
        return self.source if isinstance(self.source, str) else list(self.source)


def embedding_column(
    *,
    source: str | Sequence[str],
    model: str = DEFAULT_MODEL,
    dtype: str = "vector",
    index: HNSW | None = DEFAULT_HNSW,
    sync: str = "flush",
    dimension: int | None = None,
    chunks: Chunks | None = None,
    prefix: int | None = None,
) -> MappedColumn[Any]:
    """A nullable embedding column filled from ``source`` (a column name, several, or with
    ``sync="worker"`` an SQL expression over the table's columns) by ``model``; ``chunks``
    (:class:`pgsim.Chunks`) also keeps each document's text as chunks, which searches rank documents by;
    ``prefix`` (prefix storage, for a Matryoshka-trained model) indexes each vector's first ``prefix`` values."""
    checked_chunks(chunks)
    if sync not in SYNC_MODES:
        raise InvalidInput(f"sync must be one of {', '.join(SYNC_MODES)}; got {sync!r}.")
    if dtype not in DTYPES:
        raise InvalidInput(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    if (dtype == "bit" or prefix is not None) and chunks is not None:
        storage = "dtype='bit'" if dtype == "bit" else "prefix storage"
        raise InvalidInput(f"{storage} does not take chunks yet: chunk a vector or halfvec column.")
    names = (source,) if isinstance(source, str) else tuple(source)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise InvalidInput(f"source must name the column(s) holding the text; got {source!r}.")
    expression = len(names) == 1 and not names[0].isidentifier()
    if expression and sync == "flush":
        raise InvalidInput(
            f"source {names[0]!r} is an SQL expression, which only the database can evaluate: use sync='worker', "
            "or name the columns that hold the text."
        )
    if dimension is not None:
        known = _local_model_dimension(model)
        if known is not None and known != dimension:
            raise InvalidInput(
                f"dimension={dimension}, but {model} makes vectors of {known} dimensions: leave dimension out "
                "(it is read from the model), or name the model that makes them."
            )
    size = dimension or model_dimension(model)  # an unknown model fails here, when the class is defined
    prefix = checked_prefix(prefix, model, size, dtype)
    spec = EmbeddingSpec(names[0] if expression else names, model, dtype, index, sync, chunks, prefix)
    kind = HalfEmbedding if dtype == "halfvec" else Embedding  # bit keeps full vectors; its index is binary
    mapped = mapped_column(kind(size, model), nullable=True, info={"pgsim": spec})
    event.listen(mapped.column, "after_parent_attach", _attached)
    _install_hooks()
    return mapped


def _local_model_dimension(model: str) -> int | None:
    """The dimension of ``model`` if its files are on this machine (nothing downloads or loads), else None."""
    from pathlib import Path

    from pgsim.encoding.models import cached_snapshot, resolve_model

    try:
        if not (Path(resolve_model(model)).is_dir() or cached_snapshot(model)):
            return None
        return model_dimension(model)
    except Exception:  # an unknown or broken model: the dimension given is all there is
        log.debug("could not read the dimension of %s", model, exc_info=True)
        return None


def hnsw_index(
    column: str | Column[Any] | MappedColumn[Any],
    *,
    name: str | None = None,
    m: int = DEFAULT_M,
    ef_construction: int = DEFAULT_EF_CONSTRUCTION,
) -> Index:
    """An HNSW index (cosine) on an embedding column, for ``__table_args__`` or a Table. ``column`` is the
    column, its ``mapped_column``, or its name; the name defaults to ``<table>_<column>_hnsw``. It takes
    the place of the index ``embedding_column`` would add."""
    hnsw = HNSW(m, ef_construction)
    target = getattr(column, "column", column)  # a MappedColumn's Column
    index = Index(
        name,
        target,
        postgresql_using="hnsw",
        postgresql_with={"m": hnsw.m, "ef_construction": hnsw.ef_construction},
        info={HNSW_INFO: hnsw},
    )

    def complete(index: Index, table: Any) -> None:
        """Name and operator class, once the column (and so its table and type) is known."""
        (indexed,) = index.columns
        if not isinstance(indexed.type, (VECTOR, HALFVEC)):
            raise InvalidInput(
                f"hnsw_index: column {indexed.name!r} is {indexed.type}, not a vector: index an embedding column."
            )
        if name is None:
            index.name = quoted_name(derived_name(table.name, indexed.name, suffix="hnsw"), None)
        kind = "halfvec" if isinstance(indexed.type, HALFVEC) else "vector"
        index.dialect_options["postgresql"]["ops"] = {indexed.name: f"{kind}_cosine_ops"}

    if index.table is not None:
        complete(index, index.table)
    else:
        event.listen(index, "after_parent_attach", complete)
    return index


def embedding_specs(table: Table) -> list[tuple[Column[Any], EmbeddingSpec]]:
    return [(column, column.info["pgsim"]) for column in table.columns if "pgsim" in column.info]


def register_embeddings(connection: Any, tables: Sequence[Table]) -> None:
    """Register the embedding columns of ``tables`` in ``pgsim.embedding`` (installing pgsim's schema if
    needed), with their triggers (and their chunk tables, when declared with ``chunks``); the ORM-declared
    HNSW indexes are adopted. A column registered already is left as it is (a difference from the declaration
    is reported at flush: :mod:`pgsim.sqlalchemy.definition`). ``connection`` is a SQLAlchemy
    Connection on the psycopg driver. Idempotent. Run by ``create_all`` for you."""
    import psycopg

    from pgsim.columns.adding import add_embedding
    from pgsim.columns.registry import forget_dropped, get_registration
    from pgsim.db.schema import install

    raw = connection.connection.driver_connection
    if not isinstance(raw, psycopg.Connection):
        raise InvalidInput(
            "Registering embedding columns needs a synchronous psycopg connection (postgresql+psycopg://). With "
            "an async engine, call pgsim.sqlalchemy.register_embeddings_sync(url, metadata) after create_all."
        )
    pending = [(table, column, spec) for table in tables for column, spec in embedding_specs(table)]
    if not pending:
        return
    install(raw)
    forget_dropped(raw)  # a table dropped and created again must not keep its old registration
    for table, column, spec in pending:
        name = f"{table.schema or _search_schema(raw)}.{table.name}"
        if get_registration(raw, name, column.name) is None:
            index_name, index = (None, spec.index) if spec.indexes_an_expression else _declared_hnsw(table, column)
            add_embedding(raw, name, column.name, source=spec.source_sql, model=spec.model, dtype=spec.dtype,
                          index=index, index_name=index_name, queue_existing=spec.sync == "worker",
                          chunks=spec.chunks, prefix=spec.prefix)  # fmt: skip


def _declared_hnsw(table: Table, column: Column[Any]) -> tuple[str | None, HNSW | None]:
    """The name and parameters of the HNSW index ``table`` declares on ``column`` (``embedding_column``'s
    own, or one from ``hnsw_index``/``Index(..., postgresql_using="hnsw")``), or (None, None)."""
    for index in sorted(table.indexes, key=lambda index: str(index.name)):
        options = index.dialect_options["postgresql"]
        if options["using"] != "hnsw" or list(index.columns) != [column] or index.name is None:
            continue
        hnsw = index.info.get(HNSW_INFO)
        if not isinstance(hnsw, HNSW):
            given = options["with"] or {}
            hnsw = HNSW(
                int(given.get("m", DEFAULT_HNSW.m)), int(given.get("ef_construction", DEFAULT_HNSW.ef_construction))
            )
        return str(index.name), hnsw
    return None, None


def register_embeddings_sync(url: str, metadata: Any) -> None:
    """:func:`register_embeddings` for every table of ``metadata``, on a new connection to ``url`` (for async
    engines: the tables must exist, committed)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    sync_url = make_url(url).set(drivername="postgresql+psycopg")
    engine = create_engine(sync_url)
    try:
        with engine.begin() as connection:
            register_embeddings(connection, list(metadata.sorted_tables))
    finally:
        engine.dispose()


def _search_schema(raw: Any) -> str:
    row = raw.execute("SELECT current_schema()").fetchone()
    return str(row[0]) if row else "public"


def _attached(column: Column[Any], table: Any) -> None:
    if not isinstance(table, Table):
        return
    spec: EmbeddingSpec = column.info["pgsim"]
    expression = spec.indexes_an_expression  # its index is pgsim.add_embedding's to build
    declared = not expression and any(column in index.columns.values() for index in table.indexes)
    if spec.index is not None and not expression and not declared:
        default = hnsw_index(column, m=spec.index.m, ef_construction=spec.index.ef_construction)
        default.info[DEFAULT_INDEX] = True
    if not event.contains(table, "after_create", _after_create):
        event.listen(table, "before_create", _before_create)
        event.listen(table, "after_create", _after_create)


def _before_create(table: Table, connection: Any, **_: Any) -> None:
    """pgvector's types must exist before the table: install pgsim (CREATE EXTENSION vector + schema)."""
    import psycopg

    from pgsim.db.schema import install

    raw = connection.connection.driver_connection
    if isinstance(raw, psycopg.Connection):
        install(raw)
    else:
        connection.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS vector")


def _after_create(table: Table, connection: Any, **_: Any) -> None:
    import psycopg

    if isinstance(connection.connection.driver_connection, psycopg.Connection):
        register_embeddings(connection, [table])
    else:
        log.warning(
            "%s was created on %s connection, where pgsim cannot register its embedding columns (so no trigger "
            "queues rows other clients write): call pgsim.sqlalchemy.register_embeddings_sync(url, metadata) once "
            "the table is committed.",
            table.name,
            "an async" if connection.dialect.is_async else f"a {connection.dialect.driver}",
        )


def _replace_default_index(index: Index, table: Any) -> None:
    """An HNSW index declared on an embedding column replaces the one ``embedding_column`` added."""
    options = index.dialect_options["postgresql"]
    if index.info.get(DEFAULT_INDEX) or options["using"] != "hnsw" or not isinstance(table, Table):
        return
    for default in [other for other in table.indexes if other.info.get(DEFAULT_INDEX)]:
        if set(default.columns) & set(index.columns):
            table.indexes.discard(default)


_hooks_lock = threading.Lock()
_hooks_installed = False


def _install_hooks() -> None:
    """Session and mapper hooks, once per process, when the first embedding column is declared."""
    global _hooks_installed
    with _hooks_lock:
        if _hooks_installed:
            return
        from pgsim.sqlalchemy.knn import filtered_knn

        event.listen(Session, "before_flush", encode_on_flush)
        event.listen(Session, "do_orm_execute", filtered_knn)
        event.listen(Session, "do_orm_execute", encode_bulk_insert)
        event.listen(Mapper, "mapper_configured", check_assignments)
        event.listen(Index, "after_parent_attach", _replace_default_index)
        _hooks_installed = True
