"""The relevance threshold and hybrid fusion calibrated on the table (pgsim.quality.relevance_calibration):
stored in pgsim.calibration and used alike by the Python searches and their SQL twins, nothing stored for a
table too small or a calibration interrupted, written only by the table's owner, and ignored once the table
has changed too much. On the real sample and model: 400 rows and 400 mixtures of two of them (a table big
enough to calibrate), encoded once per session by the fixtures."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.database import dsn_for
from psycopg import sql

from pgsim.demo.corpus import Package
from pgsim.errors import InvalidInput
from pgsim.psycopg import Text, register
from pgsim.quality.hybrid import hybrid_search
from pgsim.quality.relevance import DEFAULT_MIN_SCORE, relevant_search
from pgsim.quality.relevance_calibration import REFERENCES, calibrate_relevance, calibrated

pytestmark = pytest.mark.usefixtures("db")
RELEVANT = "SELECT r.row ->> 'id', r.score FROM pgsim.relevant_search('cal', 'embedding', %s, 10) AS r"
HYBRID = (
    "SELECT (r.row ->> 'id')::int, r.score, r.vector_rank, r.text_rank "
    "FROM pgsim.hybrid_search('cal', 'embedding', %s, %s, 10) AS r"
)


def unit(matrix: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def table(packages: list[Package], package_vectors: Any) -> tuple[list[str], np.ndarray[Any, Any]]:
    """Bodies and unit vectors of table cal: the sample's rows, then each row mixed with the next."""
    vectors = unit(package_vectors)
    mixed = unit(vectors + np.roll(vectors, -1, axis=0))
    bodies = [p.synopsis for p in packages]
    bodies += [f"{a} {b}" for a, b in zip(bodies, bodies[1:] + bodies[:1], strict=True)]
    return bodies, np.concatenate([vectors, mixed])


@pytest.fixture
def conn(db: str, table: tuple[list[str], np.ndarray[Any, Any]]) -> Iterator[psycopg.Connection[Any]]:
    """Table cal, fresh and uncalibrated for each test."""
    with psycopg.connect(db, autocommit=True) as connection:
        register(connection)
        load(connection, "cal", *table)
        yield connection


def load(conn: psycopg.Connection[Any], name: str, bodies: list[str], vectors: np.ndarray[Any, Any]) -> None:
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (id int PRIMARY KEY, body text, embedding vector(384), "
            "fts tsvector GENERATED ALWAYS AS (to_tsvector('english', body)) STORED)"
        ).format(sql.Identifier(name))
    )
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} (id, body, embedding) FROM STDIN").format(
        sql.Identifier(name))) as copy:  # fmt: skip
        for i, (body, vector) in enumerate(zip(bodies, vectors, strict=True)):
            copy.write_row((i, body, "[" + ",".join(f"{x:.8g}" for x in vector) + "]"))
    conn.execute(sql.SQL("CREATE INDEX ON {} USING hnsw (embedding vector_cosine_ops)").format(sql.Identifier(name)))
    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(name)))


def stored(conn: psycopg.Connection[Any], name: str = "cal") -> dict[str, Any]:
    rows = conn.execute(
        "SELECT kind, measured, measured_at FROM pgsim.calibration WHERE table_oid = to_regclass(%s)", [name]
    ).fetchall()
    return {kind: (measured, at) for kind, measured, at in rows}


def set_min_score(conn: psycopg.Connection[Any], value: float) -> None:
    conn.execute(
        "UPDATE pgsim.calibration SET measured = jsonb_set(measured, '{min_score,50}', to_jsonb(%s::float8)) "
        "WHERE table_oid = 'cal'::regclass AND kind = 'relevance'",
        [value],
    )


def null_margins(vectors: np.ndarray[Any, Any], reference: int) -> np.ndarray[Any, Any]:
    """Each row as a query, itself and its copies left out: its best similarity minus its reference-th."""
    similar = vectors @ vectors.T
    similar[similar >= 1 - 1e-4] = -np.inf
    ordered = -np.sort(-similar, axis=1)
    return np.asarray(ordered[:, 0] - ordered[:, reference - 1])


