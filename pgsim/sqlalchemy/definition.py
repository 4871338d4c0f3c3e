"""One definition of an embedding: before encode-on-flush writes a vector, the source, model, dtype and chunk
settings that ``embedding_column`` declares are compared with the column's registration in ``pgsim.embedding``, which is
what the database's triggers and ``pgsim worker`` encode. When they differ, the two write paths would store
vectors of different text (or models) in one column, and no search could tell: the flush is refused, with
the migration that brings the database to the declared definition.

- The registration agrees: the ORM encodes.
- A change to the declared definition is under way (``pgsim change-embedding``: a registration that
  replaces this column, filling in the background): the ORM leaves the column to the worker, which embeds
  the row in the new column; it becomes searchable at the switch, as every other row written meanwhile.
- No registration (pgsim not installed, or the column not registered yet): nothing to disagree with; the
  ORM encodes.

What the database says is read once per engine and column, and kept for ``CHECK_SECONDS`` (a migration run
meanwhile is seen within that time); a disagreement is read again at every flush, so the fix is seen at once.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from pgsim.columns.registry import columns_expression
from pgsim.encoding.models import model_revision
from pgsim.errors import InvalidInput
from pgsim.knn.caches import TtlCache

if TYPE_CHECKING:
    from sqlalchemy import Column

    from pgsim.sqlalchemy.columns import EmbeddingSpec

log = logging.getLogger(__name__)
CHECK_SECONDS = 30.0
READABLE = text(
    "SELECT CASE WHEN pg_catalog.to_regclass('pgsim.embedding') IS NOT NULL "
    "THEN pg_catalog.has_table_privilege(pg_catalog.to_regclass('pgsim.embedding'), 'SELECT') END, "
    "CASE WHEN pg_catalog.to_regclass('pgsim.chunking') IS NOT NULL "
    "THEN pg_catalog.has_table_privilege(pg_catalog.to_regclass('pgsim.chunking'), 'SELECT') END"
)
# the column's registration, and one that replaces it (a change under way), by the table's OID; their chunk
# settings ({chunks}: pgsim.chunking's, or NULLs where it is not there). Operators qualified and operands typed:
# this runs on the session's search_path (the rule in pgsim.db.catalog).
_REGISTERED = (
    "SELECT e.column_name, e.source, e.model, e.model_revision, e.dtype, {chunks}, r.column_name "
    "FROM pgsim.embedding e LEFT JOIN pgsim.embedding r ON r.id OPERATOR(pg_catalog.=) e.replaces "
    "AND r.table_oid OPERATOR(pg_catalog.=) e.table_oid {join}"
    "WHERE e.table_oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(CAST(:table AS pg_catalog.text)) "
    "AND (e.column_name OPERATOR(pg_catalog.=) CAST(:column AS pg_catalog.name) "
    "OR r.column_name OPERATOR(pg_catalog.=) CAST(:column AS pg_catalog.name)) ORDER BY e.id"
)
REGISTERED = text(
    _REGISTERED.format(
        chunks="k.tokens, k.overlap",
        join="LEFT JOIN pgsim.chunking k ON k.embedding_id OPERATOR(pg_catalog.=) e.id "
        "AND k.table_oid OPERATOR(pg_catalog.=) e.table_oid ",
    )
)
REGISTERED_UNCHUNKED = text(_REGISTERED.format(chunks="NULL::pg_catalog.int4, NULL::pg_catalog.int4", join=""))
ENCODE, WORKER = "encode", "worker"
_verdicts: weakref.WeakKeyDictionary[Any, TtlCache[tuple[Any, ...], str]] = weakref.WeakKeyDictionary()


class DefinitionMismatch(InvalidInput):
    """The ORM declares an embedding column differently (source, model, dtype or chunks) from its
    registration in the database: encoding on flush would write vectors the triggers and the worker would not
    (or the documents' chunks the ORM expects would not be there)."""


@dataclass(frozen=True)
class Definition:
    """What a column's embeddings are made of."""

    source: str  # SQL expression, as pgsim.embedding holds it
    model: str
    model_revision: str
    dtype: str
    chunks: tuple[int, int] | None = None  # (tokens, overlap) when the documents are chunked


def encodes_on_flush(connection: Any, column: Column[Any], spec: EmbeddingSpec) -> bool:
    """True: the ORM encodes ``column`` (its registration agrees, or there is none); False: a change to the
    declared definition is under way, and the worker embeds the row. :class:`DefinitionMismatch` otherwise.
    ``connection`` is the SQLAlchemy Connection the flush writes through."""
    cache = _verdicts.get(connection.engine)
    if cache is None:
        cache = _verdicts[connection.engine] = TtlCache(CHECK_SECONDS, size=256)
    table = column.table
    key = (table.schema, table.name, column.name, spec)
    verdict = cache.get(key)
    if verdict is None:
        verdict = _verdict(connection, column, spec)  # raises on a disagreement: read again next time
        cache.put(key, verdict)
    return verdict == ENCODE


def forget_definitions() -> None:
    """Read every registration again at the next flush (after changing one in this process)."""
    _verdicts.clear()


def declared(spec: EmbeddingSpec) -> Definition:
    source = spec.source if isinstance(spec.source, str) else columns_expression(list(spec.source))
    chunks = (spec.chunks.tokens, spec.chunks.overlap) if spec.chunks is not None else None
    return Definition(source, spec.model, model_revision(spec.model), spec.dtype, chunks)


def _definition(row: Any) -> Definition:
    """A row of REGISTERED (column, source, model, revision, dtype, tokens, overlap, replaced) as a Definition."""
    chunks = (int(row[5]), int(row[6])) if row[5] is not None else None
    return Definition(row[1], row[2], row[3], row[4], chunks)


def _verdict(connection: Any, column: Column[Any], spec: EmbeddingSpec) -> str:
    table = column.table
    readable, chunking = connection.execute(READABLE).one()
    if not readable:
        log.debug("no readable pgsim.embedding here: %s.%s is encoded as declared", table.name, column.name)
        return ENCODE
    name = connection.dialect.identifier_preparer.format_table(table)
    query = REGISTERED if chunking else REGISTERED_UNCHUNKED  # before pgsim.chunking, nothing was chunked
    rows = connection.execute(query, {"table": name, "column": column.name}).all()
    if not rows:
        return ENCODE
    wanted = declared(spec)
    own = [_definition(row) for row in rows if row[0] == column.name]
    changes = [_definition(row) for row in rows if row[7] == column.name]
    registered = own[0] if own else None
    if registered == wanted:
        return ENCODE
    if wanted in changes:
        return WORKER
    raise DefinitionMismatch(_message(table, column, spec, wanted, registered, changes))


def _message(
    table: Any, column: Column[Any], spec: EmbeddingSpec, wanted: Definition, registered: Definition | None,
    changes: Sequence[Definition],
) -> str:  # fmt: skip
    qualified = f"{table.schema}.{table.name}" if table.schema else table.name
    differences = _differences(wanted, registered) if registered else ["no registration of the column itself"]
    options = []
    if registered is None or wanted.source != registered.source:
        names = list(spec.source) if not isinstance(spec.source, str) else [spec.source]
        options.append(("--source " + " ".join(names), f"source={names if len(names) > 1 else names[0]!r}"))
    if registered is None or (wanted.model, wanted.model_revision) != (registered.model, registered.model_revision):
        options.append((f"--model {wanted.model}", f"model={wanted.model!r}"))
    if registered is None or wanted.dtype != registered.dtype:
        options.append((f"--dtype {wanted.dtype}", f"dtype={wanted.dtype!r}"))
    if wanted.chunks is not None and (registered is None or wanted.chunks != registered.chunks):
        tokens, overlap = wanted.chunks
        options.append(
            (f"--chunk-tokens {tokens} --chunk-overlap {overlap}", f"chunks=pgsim.Chunks({tokens}, {overlap})")
        )
    schema = [f"schema={table.schema!r}"] if table.schema else []
    if registered is not None and not options and wanted.chunks is None:  # only the chunks go
        return _unchunk_message(qualified, table, column, wanted, registered, schema)
    command = " ".join(["pgsim change-embedding", qualified, column.name, *(flag for flag, _ in options)])
    operation = ", ".join([repr(table.name), repr(column.name), *(argument for _, argument in options), *schema])
    unchunk = ""  # the change keeps the chunks: they go after it
    if registered is not None and registered.chunks is not None and wanted.chunks is None:
        unchunk = f", and remove its chunks: pgsim.remove_chunks(conn, {qualified!r}, {column.name!r})"
    under_way = (
        f" (a change under way makes it {', '.join(_describe(change) for change in changes)}, not the declared one)"
        if changes
        else ""
    )
    return (
        f"{qualified}.{column.name}: the ORM declares {_describe(wanted)}, but the database's registration "
        f"(pgsim.embedding) has {'; '.join(differences)}{under_way}. Encoding on flush would store vectors of other "
        "text than the database's triggers and worker make, so nothing was written. Bring the database to the "
        f"declared definition with a migration: `{command}` (Alembic: op.change_embedding({operation}"
        f"{', chunks=False' if unchunk else ''})), then let the worker switch over{unchunk}; or declare what the "
        "database has in embedding_column()."
    )


def _unchunk_message(
    qualified: str, table: Any, column: Column[Any], wanted: Definition, registered: Definition, schema: list[str]
) -> str:
    """The database keeps the column's documents as chunks, and the ORM declares none: remove_chunks."""
    operation = ", ".join([repr(table.name), repr(column.name), *schema])
    return (
        f"{qualified}.{column.name}: the ORM declares {_describe(wanted)}, but the database's registration has "
        f"{'; '.join(_differences(wanted, registered))}. Nothing was written. Bring the database to the declared "
        f"definition with pgsim.remove_chunks(conn, {qualified!r}, {column.name!r}) (Alembic: "
        f"op.remove_chunks({operation})); or declare embedding_column(..., chunks=pgsim.Chunks"
        f"{registered.chunks}) as the database has it."
    )


def _differences(wanted: Definition, registered: Definition) -> list[str]:
    found = []
    if wanted.source != registered.source:
        found.append(f"source {registered.source} where the ORM's is {wanted.source}")
    if wanted.model != registered.model:
        found.append(f"model {registered.model!r} where the ORM's is {wanted.model!r}")
    elif wanted.model_revision != registered.model_revision:
        found.append(
            f"revision {registered.model_revision} of {registered.model!r}, where this machine has revision "
            f"{wanted.model_revision}"
        )
    if wanted.dtype != registered.dtype:
        found.append(f"dtype {registered.dtype} where the ORM's is {wanted.dtype}")
    if wanted.chunks != registered.chunks:
        found.append(f"{_chunks(registered.chunks)} where the ORM declares {_chunks(wanted.chunks)}")
    return found


def _chunks(chunks: tuple[int, int] | None) -> str:
    if chunks is None:
        return "no chunks"
    return f"chunks of {chunks[0]} word pieces (overlap {chunks[1]})"


def _describe(definition: Definition) -> str:
    chunked = f", in {_chunks(definition.chunks)}" if definition.chunks is not None else ""
    return f"source {definition.source} by {definition.model!r} as {definition.dtype}{chunked}"
