"""The relevance threshold and hybrid fusion, calibrated on the table's own rows and stored in
``pgsim.calibration`` (kinds ``relevance`` and ``hybrid``).

The relevance score (a row's similarity minus that of the query's ``reference``-th nearest row) has a
scale that depends on the table: where rows crowd together (many short, similar texts), the reference row
is close to the best ones and every margin shrinks; in a sparse table margins are wide. So the threshold
is read off the table itself. Sampled rows serve as queries, each with itself and the rows identical to it
left out: the answer of such a query is absent, by construction, and its best margin is what a query
whose answer is not in the table scores here. The calibrated threshold is a fixed quantile
(``NULL_QUANTILE``) of those best margins, one per reference in ``REFERENCES``.

Hybrid search uses that same quantile as its gate on the vector list: when some row matches every word of
the query, a vector list whose best row does not pass the gate counts for less (``WEAK_VECTOR``) in the
fusion (the words, not the meaning, then pick the row). The full-text list of a calibrated table puts the
rows that match every word of the query (AND, ranked by ``ts_rank`` of the AND query) before those that
match some (OR); when only a few rows match every word (``AND_ROWS``, or ``LONG_ROWS`` for a query of at
least ``LONG_WORDS`` distinct words), those weigh ``AND_WEIGHT``; ``rrf_k`` is ``FUSED_RRF_K``.
bench/quality.py tunes these constants and measures the result on Debian's package descriptions and
synopses and on Debian's man pages.

Everything is measured first and written in one statement at the end, so an interrupted calibration
leaves the previous rows, or none, never half of a new one. A calibration is trusted while the table has
changed by at most a fifth of its rows, by its row count or by the rows inserted and deleted since.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from pgsim.db.calibration import pinned
from pgsim.db.calibration_inputs import table_oid
from pgsim.db.catalog import pinned_path, vector_schema
from pgsim.db.names import table_identifier
from pgsim.db.standby import require_primary
from pgsim.errors import InvalidInput
from pgsim.quality.connections import psycopg_connection

MIN_ROWS = 500  # below, the sampled neighbourhoods say little: the defaults stand
MIN_QUERIES = 30  # sampled rows measured, at least, for a calibration to be stored
MAX_QUERIES = 300
REFERENCES = (20, 50, 100)
NULL_QUANTILE = 0.6  # tuned by bench/quality.py for the precision the default min_score aims at
TWIN_DISTANCE = 1e-4  # a row this near to the sampled one is a copy of it, left out with it
FUSED_RRF_K = 10
AND_ROWS = 3
LONG_WORDS = 7  # a conjunction of this many words that few rows satisfy is a quotation
LONG_ROWS = 10
AND_WEIGHT = 3.0
WEAK_VECTOR = 0.3
EF_SEARCH = 200

Progress = Callable[[float], None]

# The calibration rows of a table's column that still describe it: the table has changed by at most a fifth
# of its rows since, by the planner's row count and by rows inserted and deleted (as pgsim.knn_calibration).
# Run under pinned_path (its mixed-type comparisons would otherwise pick a role's operator on the caller's path).
FRESH = """
    SELECT c.kind, c.measured FROM pgsim.calibration c
    JOIN pg_catalog.pg_class t ON t.oid = c.table_oid
    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.table_oid AND a.attnum = c.column_attnum
    LEFT JOIN pg_catalog.pg_stat_all_tables s ON s.relid = c.table_oid AND NOT pg_catalog.pg_is_in_recovery()
    WHERE c.table_oid = %(table)s::oid AND a.attname = %(column)s::name AND c.kind IN ('relevance', 'hybrid')
      AND (t.reltuples < 0 OR abs(t.reltuples - c.rows_measured) <= 0.2 * greatest(c.rows_measured, 1))
      AND (s.relid IS NULL OR c.changes_measured IS NULL OR s.n_tup_ins + s.n_tup_del < c.changes_measured
           OR s.n_tup_ins + s.n_tup_del - c.changes_measured <= 0.2 * greatest(c.rows_measured, 1))