def test_calibration_is_stored_and_both_searches_cut_by_it(
    conn: psycopg.Connection[Any], table: tuple[list[str], np.ndarray[Any, Any]], packages: list[Package]
) -> None:
    result = calibrate_relevance(conn, "cal", "embedding", seconds=120)
    assert result.stored and result.hybrid and result.queries >= 30 and result.rows == 800
    rows = stored(conn)
    assert set(rows) == {"relevance", "hybrid"}
    for reference in REFERENCES:
        value = rows["relevance"][0]["min_score"][str(reference)]
        assert value == result.min_score(reference) == rows["hybrid"][0]["gate"][str(reference)]
        margins = null_margins(table[1], reference)  # the sample's quantile lies well inside the whole table's
        assert np.quantile(margins, 0.2) < value < np.quantile(margins, 0.95)
    assert calibrated(conn, "cal", "embedding").min_scores == dict(result.min_scores)

    query = packages[7].synopsis
    everything = relevant_search(conn, "cal", "embedding", query, min_score=0)
    scores = [hit.score for hit in everything]
    kept = 3 if sum(score >= DEFAULT_MIN_SCORE for score in scores) == 2 else 2  # not what the default keeps
    set_min_score(conn, (scores[kept - 1] + scores[kept]) / 2)
    python = relevant_search(conn, "cal", "embedding", query)
    assert [h.row["id"] for h in python] == [h.row["id"] for h in everything[:kept]]
    in_sql = conn.execute(RELEVANT, [Text(query)]).fetchall()
    assert [(str(h.row["id"]), pytest.approx(h.score, abs=1e-6)) for h in python] == in_sql
    # a min_score given is the caller's, calibrated table or not
    assert len(relevant_search(conn, "cal", "embedding", query, min_score=0)) == 10


def test_hybrid_search_fuses_as_calibrated_in_python_and_in_sql(
    conn: psycopg.Connection[Any], table: tuple[list[str], np.ndarray[Any, Any]], packages: list[Package], encoder: Any
) -> None:
    every_word = [
        {i for (i,) in conn.execute(
            "SELECT id FROM cal WHERE fts @@ (SELECT string_agg(quote_literal(lexeme), ' & ')::tsquery "
            "FROM unnest(to_tsvector('english', %s)))", [p.synopsis])}
        for p in packages[:40]
    ]  # fmt: skip
    chosen = next(i for i, rows in enumerate(every_word) if len(rows) == 3)  # the row and the two mixing it
    query, every = packages[chosen].synopsis, every_word[chosen]
    before = hybrid_search(conn, "cal", "embedding", query, columns=["id"])
    calibrate_relevance(conn, "cal", "embedding", seconds=120)
    fusion = calibrated(conn, "cal", "embedding").fusion_for(50)
    assert fusion is not None
    hits = hybrid_search(conn, "cal", "embedding", query, columns=["id"])
    in_sql = conn.execute(HYBRID, [Text(query), query]).fetchall()
    assert [(h.row["id"], pytest.approx(h.score, abs=1e-9), h.vector_rank, h.text_rank) for h in hits] == in_sql
    assert [h.score for h in hits] != [h.score for h in before]
    for long_query in (table[0][400 + chosen], " ".join(table[0][chosen : chosen + 6])):  # 7+ distinct words
        python = hybrid_search(conn, "cal", "embedding", long_query, columns=["id"])
        found = conn.execute(HYBRID, [Text(long_query), long_query]).fetchall()
        assert [(h.row["id"], pytest.approx(h.score, abs=1e-9), h.vector_rank, h.text_rank) for h in python] == found

    assert chosen in every and len(every) <= fusion.and_rows  # a short query: the few rows' rule
    similar = table[1] @ encoder.encode_query(query)
    nearest = np.sort(similar)[::-1][:50]
    vector_weight = 1.0 if nearest[0] - nearest[-1] >= fusion.gate or not every else fusion.weak_vector
    text_ranks = {h.row["id"]: h.text_rank for h in hits if h.text_rank is not None}
    assert all(text_ranks[i] <= len(every) for i in every & set(text_ranks))  # AND before OR
    for hit in hits:
        text_weight = fusion.and_weight if hit.row["id"] in every else 1.0
        expected = (0 if hit.vector_rank is None else vector_weight / (fusion.rrf_k + hit.vector_rank)) + (
            0 if hit.text_rank is None else text_weight / (fusion.rrf_k + hit.text_rank)
        )
        assert hit.score == pytest.approx(expected, abs=1e-9)
    assert hits[0].row["id"] in every


def test_a_table_too_small_stores_nothing_and_keeps_the_defaults(
    conn: psycopg.Connection[Any], table: tuple[list[str], np.ndarray[Any, Any]], packages: list[Package]
) -> None:
    load(conn, "small", table[0][:120], table[1][:120])
    result = calibrate_relevance(conn, "small", "embedding")
    assert not result.stored and not result.min_scores and "fewer than" in result.reason
    assert stored(conn, "small") == {}
    query = packages[3].synopsis
    everything = relevant_search(conn, "small", "embedding", query, min_score=0)
    default = relevant_search(conn, "small", "embedding", query)
    assert [h.row["id"] for h in default] == [h.row["id"] for h in everything if h.score >= DEFAULT_MIN_SCORE]


