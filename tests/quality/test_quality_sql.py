"""Hybrid search and the relevance threshold as SQL functions (pgsim.hybrid_search, pgsim.relevant_search), the
relevance cut-off of hybrid search, and near-duplicates as rows without a NOTICE: on the real sample and
model, each checked against numpy on the same vectors and against the Python function."""

from __future__ import annotations

from typing import Any

import numpy as np
import psycopg
import pytest

from pgsim.demo.corpus import Package
from pgsim.encoding.encoder import Encoder
from pgsim.psycopg import Text, register
from pgsim.quality.duplicates import near_duplicates
from pgsim.quality.hybrid import hybrid_search
from pgsim.quality.relevance import DEFAULT_MIN_SCORE, relevant_search

pytestmark = pytest.mark.usefixtures("db")
QUERY = "library for parsing XML documents"
CANDIDATES = 20
HYBRID = (
    "SELECT r.row ->> 'package', r.score, r.distance, r.vector_rank, r.text_rank, r.relevance "
    "FROM pgsim.hybrid_search('packages', 'embedding', %s, %s, k => %s, filter => %s, min_score => %s, "
    "candidates => %s) AS r"
)


@pytest.fixture
def conn(db: str) -> Any:
    with psycopg.connect(db, autocommit=True) as connection:
        register(connection)
        connection.execute(
            "ALTER TABLE packages ADD COLUMN IF NOT EXISTS fts tsvector GENERATED ALWAYS AS "
            "(to_tsvector('english', coalesce(synopsis, '') || ' ' || coalesce(description, ''))) STORED"
        )
        connection.execute("CREATE INDEX IF NOT EXISTS packages_fts ON packages USING gin (fts)")
        yield connection


def truth(conn: Any, packages: list[Package], vectors: Any, query_vector: Any, section: str | None) -> dict[str, Any]:
    """Per package in either list, in numpy: its fused score, ranks, distance and relevance (the vector list's
    last distance minus its own)."""
    distances = {p.package: float(d) for p, d in zip(packages, 1 - vectors @ query_vector, strict=True)}
    keep = [p.package for p in packages if section is None or p.section == section]
    nearest = sorted(keep, key=lambda name: distances[name])[:CANDIDATES]
    text_rows = conn.execute(
        "SELECT package FROM packages, CAST('librari | pars | xml | document' AS tsquery) q "
        "WHERE fts @@ q AND (%s::text IS NULL OR section = %s) ORDER BY ts_rank(fts, q, 1) DESC, ctid LIMIT %s",
        [section, section, CANDIDATES],
    ).fetchall()
    vector_ranks = {name: rank for rank, name in enumerate(nearest, 1)}
    text_ranks = {name: rank for rank, (name,) in enumerate(text_rows, 1)}
    reference = distances[nearest[-1]]
    return {
        name: {
            "score": 1 / (60 + vector_ranks.get(name, np.inf)) + 1 / (60 + text_ranks.get(name, np.inf)),
            "ranks": (vector_ranks.get(name), text_ranks.get(name)),
            "distance": distances[name],
            "relevance": reference - distances[name],
        }
        for name in set(vector_ranks) | set(text_ranks)
    }


def best(expected: dict[str, Any], k: int, min_score: float | None = None) -> list[str]:
    """The k names of the fused order (score, then vector rank, then text rank), cut at ``min_score``."""
    kept = [name for name, e in expected.items() if min_score is None or e["relevance"] >= min_score]
    ranks = {name: tuple(np.inf if r is None else r for r in expected[name]["ranks"]) for name in kept}
    return sorted(kept, key=lambda name: (-expected[name]["score"], *ranks[name]))[:k]


@pytest.mark.parametrize("section", [None, "libs"])
def test_sql_hybrid_search_fuses_as_the_python_one_and_as_numpy(
    conn: Any, packages: list[Package], package_vectors: Any, encoder: Encoder, section: str | None
) -> None:
    expected = truth(conn, packages, package_vectors, encoder.encode_query(QUERY), section)
    assert section or any(e["ranks"][0] is None for e in expected.values())  # the text list adds rows
    where = None if section is None else f"section = '{section}'"
    rows = conn.execute(HYBRID, [Text(QUERY), QUERY, 10, where, None, CANDIDATES]).fetchall()
    hits = hybrid_search(conn, "packages", "embedding", QUERY, k=10, candidates=CANDIDATES,
                         where=None if section is None else {"section": section})  # fmt: skip
    assert [row[0] for row in rows] == [hit.row["package"] for hit in hits] == best(expected, 10)
    for (name, score, distance, vector_rank, text_rank, relevance), hit in zip(rows, hits, strict=True):
        assert score == pytest.approx(expected[name]["score"]) == hit.score
        assert (vector_rank, text_rank) == expected[name]["ranks"] == (hit.vector_rank, hit.text_rank)
        assert distance == pytest.approx(expected[name]["distance"], abs=1e-5)
        assert relevance == pytest.approx(expected[name]["relevance"], abs=1e-5)
        assert hit.relevance == pytest.approx(relevance, abs=1e-6)


