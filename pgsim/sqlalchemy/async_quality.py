"""Hybrid search, the relevance threshold and near-duplicates on an ``AsyncSession``: the async forms of
:mod:`pgsim.sqlalchemy.quality`, with its arguments and its result types.

    async with AsyncSession(engine) as session:
        for match in await hybrid_search_async(session, Doc, "xml parser", k=5, where=Doc.section == "libs"):
            print(match.score, match.obj.description)

The synchronous forms run pgsim's psycopg statements, which an async driver does not take; these call the
schema's SQL functions instead (``pgsim.hybrid_search``, ``pgsim.relevant_search``, ``pgsim.near_duplicates``,
which keep the k-rows contract of a filtered search in SQL) on the session's own connection, in its
transaction (pending changes are flushed first, when the session autoflushes), inside a savepoint, so an
error leaves the transaction usable. The query text is encoded in pgsim's encoding thread, never on the event
loop, and bound with the embedding column's type. The searches return primary keys; the objects are then
loaded in one SELECT and returned in the search's order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Table, and_, bindparam, inspect, select, text, tuple_
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Mapper

from pgsim.encoding.encoder import check_vector
from pgsim.errors import InvalidInput, SchemaMissing
from pgsim.knn.planner import DEFAULT_TUNING, Tuning
from pgsim.knn.statements import check_no_nul
from pgsim.knn.target import MAX_K, check_k
from pgsim.quality import duplicates, hybrid, relevance
from pgsim.quality.duplicates import check_threshold
from pgsim.quality.relevance import check_min_score
from pgsim.sqlalchemy.knn import where_criteria
from pgsim.sqlalchemy.offload import _encoding_thread, query_vector
from pgsim.sqlalchemy.quality import Criteria, FusedMatch, RelevantMatch, _column_name, _embedding_column

T = TypeVar("T")

# SQLSTATEs of the functions' refusals (and of a name the database does not know): the caller's input
_INPUT_ERRORS = {"22023": "invalid_parameter_value", "42703": "undefined_column", "42704": "undefined_object",
                 "42809": "wrong_object_type", "42P01": "undefined_table", "22P02": "invalid_text_representation",
                 "42601": "syntax_error", "42883": "undefined_function"}  # fmt: skip


async def hybrid_search_async(
    session: AsyncSession,
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
    """:func:`pgsim.sqlalchemy.hybrid_search` on an ``AsyncSession``, through ``pgsim.hybrid_search`` (SQL):
    the k objects (that pass ``where``) with the best fused rank of the vector search on ``embedding`` and the
    full-text search on ``text_column``; with ``min_score``, only those whose relevance reaches it."""
    if min_score is not None:
        check_min_score(min_score)
    if not isinstance(query, str) or not query.strip():
        raise InvalidInput("The query text is empty; pass the words to search for.")
    check_no_nul(query, "The query text")
    check_k(k)
    for name, value, low in (("candidates", candidates, k), ("rrf_k", 1 if rrf_k is None else rrf_k, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 10_000:
            raise InvalidInput(f"{name} must be a whole number from {low} to 10000; got {value!r}.")
    tsv = _column_name(text_column)
    check_no_nul(tsv, "The text column")
    check_no_nul(text_config, "The text search configuration")
    target = await _AsyncTarget.of(session, cls, embedding)
    statement = (
        "pgsim.hybrid_search(CAST(:table AS regclass), CAST(:column AS name), :query, CAST(:text AS text), "
        "k => CAST(:k AS integer), filter => CAST(:filter AS text), "
        "min_score => CAST(:min_score AS double precision), candidates => CAST(:candidates AS integer), "
        "rrf_k => CAST(:rrf_k AS integer), text_column => CAST(:text_column AS name), "
        "text_config => CAST(:text_config AS regconfig), " + _TUNING + ")"
    )
    rows = await target.search(
        statement, ["score", "distance", "vector_rank", "text_rank", "relevance"], query, tuning,
        text=query, k=k, filter=target.where(where), min_score=min_score, candidates=candidates, rrf_k=rrf_k,
        text_column=tsv, text_config=text_config,
    )  # fmt: skip
    objects = await target.load([row[0] for row in rows])
    return [
        FusedMatch(obj, float(score), _float(distance), vector_rank, text_rank, _float(relevance_))
        for obj, (_, score, distance, vector_rank, text_rank, relevance_) in zip(objects, rows, strict=True)
        if obj is not None
    ]


async def relevant_search_async(
    session: AsyncSession,
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
    """:func:`pgsim.sqlalchemy.relevant_search` on an ``AsyncSession``, through ``pgsim.relevant_search``
    (SQL): the objects among the k nearest to ``query`` (text, encoded with the column's model, or a vector)
    that pass ``where`` and stand out from the query's ``reference``-th nearest by at least ``min_score``
    (left out: the table's calibrated threshold, else the default)."""
    if min_score is not None:
        check_min_score(min_score)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInput(f"k must be a whole number of at least 1; got {k!r}.")
    if isinstance(reference, bool) or not isinstance(reference, int) or not k < reference <= MAX_K:
        raise InvalidInput(f"reference must be a whole number above k ({k}) and at most {MAX_K}; got {reference!r}.")
    target = await _AsyncTarget.of(session, cls, embedding)
    statement = (
        "pgsim.relevant_search(CAST(:table AS regclass), CAST(:column AS name), :query, k => CAST(:k AS integer), "
        "min_score => CAST(:min_score AS double precision), reference => CAST(:reference AS integer), "
        "filter => CAST(:filter AS text), " + _TUNING + ")"
    )
    rows = await target.search(
        statement, ["distance", "score"], query, tuning, k=k, min_score=min_score, reference=reference,
        filter=target.where(where),
    )  # fmt: skip
    objects = await target.load([row[0] for row in rows])
    return [
        RelevantMatch(obj, float(distance), float(score))
        for obj, (_, distance, score) in zip(objects, rows, strict=True)
        if obj is not None
    ]


async def near_duplicates_async(
    session: AsyncSession,
    cls: type[T],
    *,
    embedding: Any = None,
    threshold: float = duplicates.DEFAULT_THRESHOLD,
    neighbours: int = duplicates.DEFAULT_NEIGHBOURS,
) -> list[list[T]]:
    """:func:`pgsim.sqlalchemy.near_duplicates` on an ``AsyncSession``, through ``pgsim.near_duplicates`` (SQL):
    groups of mapped objects, largest first, spanning the whole table (rows of other classes of a single-table
    hierarchy come as their own class)."""
    check_threshold(threshold)
    if isinstance(neighbours, bool) or not isinstance(neighbours, int) or not 1 <= neighbours <= 1000:
        raise InvalidInput(f"neighbours must be an integer from 1 to 1000; got {neighbours!r}.")
    target = await _AsyncTarget.of(session, cls, embedding)
    keys = ", ".join(f"p.{target.quote(name)}" for name in target.key_names)
    statement = text(
        f"SELECT d.group_id, {keys} FROM pgsim.near_duplicates(CAST(:table AS regclass), CAST(:column AS name), "  # noqa: S608
        "CAST(:threshold AS double precision), CAST(:neighbours AS integer)) "
        "WITH ORDINALITY AS d (key, group_id, group_size, position), "
        f"jsonb_populate_record(CAST(NULL AS {target.table_sql}), d.key) AS p "
        "ORDER BY d.group_size DESC, d.group_id, d.position"
    )
    rows = await target.run(
        statement, table=target.table_sql, column=target.column.name, threshold=threshold, neighbours=neighbours
    )
    groups: dict[int, list[tuple[Any, ...]]] = {}
    for group, *key in rows:
        groups.setdefault(group, []).append(tuple(key))
    loaded = await target.load([key for group_keys in groups.values() for key in group_keys], polymorphic=True)
    found: list[list[T]] = []
    for group_keys in groups.values():
        objects, loaded = loaded[: len(group_keys)], loaded[len(group_keys) :]
        found.append([obj for obj in objects if obj is not None])
    return found


_TUNING = (
    "exact_below_rows => CAST(:exact_below_rows AS double precision), "
    "hnsw_ef_search => CAST(:hnsw_ef_search AS integer), "
    "min_hnsw_selectivity => CAST(:min_hnsw_selectivity AS double precision)"
)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class _AsyncTarget:
    """The table and column a search of ``cls`` runs on, and how its keys become objects again."""

    session: AsyncSession
    cls: type[Any]
    mapper: Mapper[Any]
    table: Table
    column: Any  # the embedding Column
    key_names: list[str]
    dialect: Any

    @classmethod
    async def of(cls, session: Any, mapped: type[Any], embedding: Any) -> _AsyncTarget:
        if not isinstance(session, AsyncSession):
            raise InvalidInput(
                f"The async searches take an AsyncSession; got {type(session).__name__}. With a Session, call "
                "pgsim.sqlalchemy.hybrid_search, relevant_search or near_duplicates."
            )
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
            await session.flush()  # pending objects are found, with the vectors the flush gives them
        dialect = session.sync_session.get_bind(mapper).dialect
        return cls(session, mapped, mapper, table, column, [key.name for key in keys], dialect)

    def quote(self, name: str) -> str:
        return str(self.dialect.identifier_preparer.quote(name))

    @property
    def table_sql(self) -> str:
        """The table's name as SQL (quoted where it must be, with its schema)."""
        return str(self.dialect.identifier_preparer.format_table(self.table))

    def where(self, criteria: Criteria) -> str | None:
        """The filter for the SQL function: ``criteria`` and those the ORM adds for ``cls`` (single-table
        inheritance), as literal SQL over the table's own columns (the functions alias the table); None for
        no filter."""
        if isinstance(criteria, Mapping):
            raise InvalidInput("where takes SQLAlchemy criteria here: Doc.section == 'libs', or a list of them.")
        given = [] if criteria is None else list(criteria) if isinstance(criteria, (list, tuple)) else [criteria]
        subclass = self.mapper.single and self.mapper.inherits is not None
        if not given and not subclass:
            return None
        found = where_criteria(select(self.cls).where(*given), self.dialect)
        if found is None:
            if subclass:
                raise InvalidInput(f"Could not read the criteria the ORM adds for {self.cls.__name__}.")
            found = tuple(given)
        if not found:
            return None
        others = {table for condition in found for table in _tables(condition)} - {self.table}
        if others:
            raise InvalidInput(
                f"The filter reads {', '.join(sorted(str(t) for t in others))}: the async searches filter on "
                f"{self.table.name}'s own columns only."
            )
        try:
            # unqualified columns (the SQL functions read the filter over an alias of the table), and a
            # paramstyle that leaves % alone (the text is a value here, not a statement)
            compiled = and_(*found).compile(
                dialect=_literal_dialect(self.dialect), compile_kwargs={"literal_binds": True, "include_table": False}
            )
        except Exception as exc:
            raise InvalidInput(
                f"The filter cannot be written as literal SQL ({exc}): compare columns with values, not with "
                "bound query texts or vectors."
            ) from None
        return str(compiled)

    async def query_vector(self, query: Any) -> Any:
        """``query`` as a vector: text encoded with the column's model in pgsim's encoding thread."""
        if query is None:
            raise InvalidInput("The query is None; pass text or a vector.")
        dimension, model = getattr(self.column.type, "dim", None), getattr(self.column.type, "model", None)
        if isinstance(query, str):
            if model is None:
                raise InvalidInput(
                    f"{self.cls.__name__}.{self.column.key} has no model to encode text with: declare it with "
                    "embedding_column(model=...) or pass a vector."
                )
            if not query.strip():
                raise InvalidInput("The query text is empty; pass the words to search for.")
            check_no_nul(query, "The query text")
            loop = asyncio.get_running_loop()
            vector = await loop.run_in_executor(_encoding_thread(), query_vector, model, query)
        else:
            vector = query
        return check_vector(vector, dimension)

    async def search(
        self, function: str, names: list[str], query: Any, tuning: Tuning, **parameters: Any
    ) -> list[tuple[Any, ...]]:
        """Rows of (primary key tuple, *``names``) of a search function's rows, in its order."""
        vector = await self.query_vector(query)
        keys = ", ".join(f"p.{self.quote(name)}" for name in self.key_names)
        # the row's primary key only, parsed with the table's own types
        only_keys = ", ".join(
            f'CAST(:key_{i} AS text), r."row" -> CAST(:key_{i} AS text)' for i in range(len(self.key_names))
        )
        statement = text(
            f"SELECT {keys}, {', '.join(f'r.{name}' for name in names)} FROM {function} "  # noqa: S608
            f'WITH ORDINALITY AS r ("row", {", ".join(names)}, position), '
            f"jsonb_populate_record(CAST(NULL AS {self.table_sql}), jsonb_build_object({only_keys})) AS p "
            "ORDER BY r.position"
        ).bindparams(bindparam("query", type_=self.column.type))
        width = len(self.key_names)
        rows = await self.run(
            statement, table=self.table_sql, column=self.column.name, query=vector,
            exact_below_rows=tuning.exact_below_rows, hnsw_ef_search=tuning.hnsw_ef_search,
            min_hnsw_selectivity=tuning.min_hnsw_selectivity,
            **{f"key_{i}": name for i, name in enumerate(self.key_names)}, **parameters,
        )  # fmt: skip
        return [(tuple(row[:width]), *row[width:]) for row in rows]

    async def run(self, statement: Any, **parameters: Any) -> list[tuple[Any, ...]]:
        """``statement``'s rows, on the session's connection in a savepoint: a refusal is an InvalidInput and
        the session's transaction goes on."""
        connection: AsyncConnection = await self.session.connection(bind_arguments={"mapper": self.mapper})
        try:
            async with connection.begin_nested():
                result = await connection.execute(statement, parameters)
                return [tuple(row) for row in result.all()]
        except DBAPIError as exc:
            sqlstate = getattr(exc.orig, "sqlstate", None)
            diag = getattr(exc.orig, "diag", None)
            message = getattr(diag, "message_primary", None) or str(exc.orig)
            hint = getattr(diag, "message_hint", None)
            if sqlstate == "42883" and "pgsim." in message:
                raise SchemaMissing(
                    f"This database lacks pgsim's SQL functions ({message}): run `pgsim install`."
                ) from None
            if sqlstate in _INPUT_ERRORS:
                raise InvalidInput(message + (f" {hint}" if hint else "")) from None
            raise

    async def load(self, keys: Sequence[tuple[Any, ...]], *, polymorphic: bool = False) -> list[Any]:
        """The objects of ``keys`` (primary keys) in their order, in one SELECT; None for a key not found."""
        if not keys:
            return []
        entity = self.mapper.base_mapper.class_ if polymorphic else self.cls
        columns = list(self.mapper.primary_key)
        condition = columns[0].in_([key[0] for key in keys]) if len(columns) == 1 else tuple_(*columns).in_(keys)
        result = await self.session.scalars(select(entity).where(condition))
        loaded = {inspect(obj).identity: obj for obj in result}
        return [loaded.get(tuple(key)) for key in keys]


def _tables(condition: Any) -> set[Any]:
    from sqlalchemy.sql.util import find_tables

    return {table for table in find_tables(condition, include_crud=True) if isinstance(table, Table)}


_LITERAL_DIALECTS: dict[type, Any] = {}


def _literal_dialect(dialect: Any) -> Any:
    """``dialect``'s kind with a named paramstyle, which writes a literal's ``%`` as it is."""
    found = _LITERAL_DIALECTS.get(type(dialect))
    if found is None:
        found = _LITERAL_DIALECTS[type(dialect)] = type(dialect)(paramstyle="named")
    return found