def test_an_interrupted_calibration_leaves_no_row_and_keeps_the_previous_one(conn: psycopg.Connection[Any]) -> None:
    calls = []

    def interrupt(done: float) -> None:
        calls.append(done)
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate_relevance(conn, "cal", "embedding", progress=interrupt)
    assert stored(conn) == {} and len(calls) == 5
    calibrate_relevance(conn, "cal", "embedding")
    first = stored(conn)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        calibrate_relevance(conn, "cal", "embedding", progress=interrupt)
    assert stored(conn) == first


def test_only_the_owner_writes_calibration(conn: psycopg.Connection[Any], db: str) -> None:
    calibrate_relevance(conn, "cal", "embedding")
    role = f"pgsim_reader_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER").format(sql.Identifier(role)))
    try:
        for statement in (
            "GRANT USAGE ON SCHEMA pgsim TO {}",
            "GRANT SELECT, INSERT, UPDATE, DELETE ON pgsim.calibration TO {}",  # row security still applies
            "GRANT SELECT ON cal TO {}",
        ):
            conn.execute(sql.SQL(statement).format(sql.Identifier(role)))
        with psycopg.connect(dsn_for(db, user=role), autocommit=True) as reader:
            register(reader)
            with pytest.raises(InvalidInput, match="Only the owner of cal"):
                calibrate_relevance(reader, "cal", "embedding")
            assert set(stored(reader)) == {"relevance", "hybrid"}  # it reads what the owner measured
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                reader.execute(
                    "INSERT INTO pgsim.calibration (table_oid, column_attnum, kind, measured, rows_measured, seconds) "
                    "VALUES ('cal'::regclass, 3, 'hybrid', '{}', 800, 1) ON CONFLICT DO NOTHING"
                )
            assert reader.execute("UPDATE pgsim.calibration SET measured = '{}' RETURNING 1").fetchall() == []
            assert reader.execute("DELETE FROM pgsim.calibration RETURNING 1").fetchall() == []
        assert stored(conn)["relevance"][0]["min_score"]
    finally:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_stale_calibration_after_a_bulk_delete_is_ignored(
    conn: psycopg.Connection[Any], packages: list[Package]
) -> None:
    calibrate_relevance(conn, "cal", "embedding")
    query = packages[7].synopsis
    scores = [hit.score for hit in relevant_search(conn, "cal", "embedding", query, min_score=0)]
    set_min_score(conn, (scores[0] + scores[1]) / 2)  # one row passes the calibrated threshold
    assert len(relevant_search(conn, "cal", "embedding", query)) == 1
    conn.execute("DELETE FROM cal WHERE id >= 400")  # half the rows: no ANALYZE, only the collector knows
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT 1")  # the deletes' counts reach the collector when this session goes idle
    assert calibrated(conn, "cal", "embedding").min_scores == {}
    assert calibrated(conn, "cal", "embedding").fusion_for(50) is None
    everything = relevant_search(conn, "cal", "embedding", query, min_score=0)
    expected = [str(h.row["id"]) for h in everything if h.score >= DEFAULT_MIN_SCORE]
    assert [h.row["id"] for h in relevant_search(conn, "cal", "embedding", query)] == [int(i) for i in expected]
    assert [row[0] for row in conn.execute(RELEVANT, [Text(query)])] == expected
    assert set(stored(conn)) == {"relevance", "hybrid"}  # kept, not trusted


def test_bad_input_is_refused_and_a_callers_transaction_keeps_its_settings(
    conn: psycopg.Connection[Any], table: tuple[list[str], np.ndarray[Any, Any]]
) -> None:
    for name, column, seconds, message in (
        ("cal", "embedding", 0, "time budget"),
        ("cal", "body", 20, "not a pgvector"),
        ("cal", "nothing", 20, "no column"),
        ("no_such_table", "embedding", 20, "does not exist"),
    ):
        with pytest.raises(InvalidInput, match=message):
            calibrate_relevance(conn, name, column, seconds=seconds)
    result = calibrate_relevance(conn, "cal", "embedding", seconds=1e-6)  # the budget ends before any row
    assert not result.stored and "fewer than" in result.reason and stored(conn) == {}
    conn.execute("UPDATE cal SET embedding = NULL WHERE id >= 300")  # 300 rows with an embedding: too few
    assert "300 rows have an embedding" in calibrate_relevance(conn, "cal", "embedding").reason
    conn.execute("UPDATE cal SET embedding = NULL")
    assert not calibrate_relevance(conn, "cal", "embedding").stored
    with conn.transaction():
        conn.execute("SET LOCAL hnsw.ef_search = 77")
        load(conn, "cal2", *table)
        assert calibrate_relevance(conn, "cal2", "embedding").stored
        assert conn.execute("SHOW hnsw.ef_search").fetchone() == ("77",)
    assert set(stored(conn, "cal2")) == {"relevance", "hybrid"}