@pytest.mark.parametrize("section", [None, "libs"])
def test_min_score_keeps_the_relevant_rows_before_the_k_best_are_taken(
    conn: Any, packages: list[Package], package_vectors: Any, encoder: Encoder, section: str | None
) -> None:
    expected = truth(conn, packages, package_vectors, encoder.encode_query(QUERY), section)
    cut = min(expected[name]["relevance"] for name in best(expected, 5)) + 1e-3  # one of the five falls below it
    wanted = best(expected, 5, cut)
    assert len(wanted) >= 3 and wanted != best(expected, 5)  # the cut changes which rows are the best five
    assert section or len(wanted) == 5  # rows below the uncut five come in: the cut comes before the k best
    where = None if section is None else f"section = '{section}'"
    rows = conn.execute(HYBRID, [Text(QUERY), QUERY, 5, where, cut, CANDIDATES]).fetchall()
    hits = hybrid_search(conn, "packages", "embedding", QUERY, k=5, candidates=CANDIDATES, min_score=cut,
                         where=None if section is None else {"section": section})  # fmt: skip
    assert [row[0] for row in rows] == [hit.row["package"] for hit in hits] == wanted
    assert all(hit.relevance is not None and hit.relevance >= cut for hit in hits)
    top = max(e["relevance"] for e in expected.values())
    assert hybrid_search(conn, "packages", "embedding", QUERY, candidates=CANDIDATES, min_score=top + 0.01,
                         where=None if section is None else {"section": section}) == []  # fmt: skip
    assert conn.execute(HYBRID, [Text(QUERY), QUERY, 5, where, top + 0.01, CANDIDATES]).fetchall() == []


def test_sql_hybrid_search_returns_k_rows_whenever_k_rows_pass_the_filter(conn: Any, packages: list[Package]) -> None:
    twelve = [p.package for p in packages[100:112]]
    where = conn.execute("SELECT format('package = ANY (%%L)', %s::text[])", [twelve]).fetchone()[0]
    rows = conn.execute(HYBRID, [Text("a chess game"), "a chess game", 10, where, None, 10]).fetchall()
    assert len(rows) == 10 and {row[0] for row in rows} <= set(twelve)
    rows = conn.execute(HYBRID, [Text("a chess game"), "a chess game", 20, where, None, 20]).fetchall()
    assert sorted(row[0] for row in rows) == sorted(twelve)  # as many as pass, never fewer


def test_a_text_match_not_embedded_yet_is_found_without_a_distance(conn: Any) -> None:
    """A row whose embedding the worker has not written yet is still a full-text match: it comes with no
    distance and no relevance, and a relevance cut-off leaves it out. (Python's hybrid search failed on it.)"""
    conn.execute(
        "INSERT INTO packages (package, section, synopsis, description) VALUES "
        "('zz-xml', 'libs', 'XML parsing library', 'Parses XML documents: a library for XML parsing')"
    )
    try:
        hits = hybrid_search(conn, "packages", "embedding", QUERY, k=CANDIDATES, candidates=CANDIDATES)
        (waiting,) = [hit for hit in hits if hit.row["package"] == "zz-xml"]
        assert (waiting.distance, waiting.relevance, waiting.vector_rank, waiting.text_rank) == (None, None, None, 1)
        rows = conn.execute(HYBRID, [Text(QUERY), QUERY, CANDIDATES, None, None, CANDIDATES]).fetchall()
        assert [row[2:] for row in rows if row[0] == "zz-xml"] == [(None, None, 1, None)]
        cut = hybrid_search(conn, "packages", "embedding", QUERY, k=CANDIDATES, candidates=CANDIDATES, min_score=0)
        assert "zz-xml" not in [hit.row["package"] for hit in cut] and cut
    finally:
        conn.execute("DELETE FROM packages WHERE package = 'zz-xml'")