"""


@dataclass(frozen=True)
class Fusion:
    """How hybrid search fuses its lists on a calibrated table."""

    gate: float  # the vector list counts fully when its best row's relevance reaches this
    rrf_k: int = FUSED_RRF_K
    and_rows: int = AND_ROWS
    and_weight: float = AND_WEIGHT
    weak_vector: float = WEAK_VECTOR
    long_words: int = LONG_WORDS
    long_rows: int = LONG_ROWS


@dataclass(frozen=True)
class RelevanceCalibration:
    table: str
    column: str
    rows: int  # rows with an embedding
    queries: int  # sampled rows measured
    min_scores: tuple[tuple[int, float], ...]  # (reference, calibrated min_score); empty when nothing stored
    hybrid: bool  # whether a 'hybrid' row was stored too (the table has a tsvector column)
    seconds: float
    stored: bool
    reason: str = ""  # why nothing was stored

    def min_score(self, reference: int = 50) -> float | None:
        return dict(self.min_scores).get(reference)


@dataclass(frozen=True)
class Calibrated:
    """What a search reads: the calibrated min_score per reference, and the fusion per candidates count."""

    min_scores: dict[int, float]
    gates: dict[int, float]
    fusion: dict[str, Any]

    def fusion_for(self, candidates: int) -> Fusion | None:
        gate = self.gates.get(candidates)
        if gate is None:
            return None
        return Fusion(
            gate,
            int(self.fusion.get("rrf_k", FUSED_RRF_K)),
            int(self.fusion.get("and_rows", AND_ROWS)),
            float(self.fusion.get("and_weight", AND_WEIGHT)),
            float(self.fusion.get("weak_vector", WEAK_VECTOR)),
            int(self.fusion.get("long_words", LONG_WORDS)),
            int(self.fusion.get("long_rows", 0)),  # a row stored without it: no such rule, as in SQL
        )


def calibrated(conn: psycopg.Connection[Any], table: str, column: str) -> Calibrated:
    """The fresh calibration of ``table.column`` (empty when there is none, or it is stale)."""
    found = conn.execute(  # the one name resolved on the caller's path; the rest pinned
        "SELECT pg_catalog.to_regclass(%s::pg_catalog.text)::pg_catalog.oid", [table_identifier(table).as_string(conn)]
    ).fetchone()
    with pinned_path(conn):
        rows = conn.execute(FRESH, {"table": found[0] if found else None, "column": column}).fetchall()
    measured = {kind: value for kind, value in rows}
    relevance, hybrid = measured.get("relevance") or {}, measured.get("hybrid") or {}
    return Calibrated(
        {int(r): float(v) for r, v in (relevance.get("min_score") or {}).items()},
        {int(r): float(v) for r, v in (hybrid.get("gate") or {}).items()},
        hybrid,
    )


def calibrate_relevance(
    conn: psycopg.Connection[Any] | Any,
    table: str,
    column: str,
    *,
    seconds: float = 20.0,
    progress: Progress | None = None,
) -> RelevanceCalibration:
    """Measure ``table.column``'s neighbourhoods (see the module's text) within about ``seconds`` and store
    the relevance threshold (and the hybrid fusion, when the table has a ``tsvector`` column) in
    ``pgsim.calibration``. A table with fewer than ``MIN_ROWS`` embedded rows gets nothing stored: the
    defaults stand. ``progress`` is called with the share done after each sampled row. Only the table's
    owner (or a member of the owning role) may calibrate it."""
    conn = psycopg_connection(conn)
    require_primary(conn, "pgsim.calibrate")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= 3600:
        raise InvalidInput(f"The time budget must be more than 0 and at most 3600 seconds; got {seconds!r}.")
    oid = table_oid(conn, table)  # the one name resolved on the caller's path; all else by OID, pinned
    with conn.transaction(), pinned(conn):  # the rows are written at the end, or not at all
        return _calibrate(conn, oid, table, column, float(seconds), progress)


def _calibrate(
    conn: psycopg.Connection[Any], oid: int, table: str, column: str, seconds: float, progress: Progress | None
) -> RelevanceCalibration:
    started = time.perf_counter()
    row = conn.execute(
        "SELECT a.attnum, t.typname::text, pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE'), "
        "EXISTS (SELECT FROM pg_catalog.pg_attribute x WHERE x.attrelid = c.oid AND x.attnum > 0 "
        "        AND NOT x.attisdropped AND x.atttypid = 'pg_catalog.tsvector'::pg_catalog.regtype), "
        "pg_catalog.format('%%I.%%I', n.nspname, c.relname), c.relowner = r.oid OR NOT (r.rolsuper OR r.rolbypassrls) "
        "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_catalog.pg_roles r ON r.rolname = CURRENT_USER "
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = %s::pg_catalog.name "
        "AND a.attnum > 0 AND NOT a.attisdropped JOIN pg_catalog.pg_type t ON t.oid = a.atttypid "
        "WHERE c.oid = %s::pg_catalog.oid",
        [column, oid],
    ).fetchone()
    if row is None:
        raise InvalidInput(f"Table {table!r} has no column {column!r}.")
    attnum, type_name, owns, has_text, name, own_code = row
    if type_name not in ("vector", "halfvec"):
        raise InvalidInput(f"Column {table}.{column} is not a pgvector vector or halfvec column.")
    if not owns:
        raise InvalidInput(
            f"Only the owner of {table} (or a member of its owning role) may calibrate it: every role's searches "
            "trust what is measured."
        )
    if not own_code:
        raise InvalidInput(
            f"A superuser or BYPASSRLS session does not calibrate {table}, owned by another role, whose code it "
            "would run: SET ROLE to its owner first."
        )
    qualified, col = sql.SQL(name), sql.Identifier(column)  # format('%I.%I'): quoted already
    counted = conn.execute(sql.SQL("SELECT count(*), count({}) FROM {}").format(col, qualified)).fetchone()
    assert counted is not None
    table_rows, rows = int(counted[0]), int(counted[1])

    def result(margins: dict[int, list[float]], stored: bool, reason: str = "") -> RelevanceCalibration:
        scores = tuple((r, _threshold(m)) for r, m in margins.items()) if stored else ()
        queries = len(next(iter(margins.values()), []))
        elapsed = time.perf_counter() - started
        return RelevanceCalibration(table, column, rows, queries, scores, stored and has_text, elapsed, stored, reason)

    if rows < MIN_ROWS:
        return result({}, False, f"{rows} rows have an embedding: fewer than {MIN_ROWS}; the defaults stand")
    margins = _measure(conn, qualified, col, type_name, rows, started + seconds, progress)
    measured = len(margins[REFERENCES[0]])
    if measured < MIN_QUERIES:
        return result(margins, False, f"{measured} sampled rows measured in {seconds} s, fewer than {MIN_QUERIES}")
    calibration = result(margins, True)
    _store(conn, oid, attnum, calibration, table_rows)
    return calibration


def _measure(
    conn: psycopg.Connection[Any],
    qualified: sql.Composable,
    col: sql.Identifier,
    type_name: str,
    rows: int,
    deadline: float,
    progress: Progress | None,
) -> dict[int, list[float]]:
    """Per reference, the best margin of each sampled row's vector as a query, itself and its copies left out."""
    percent = min(100.0, 100.0 * 2 * MAX_QUERIES / rows)
    sampled = conn.execute(
        sql.SQL(
            "SELECT {col}::text FROM {table} TABLESAMPLE BERNOULLI ({percent}) REPEATABLE (11) "
            "WHERE {col} IS NOT NULL ORDER BY pg_catalog.hashtext(ctid::text) LIMIT {limit}"
        ).format(col=col, table=qualified, percent=sql.Literal(percent), limit=sql.Literal(MAX_QUERIES))
    ).fetchall()
    # set for this transaction (a caller's, when calibrate_relevance runs inside one: put back after; an
    # error rolls the savepoint back, and the setting with it)
    row = conn.execute(
        "SELECT current_setting('hnsw.ef_search', true), set_config('hnsw.ef_search', %s, true)", [str(EF_SEARCH)]
    ).fetchone()
    margins = _margins(conn, qualified, col, type_name, [text for (text,) in sampled], deadline, progress)
    if row is not None and row[0] is not None:
        conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", [row[0]])
    return margins


