"""Hybrid search, the relevance threshold and near-duplicates for ORM users: a Session, a mapped class (and
its embedding attribute, when it has more than one), criteria as SQLAlchemy expressions, mapped objects back.

    with Session(engine) as session:
        for match in hybrid_search(session, Doc, "xml parser", k=5, where=Doc.section == "libs"):
            print(match.score, match.obj.description)

Each runs :mod:`pgsim.quality`'s search on the session's own connection, in its transaction (pending changes
are flushed first, when the session autoflushes), asking for the primary keys only, then loads the objects
in one SELECT and returns them in the search's order. The criteria the ORM adds itself (single-table
inheritance) join the filter, so a search of a subclass finds its k rows among that subclass's. A synchronous
``Session`` on the psycopg driver: these searches run psycopg statements of their own, which an
``AsyncSession``'s driver does not take.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from psycopg import sql
from sqlalchemy import Table, and_, inspect, select, tuple_
from sqlalchemy.orm import Mapper, Session

from pgsim.errors import InvalidInput
from pgsim.knn.planner import DEFAULT_TUNING, Tuning
from pgsim.quality import duplicates, hybrid, relevance
from pgsim.quality.connections import psycopg_connection
from pgsim.sqlalchemy.knn import where_criteria
from pgsim.sqlalchemy.types import Embedding, HalfEmbedding

T = TypeVar("T")
Criteria = Any  # a SQLAlchemy boolean expression, a sequence of them (ANDed), or {column: value} as pgsim.search


@dataclass(frozen=True)
class FusedMatch(Generic[T]):
    """A mapped object found by :func:`hybrid_search`, with what :class:`pgsim.FusedHit` says of its row."""

    obj: T
    score: float
    distance: float | None
    vector_rank: int | None
    text_rank: int | None
    relevance: float | None


@dataclass(frozen=True)
class RelevantMatch(Generic[T]):
    """A mapped object found by :func:`relevant_search`, with what :class:`pgsim.RelevantHit` says of its row."""

    obj: T
    distance: float
    score: float


def hybrid_search(
    session: Session,
    cls: type[T],
    query: str,
    *,
    embedding: Any = None,
    k: int = 10,
    where: Criteria = None,
    text_column: Any = None,
    text_config: str | None = None,
    candidates: int = hybrid.DEFAULT_CANDIDATES,
    rrf_k: int | None = None,
    min_score: float | None = None,
    tuning: Tuning = DEFAULT_TUNING,
) -> list[FusedMatch[T]]:
    """:func:`pgsim.hybrid_search` over ``cls``'s table: the k objects (that pass ``where``) with the best
    fused rank of the vector search on ``embedding`` (default: the class's only embedding attribute) and the
    full-text search on ``text_column`` (an attribute or column name of a ``tsvector`` column; default: the
    table's only one); with ``min_score``, only those whose relevance reaches it. ``rrf_k`` left out: the
    table's calibrated fusion's, else 60."""
    target = _Target.of(session, cls, embedding)
    hits = hybrid.hybrid_search(
        target.connection, target.table_name, target.column, query, k=k, where=target.where(where),
        text_column=_column_name(text_column), text_config=text_config, columns=target.key_names,
        candidates=candidates, rrf_k=rrf_k, min_score=min_score, tuning=tuning,
    )  # fmt: skip
    objects = target.load([hit.row for hit in hits])
    return [
        FusedMatch(obj, hit.score, hit.distance, hit.vector_rank, hit.text_rank, hit.relevance)
        for obj, hit in zip(objects, hits, strict=True)
        if obj is not None
    ]


def relevant_search(
    session: Session,
    cls: type[T],
    query: Any,
    *,
    embedding: Any = None,
    k: int = 10,
    min_score: float | None = None,
    reference: int = relevance.DEFAULT_REFERENCE,
    where: Criteria = None,
    tuning: Tuning = DEFAULT_TUNING,
) -> list[RelevantMatch[T]]:
    """:func:`pgsim.relevant_search` over ``cls``'s table: the objects among the k nearest to ``query`` (text,
    encoded with the column's model, or a vector) that pass ``where`` and stand out from the query's
    ``reference``-th nearest by at least ``min_score`` (left out: the table's calibrated threshold, else
    the default); an empty list when none does."""
    target = _Target.of(session, cls, embedding)
    hits = relevance.relevant_search(
        target.connection, target.table_name, target.column, query, k=k, min_score=min_score,
        reference=reference, where=target.where(where), columns=target.key_names, tuning=tuning,
    )  # fmt: skip
    objects = target.load([hit.row for hit in hits])
    return [
        RelevantMatch(obj, hit.distance, hit.score) for obj, hit in zip(objects, hits, strict=True) if obj is not None
    ]


def near_duplicates(
    session: Session,
    cls: type[T],
    *,
    embedding: Any = None,
    threshold: float = duplicates.DEFAULT_THRESHOLD,
    neighbours: int = duplicates.DEFAULT_NEIGHBOURS,
) -> list[list[T]]:
    """:func:`pgsim.near_duplicates` over ``cls``'s table, as groups of mapped objects, largest first. The
    groups span the whole table: rows of other classes of a single-table hierarchy come as their own class."""
    target = _Target.of(session, cls, embedding)
    groups = duplicates.near_duplicates(
        target.connection, target.table_name, target.column, threshold=threshold, neighbours=neighbours,
        columns=target.key_names,
    )  # fmt: skip
    loaded = target.load([row for group in groups for row in group], polymorphic=True)
    found: list[list[T]] = []
    for group in groups:
        objects, loaded = loaded[: len(group)], loaded[len(group) :]
        found.append([obj for obj in objects if obj is not None])
    return found


@dataclass(frozen=True)
class _Target:
    """The table and column a search of ``cls`` runs on, and how its rows become objects again."""

    session: Session
    cls: type[Any]
    mapper: Mapper[Any]
    table: Table
    column: str
    key_names: list[str]  # the table's primary key columns, as the search returns them
    connection: Any  # the session's psycopg connection

    @classmethod
    def of(cls, session: Session, mapped: type[Any], embedding: Any) -> _Target:
        mapper = inspect(mapped, raiseerr=False)
        if not isinstance(mapper, Mapper):
            raise InvalidInput(f"Expected a mapped class; got {mapped!r}.")
        column = _embedding_column(mapper, embedding)
        table = column.table
        keys = list(mapper.primary_key)
        if not isinstance(table, Table) or any(key.table is not table for key in keys):
            raise InvalidInput(
                f"{mapper.class_.__name__}.{column.key} is not in the table that holds the class's primary key: "
                "search the class whose table has the embedding column."
            )
        if session.autoflush:
            session.flush()  # pending objects are found, with the vectors the flush gives them
        connection = psycopg_connection(session.connection(bind_arguments={"mapper": mapper}))
        return cls(session, mapped, mapper, table, column.name, [key.name for key in keys], connection)

    @property
    def table_name(self) -> str:
        return f"{self.table.schema}.{self.table.name}" if self.table.schema else self.table.name

    def where(self, criteria: Criteria) -> Any:
        """The filter for pgsim's search: ``criteria`` and those the ORM adds for ``cls`` (single-table
        inheritance), as literal SQL; None for no filter."""
        if isinstance(criteria, Mapping):
            raise InvalidInput("where takes SQLAlchemy criteria here: Doc.section == 'libs', or a list of them.")
        given = [] if criteria is None else list(criteria) if isinstance(criteria, (list, tuple)) else [criteria]
        subclass = self.mapper.single and self.mapper.inherits is not None
        if not given and not subclass:
            return None
        found = where_criteria(select(self.cls).where(*given), self._dialect)
        if found is None:
            if subclass:
                raise InvalidInput(f"Could not read the criteria the ORM adds for {self.cls.__name__}.")
            found = tuple(given)
        return self._literal(found)

    @property
    def _dialect(self) -> Any:
        return self.session.get_bind(self.mapper).dialect

    def _literal(self, criteria: Sequence[Any] | None) -> Any:
        if not criteria:
            return None
        try:
            # the psycopg dialect doubles % in literals, as a statement run with parameters needs
            compiled = and_(*criteria).compile(dialect=self._dialect, compile_kwargs={"literal_binds": True})
        except Exception as exc:
            raise InvalidInput(
                f"The filter cannot be written as literal SQL ({exc}): compare columns with values, not with "
                "bound query texts or vectors."
            ) from None
        return sql.SQL(str(compiled))

    def load(self, rows: Sequence[Mapping[str, Any]], *, polymorphic: bool = False) -> list[Any]:
        """The objects of ``rows`` (primary keys) in their order, in one SELECT; None for a row not found."""
        if not rows:
            return []
        entity = self.mapper.base_mapper.class_ if polymorphic else self.cls
        keys = [tuple(row[name] for name in self.key_names) for row in rows]
        columns = list(self.mapper.primary_key)
        condition = columns[0].in_([key[0] for key in keys]) if len(columns) == 1 else tuple_(*columns).in_(keys)
        loaded = {inspect(obj).identity: obj for obj in self.session.scalars(select(entity).where(condition))}
        return [loaded.get(key) for key in keys]


def _column_name(column: Any) -> str | None:
    """The column name of an attribute (``Doc.fts``), a Column, or a name."""
    columns = getattr(getattr(column, "property", None), "columns", None)
    found = columns[0] if columns else column
    return None if found is None else str(getattr(found, "name", found))


def _embedding_column(mapper: Mapper[Any], embedding: Any) -> Any:
    """The column of ``embedding`` (an attribute of the class, or its name), else the class's only
    embedding column."""
    found = {
        prop.key: prop.columns[0]
        for prop in mapper.column_attrs
        if isinstance(prop.columns[0].type, (Embedding, HalfEmbedding))
    }
    if embedding is None:
        if len(found) != 1:
            which = "no embedding column" if not found else f"several ({', '.join(found)}): pass embedding="
            raise InvalidInput(f"{mapper.class_.__name__} has {which}.")
        return next(iter(found.values()))
    key = embedding if isinstance(embedding, str) else getattr(embedding, "key", None)
    if key not in found:
        raise InvalidInput(
            f"{embedding!r} is not an embedding attribute of {mapper.class_.__name__}; its embedding attributes "
            f"are {', '.join(found) or 'none'}."
        )
    return found[key]