@pytest.mark.parametrize("section", [None, "libs"])
def test_sql_relevant_search_is_the_python_one(
    conn: Any, packages: list[Package], package_vectors: Any, encoder: Encoder, section: str | None
) -> None:
    query = packages[7].synopsis
    passing = [i for i, p in enumerate(packages) if section is None or p.section == section]
    similar = package_vectors[passing] @ encoder.encode_query(query)
    order = np.argsort(-similar)
    floor = similar[order[min(49, len(order) - 1)]]
    where = None if section is None else f"section = '{section}'"
    statement = (
        "SELECT r.row ->> 'package', r.distance, r.score FROM pgsim.relevant_search('packages', 'embedding', %s, 5, "
        "%s, filter => %s) AS r"
    )
    rows = conn.execute(statement, [Text(query), 0, where]).fetchall()
    assert [row[0] for row in rows] == [packages[passing[i]].package for i in order[:5]]
    for (_, distance, score), i in zip(rows, order[:5], strict=True):
        assert score == pytest.approx(similar[i] - floor, abs=1e-4)
        assert distance == pytest.approx(1 - similar[i], abs=1e-4)
    hits = relevant_search(conn, "packages", "embedding", query, k=5, min_score=0,
                           where=None if section is None else {"section": section})  # fmt: skip
    assert [(h.row["package"], h.score) for h in hits] == [(name, pytest.approx(s)) for name, _, s in rows]
    cut = (rows[1][2] + rows[2][2]) / 2
    assert [row[0] for row in conn.execute(statement, [Text(query), cut, where])] == [row[0] for row in rows[:2]]
    default = conn.execute(
        "SELECT r.row ->> 'package', r.score FROM pgsim.relevant_search('packages', 'embedding', %s) AS r",
        [Text(query)],
    ).fetchall()
    python = relevant_search(conn, "packages", "embedding", query)
    assert [(h.row["package"], pytest.approx(h.score)) for h in python] == default
    assert all(score >= DEFAULT_MIN_SCORE for _, score in default) and default  # the same default threshold


def test_sql_functions_refuse_bad_input(conn: Any) -> None:
    vector = Text("json")
    relevant = "SELECT * FROM pgsim.relevant_search('packages', 'embedding', %s"
    for statement, arguments, message in (
        (relevant + ", 5, %s)", [vector, 2.5], "min_score"),
        (relevant + ", 5, %s)", [vector, float("nan")], "min_score"),
        (relevant + ", 0)", [vector], "k must be"),
        (relevant + ", 50)", [vector], "reference must be above k"),
        ("SELECT * FROM pgsim.hybrid_search('packages', 'embedding', %s, %s)", [vector, " "], "query text is empty"),
        ("SELECT * FROM pgsim.hybrid_search('packages', 'embedding', %s, 'x', 10, candidates => 5)", [vector],
         "candidates must be"),
        ("SELECT * FROM pgsim.hybrid_search('packages', 'embedding', %s, 'x', rrf_k => 0)", [vector], "rrf_k"),
        ("SELECT * FROM pgsim.hybrid_search('packages', 'embedding', %s, 'x', min_score => -1)", [vector], "min_score"),
    ):  # fmt: skip
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
            conn.execute(statement, arguments)
    with pytest.raises(psycopg.errors.UndefinedColumn, match="no tsvector column synopsis"):
        conn.execute("SELECT * FROM pgsim.hybrid_search('packages', 'embedding', %s, 'x', text_column => 'synopsis')",
                     [vector])  # fmt: skip
    conn.execute("CREATE TABLE IF NOT EXISTS plain (id int PRIMARY KEY, embedding vector(384))")
    with pytest.raises(psycopg.errors.UndefinedColumn, match="needs a full-text column") as raised:
        conn.execute("SELECT * FROM pgsim.hybrid_search('plain', 'embedding', %s, 'x')", [vector])
    assert "ADD COLUMN fts tsvector" in (raised.value.diag.message_hint or "")


def test_near_duplicates_sends_no_notice(db: str) -> None:
    """A session that has made no temporary table yet: pgsim.near_duplicates's clean-up of an earlier call
    said NOTICE: schema "pg_temp" does not exist, skipping."""
    with psycopg.connect(db, autocommit=True) as fresh:
        notices: list[str] = []
        fresh.add_notice_handler(lambda diagnostic: notices.append(str(diagnostic.message_primary)))
        with fresh.transaction():  # twice in one transaction: the first call's tables are still there
            for _ in range(2):
                rows = fresh.execute("SELECT * FROM pgsim.near_duplicates('packages', 'embedding', 0.9)").fetchall()
                assert rows
        assert notices == []


def test_near_duplicates_are_rows_or_the_columns_asked_for(conn: Any, packages: list[Package]) -> None:
    groups = near_duplicates(conn, "packages", "embedding", threshold=0.9, neighbours=30)
    sections = {p.package: p.section for p in packages}
    assert groups and all(len(group) >= 2 for group in groups)
    for group in groups:
        for row in group:
            assert "embedding" not in row and row["section"] == sections[row["package"]]
            assert {"synopsis", "installed_size", "fts"} <= set(row)
    keys = near_duplicates(conn, "packages", "embedding", threshold=0.9, neighbours=30, columns=["package"])
    assert keys == [[{"package": row["package"]} for row in group] for group in groups]  # the former form
    with_vectors = near_duplicates(conn, "packages", "embedding", threshold=0.9, columns=["package", "embedding"])
    vector = with_vectors[0][0]["embedding"]
    assert isinstance(vector, np.ndarray) and vector.dtype == np.float32 and vector.shape == (384,)
    with pytest.raises(Exception, match="no column 'nope'"):
        near_duplicates(conn, "packages", "embedding", columns=["package", "nope"])
