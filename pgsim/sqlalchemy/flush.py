"""Encode-on-flush for ``sync="flush"`` embedding columns: one ``before_flush`` hook encodes every new object,
and every changed object whose source changed, in one batch per model; bulk INSERTs through the ORM too;
assignments to an embedding attribute are checked at once.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.orm import Mapper, ORMExecuteState, Session

from pgsim.encoding.encoder import Vector, check_vector
from pgsim.errors import InvalidInput
from pgsim.sqlalchemy.definition import encodes_on_flush
from pgsim.sqlalchemy.offload import off_event_loop
from pgsim.sqlalchemy.types import Embedding, HalfEmbedding

if TYPE_CHECKING:
    from pgsim.sqlalchemy.columns import EmbeddingSpec


log = logging.getLogger(__name__)


_flush_specs_by_mapper: weakref.WeakKeyDictionary[Mapper[Any], list[tuple[str, EmbeddingSpec, list[str]]]] = (
    weakref.WeakKeyDictionary()
)


def flush_specs(mapper: Mapper[Any]) -> list[tuple[str, EmbeddingSpec, list[str]]]:
    """(attribute, spec, source attributes) for each sync='flush' embedding column of ``mapper``."""
    known = _flush_specs_by_mapper.get(mapper)
    if known is None:
        known = _flush_specs_by_mapper[mapper] = _read_flush_specs(mapper)
    return known


def _read_flush_specs(mapper: Mapper[Any]) -> list[tuple[str, EmbeddingSpec, list[str]]]:
    found = []
    for prop in mapper.column_attrs:
        spec = prop.columns[0].info.get("pgsim")
        if spec is None or spec.sync != "flush":
            continue
        table = prop.columns[0].table
        assert table is not None
        sources = []
        for name in spec.source:
            if name not in table.c:
                elsewhere = [str(getattr(other, "name", other)) for other in mapper.tables if name in other.c]
                where = f" (it is in {', '.join(elsewhere)}, a table of another class of the hierarchy)"
                owner = str(getattr(table, "name", table))
                raise InvalidInput(
                    f"The source column {name!r} of {owner}.{prop.columns[0].name} is not in {owner}"
                    f"{where if elsewhere else ''}: the source must be columns of the embedding's own table, which "
                    "the database's triggers read too. Add the text column to that table."
                )
            sources.append(mapper.get_property_by_column(table.c[name]).key)
        found.append((prop.key, spec, sources))
    return found


def _assigned(history: Any, column_type: Any) -> bool:
    """Whether the application gave the embedding a vector of its own: a value, not None, that differs
    from the one stored (``merge()`` copies the stored vector back, which is not an assignment)."""
    added = [value for value in history.added if value is not None]
    if not added:
        return False
    return not any(column_type.compare_values(added[-1], stored) for stored in history.deleted)


def encode_on_flush(session: Session, flush_context: Any, instances: Any) -> None:
    """``before_flush``: encode, in one batch per model, the new objects and those whose source changed;
    an embedding the application assigned itself is kept."""
    from sqlalchemy import inspect

    work: list[tuple[Any, str, EmbeddingSpec, str]] = []
    verdicts: dict[Any, bool] = {}
    for obj in [*session.new, *session.dirty]:
        state = inspect(obj)
        for key, spec, sources in flush_specs(state.mapper):
            if _assigned(state.attrs[key].history, state.mapper.columns[key].type):
                continue
            if state.key is not None and not any(state.attrs[name].history.has_changes() for name in sources):
                continue
            if not _agreed(verdicts, state.mapper, key, spec, lambda m=state.mapper: session.connection({"mapper": m})):
                continue  # a change to the declared definition is under way: the worker embeds the row
            work.append((obj, key, spec, _source_text([getattr(obj, name) for name in sources])))
    for (obj, key, _, _), vector in zip(work, _encode(work), strict=True):
        setattr(obj, key, vector)


def encode_bulk_insert(state: ORMExecuteState) -> Any:
    """``do_orm_execute``: ``session.execute(insert(Doc), [{...}, ...])`` never flushes, so its rows are
    encoded here, in one batch per model; a row that names the embedding keeps what it gives. (Bulk
    UPDATEs and ``insert().values()`` are left to the database's triggers and ``pgsim worker``.)"""
    if not state.is_insert or not state.is_executemany or state.bind_mapper is None:
        return None
    mapper = state.bind_mapper
    verdicts: dict[Any, bool] = {}
    specs = [
        (key, spec, sources)
        for key, spec, sources in flush_specs(mapper)
        if _agreed(verdicts, mapper, key, spec, lambda: state.session.connection(state.bind_arguments))
    ]
    rows: list[dict[str, Any]] = state.parameters  # type: ignore[assignment]
    work = [
        (number, key, spec, _source_text([row.get(name) for name in sources]))
        for number, row in enumerate(rows)
        for key, spec, sources in specs
        if key not in row
    ]
    if not work:
        return None
    additions: list[dict[str, Any]] = [{} for _ in rows]
    for (number, key, _, _), vector in zip(work, _encode(work), strict=True):
        additions[number][key] = vector
    return state.invoke_statement(params=additions)


def _agreed(verdicts: dict[Any, bool], mapper: Mapper[Any], key: str, spec: EmbeddingSpec, connection: Any) -> bool:
    """Whether the ORM encodes ``key`` of ``mapper``'s objects (see :mod:`pgsim.sqlalchemy.definition`): the
    database's registration agrees with ``spec``; once per column in a flush. ``connection()`` gives the
    SQLAlchemy Connection the flush writes through. A chunked column is checked but never encoded here: its
    vector is its chunks' mean, written with them by the workers (pgsim.columns.chunking.sync_step)."""
    column = mapper.columns[key]
    if column not in verdicts:
        verdicts[column] = encodes_on_flush(connection(), column, spec) and spec.chunks is None
    return verdicts[column]


def _encode_with(model: str, texts: list[str]) -> list[Vector | None]:
    from pgsim.encoding.encoder import encoder_for

    return encoder_for(model).encode(texts)


def _source_text(parts: Sequence[Any]) -> str:
    return "\n\n".join(str(part) for part in parts if part is not None)  # concat_ws, as the triggers see it


def _encode(work: Sequence[tuple[Any, str, EmbeddingSpec, str]]) -> list[Vector | None]:
    """The vectors of ``work``'s texts, in order: one encoder call per model, off an asyncio event loop."""
    vectors: list[Vector | None] = [None] * len(work)
    models = {spec.model for _, _, spec, _ in work}
    for model in sorted(models):
        numbers = [number for number, (_, _, spec, _) in enumerate(work) if spec.model == model]
        texts = [work[number][3] for number in numbers]
        log.info("encoding %d texts with %s", len(texts), model)
        encoded = off_event_loop(partial(_encode_with, model, texts))  # loading the model blocks too
        for number, vector in zip(numbers, encoded, strict=True):
            vectors[number] = vector
    return vectors


def check_assignments(mapper: Mapper[Any], class_: type) -> None:
    for prop in mapper.column_attrs:
        column_type = prop.columns[0].type
        if isinstance(column_type, (Embedding, HalfEmbedding)):
            event.listen(getattr(class_, prop.key), "set", _checker(column_type.dim), retval=True)
    # a source set to the value it has (after a commit expired it, say) is no change: load the old value
    # when it is set, so that the history compares the two
    for _, _, sources in flush_specs(mapper):
        for name in sources:
            attribute = getattr(class_, name)
            if not attribute.impl.active_history:
                event.listen(attribute, "set", _unchanged, retval=True, active_history=True)


def _unchanged(target: Any, value: Any, oldvalue: Any, initiator: Any) -> Any:
    return value


def _checker(dimension: int | None) -> Any:
    def check(target: Any, value: Any, oldvalue: Any, initiator: Any) -> Any:
        return None if value is None else check_vector(value, dimension)

    return check
