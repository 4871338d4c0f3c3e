"""One definition of an embedding: before encode-on-flush writes a vector, the source, model and dtype that
``embedding_column`` declares are compared with the column's registration in ``pgsim.embedding``, which is
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
    "THEN pg_catalog.has_table_privilege(pg_catalog.to_regclass('pgsim.embedding'), 'SELECT') END"
)
# the column's registration, and one that replaces it (a change under way), by the table's OID
REGISTERED = text(
    "SELECT e.column_name, e.source, e.model, e.model_revision, e.dtype, r.column_name "
    "FROM pgsim.embedding e LEFT JOIN pgsim.embedding r ON r.id = e.replaces AND r.table_oid = e.table_oid "
    "WHERE e.table_oid = pg_catalog.to_regclass(:table) AND (e.column_name = :column OR r.column_name = :column) "
    "ORDER BY e.id"
)
ENCODE, WORKER = "encode", "worker"
_verdicts: weakref.WeakKeyDictionary[Any, TtlCache[tuple[Any, ...], str]] = weakref.WeakKeyDictionary()


class DefinitionMismatch(InvalidInput):
    """The ORM declares an embedding column differently (source, model or dtype) from its registration in
    the database: encoding on flush would write vectors the triggers and the worker would not."""


@dataclass(frozen=True)
class Definition:
    """What a column's embeddings are made of."""

    source: str  # SQL expression, as pgsim.embedding holds it
    model: str
    model_revision: str
    dtype: str


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
    return Definition(source, spec.model, model_revision(spec.model), spec.dtype)


def _verdict(connection: Any, column: Column[Any], spec: EmbeddingSpec) -> str:
    table = column.table
    if not connection.execute(READABLE).scalar():
        log.debug("no readable pgsim.embedding here: %s.%s is encoded as declared", table.name, column.name)
        return ENCODE
    name = connection.dialect.identifier_preparer.format_table(table)
    rows = connection.execute(REGISTERED, {"table": name, "column": column.name}).all()
    if not rows:
        return ENCODE
    wanted = declared(spec)
    own = [Definition(*row[1:5]) for row in rows if row[0] == column.name]
    changes = [Definition(*row[1:5]) for row in rows if row[5] == column.name]
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
    command = " ".join(["pgsim change-embedding", qualified, column.name, *(flag for flag, _ in options)])
    schema = [f"schema={table.schema!r}"] if table.schema else []
    operation = ", ".join([repr(table.name), repr(column.name), *(argument for _, argument in options), *schema])
    under_way = (
        f" (a change under way makes it {', '.join(_describe(change) for change in changes)}, not the declared one)"
        if changes
        else ""
    )
    return (
        f"{qualified}.{column.name}: the ORM declares {_describe(wanted)}, but the database's registration "
        f"(pgsim.embedding) has {'; '.join(differences)}{under_way}. Encoding on flush would store vectors of other "
        "text than the database's triggers and worker make, so nothing was written. Bring the database to the "
        f"declared definition with a migration: `{command}` (Alembic: op.change_embedding({operation})), then let "
        "the worker switch over; or declare what the database has in embedding_column()."
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
    return found


def _describe(definition: Definition) -> str:
    return f"source {definition.source} by {definition.model!r} as {definition.dtype}"