def _margins(
    conn: psycopg.Connection[Any],
    qualified: sql.Composable,
    col: sql.Identifier,
    type_name: str,
    sampled: list[str],
    deadline: float,
    progress: Progress | None,
) -> dict[int, list[float]]:
    deepest = max(REFERENCES)
    schema = sql.Identifier(vector_schema(conn))
    statement = sql.SQL(
        "SELECT ({col} OPERATOR({schema}.<=>) {q}::{schema}.{type}) + 0 FROM {table} WHERE {col} IS NOT NULL "
        "ORDER BY {col} OPERATOR({schema}.<=>) {q}::{schema}.{type} LIMIT {limit}"
    )
    margins: dict[int, list[float]] = {r: [] for r in REFERENCES}
    for done, text in enumerate(sampled, start=1):
        if time.perf_counter() > deadline:
            break
        # the query as a literal and no parameters: a name's % is no placeholder
        query = statement.format(col=col, schema=schema, q=sql.Literal(text), type=sql.Identifier(type_name),
                                 table=qualified, limit=sql.Literal(deepest + 50))  # fmt: skip
        distances = np.array([d for (d,) in conn.execute(query, prepare=False)], dtype=np.float64)
        others = 1.0 - distances[distances > TWIN_DISTANCE]  # similarities; the row and its copies left out
        if len(others) >= deepest:
            for reference in REFERENCES:
                margins[reference].append(float(others[0] - others[reference - 1]))
        if progress is not None:
            progress(done / len(sampled))
    return margins


def _threshold(margins: list[float]) -> float:
    return round(float(np.quantile(np.array(margins), NULL_QUANTILE)), 4)


def _store(
    conn: psycopg.Connection[Any], oid: int, attnum: int, calibration: RelevanceCalibration, table_rows: int
) -> None:
    scores = {str(r): v for r, v in calibration.min_scores}
    relevance = {"min_score": scores, "quantile": NULL_QUANTILE, "queries": calibration.queries}
    hybrid = {
        "gate": scores,
        "rrf_k": FUSED_RRF_K,
        "and_rows": AND_ROWS,
        "long_words": LONG_WORDS,
        "long_rows": LONG_ROWS,
        "and_weight": AND_WEIGHT,
        "weak_vector": WEAK_VECTOR,
        "text": "and-then-or",
    }
    kinds = [("relevance", relevance)] + ([("hybrid", hybrid)] if calibration.hybrid else [])
    values = sql.SQL(", ").join(
        sql.SQL("({}, {}::jsonb)").format(sql.Literal(kind), sql.Literal(json.dumps(measured)))
        for kind, measured in kinds
    )
    conn.execute(
        sql.SQL(
            """
            INSERT INTO pgsim.calibration AS c (table_oid, column_attnum, kind, measured, rows_measured,
                changes_measured, seconds)
            SELECT %(table)s, %(attnum)s, v.kind, v.measured, %(rows)s,
                   -- rows written so far, counting those the collector has not heard of yet (recent writes
                   -- of this or another session, which it counts later): the rows beyond its inserts less
                   -- its deletes; its live count is no guide, ANALYZE sets it before those writes arrive
                   (SELECT s.n_tup_ins + s.n_tup_del + greatest(0, %(rows)s - (s.n_tup_ins - s.n_tup_del))
                    FROM pg_catalog.pg_stat_all_tables s WHERE s.relid = %(table)s), %(seconds)s
            FROM (VALUES {values}) AS v (kind, measured)
            ON CONFLICT (table_oid, column_attnum, kind) DO UPDATE SET measured = excluded.measured,
                rows_measured = excluded.rows_measured, changes_measured = excluded.changes_measured,
                seconds = excluded.seconds, measured_by = excluded.measured_by, measured_at = excluded.measured_at
            """
        ).format(values=values),
        {"table": oid, "attnum": attnum, "rows": table_rows, "seconds": calibration.seconds},
    )
