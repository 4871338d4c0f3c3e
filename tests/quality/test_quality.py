"""Search quality beyond nearest neighbours, on the real sample and model: near-duplicate groups, zero-shot
labels, maximal marginal relevance, rank fusion. Each result is checked against numpy on the same vectors."""

from __future__ import annotations

from typing import Any

import numpy as np
import psycopg
import pytest

from pgsim.demo.corpus import Package
from pgsim.encoding.encoder import Encoder
from pgsim.errors import InvalidInput
from pgsim.knn.filtered import search
from pgsim.psycopg import register
from pgsim.quality.diversity import diverse_search, mmr_order
from pgsim.quality.duplicates import near_duplicates
from pgsim.quality.hubness import corrected_search, forget_banks, set_query_bank
from pgsim.quality.hybrid import hybrid_search
from pgsim.quality.labels import label_rows
from pgsim.quality.relevance import relevant_search

pytestmark = pytest.mark.usefixtures("db")


@pytest.fixture
def conn(db: str) -> Any:
    with psycopg.connect(db, autocommit=True) as connection:
        register(connection)
        yield connection


def components(vectors: np.ndarray[Any, Any], names: list[str], threshold: float) -> list[set[str]]:
    """Connected components of the all-pairs graph at ``threshold``, in numpy: the ground truth."""
    parent = list(range(len(names)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    similar = vectors @ vectors.T
    for a, b in zip(*np.nonzero(np.triu(similar >= threshold, k=1)), strict=True):
        parent[root(int(a))] = root(int(b))
    groups: dict[int, set[str]] = {}
    for i, name in enumerate(names):
        groups.setdefault(root(i), set()).add(name)
    return [group for group in groups.values() if len(group) > 1]


@pytest.mark.parametrize("threshold", [0.8, 0.95])
def test_near_duplicate_groups_match_the_all_pairs_components(
    conn: Any, packages: list[Package], package_vectors: Any, threshold: float
) -> None:
    groups = near_duplicates(conn, "packages", "embedding", threshold=threshold, neighbours=30)
    found = sorted(sorted(row["package"] for row in group) for group in groups)
    truth = sorted(sorted(group) for group in components(package_vectors, [p.package for p in packages], threshold))
    assert found == truth and len(found) > 0
    assert [len(g) for g in groups] == sorted((len(g) for g in groups), reverse=True)  # largest first


def test_near_duplicates_refuses_bad_input(conn: Any) -> None:
    for threshold in (0, -0.5, 1.01, float("nan"), True):
        with pytest.raises(InvalidInput, match="threshold"):
            near_duplicates(conn, "packages", "embedding", threshold=threshold)
    with pytest.raises(InvalidInput, match="neighbours"):
        near_duplicates(conn, "packages", "embedding", neighbours=0)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="threshold"):
        conn.execute("SELECT * FROM pgsim.near_duplicates('packages', 'embedding', 2)")
    with pytest.raises(InvalidInput, match="does not exist"):
        near_duplicates(conn, 'packages"; DROP TABLE packages; --', "embedding")
    with pytest.raises(InvalidInput, match="no column"):
        near_duplicates(conn, "packages", "embedding; DROP TABLE packages")
    with pytest.raises(InvalidInput, match="not a pgvector vector column"):
        near_duplicates(conn, "packages", "section")
    conn.execute("CREATE TABLE IF NOT EXISTS unindexed (id int PRIMARY KEY, embedding vector(3))")
    with pytest.raises(InvalidInput, match=r"no HNSW index .* CREATE INDEX ON (public\.)?unindexed USING hnsw"):
        near_duplicates(conn, "unindexed", "embedding")
    conn.execute("CREATE TABLE IF NOT EXISTS keyless (embedding vector(3))")
    conn.execute("CREATE INDEX IF NOT EXISTS keyless_hnsw ON keyless USING hnsw (embedding vector_cosine_ops)")
    with pytest.raises(InvalidInput, match="no primary key"):
        near_duplicates(conn, "keyless", "embedding")
    assert conn.execute("SELECT count(*) FROM packages").fetchone() == (400,)


def test_zero_shot_labels_are_the_nearest_descriptions(
    conn: Any, packages: list[Package], package_vectors: Any, encoder: Encoder
) -> None:
    labels = {
        "libs": "a shared library that other programs link against",
        "doc": "documentation, manuals and examples",
        "games": "a game to play",
        "python": "a Python module",
    }
    conn.execute("ALTER TABLE packages ADD COLUMN IF NOT EXISTS guess text")
    counts = label_rows(conn, "packages", "embedding", labels, into="guess")
    assert sum(counts.values()) == len(packages) and set(counts) <= set(labels)
    label_vectors = np.stack(encoder.encode(list(labels.values()), kind="query"))  # type: ignore[arg-type]
    expected = np.array(list(labels))[np.argmax(package_vectors @ label_vectors.T, axis=1)]
    stored = dict(conn.execute("SELECT package, guess FROM packages").fetchall())
    agree = np.mean([stored[p.package] == label for p, label in zip(packages, expected, strict=True)])
    assert agree >= 0.99  # float32 here, float32 in PostgreSQL: only near-ties may differ
    python_rows = [p for p in packages if p.section == "python"]
    assert np.mean([stored[p.package] == "python" for p in python_rows]) > 0.5  # it means something
    filtered = label_rows(
        conn, "packages", "embedding", {"games": "a game to play"}, into="guess", where={"section": "games"}
    )
    assert sum(filtered.values()) == sum(p.section == "games" for p in packages)
    for bad, message in (({}, "labels is empty"), ({"x": " "}, "is empty")):
        with pytest.raises(InvalidInput, match=message):
            label_rows(conn, "packages", "embedding", bad, into="guess")
    with pytest.raises(InvalidInput, match="no column 'nope'"):
        label_rows(conn, "packages", "embedding", labels, into="nope")


def test_mmr_at_lambda_one_is_the_search_order_and_lower_lambda_varies_the_rows(conn: Any, encoder: Encoder) -> None:
    query = "a library to parse JSON"
    plain = search(conn, "packages", "embedding", query, k=10)
    same = diverse_search(conn, "packages", "embedding", query, k=10, lambda_mult=1.0)
    assert [h.row["package"] for h in same] == [h.row["package"] for h in plain]
    assert "embedding" not in same[0].row
    varied = diverse_search(
        conn, "packages", "embedding", query, k=10, lambda_mult=0.3, candidates=40, columns=["package", "embedding"]
    )
    vectors = np.stack([h.row["embedding"].to_numpy() for h in varied])

    def intra_list_similarity(v: np.ndarray[Any, Any]) -> float:
        similar = v @ v.T
        return float((similar.sum() - np.trace(similar)) / (len(v) * (len(v) - 1)))

    plain_vectors = np.stack(
        [
            h.row["embedding"].to_numpy()
            for h in search(conn, "packages", "embedding", query, k=10, columns=["embedding"])
        ]
    )
    assert intra_list_similarity(vectors) < intra_list_similarity(plain_vectors)
    # the SQL function picks the same rows in the same order from the same candidates
    pool = search(conn, "packages", "embedding", query, k=40, columns=["package", "embedding"])
    q = encoder.encode_query(query)
    (positions,) = conn.execute(
        "SELECT pgsim.mmr(%s, %s, 10, 0.3)", [q, [h.row["embedding"].to_numpy() for h in pool]]
    ).fetchone()
    assert [pool[i - 1].row["package"] for i in positions] == [h.row["package"] for h in varied]
    relevance = 1 - np.array([h.distance for h in pool])
    pool_vectors = np.stack([h.row["embedding"].to_numpy() for h in pool])
    assert mmr_order(relevance, pool_vectors, 10, 0.3) == [i - 1 for i in positions]


def test_mmr_refuses_lambda_outside_zero_to_one(conn: Any) -> None:
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidInput, match="lambda_mult"):
            diverse_search(conn, "packages", "embedding", "json", lambda_mult=bad)
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="lambda"):
            conn.execute("SELECT pgsim.mmr('[1,0]', ARRAY['[1,0]'::vector], 1, %s)", [bad])
    with pytest.raises(InvalidInput, match="candidates"):
        diverse_search(conn, "packages", "embedding", "json", k=10, candidates=5)


def test_rrf_terms(conn: Any) -> None:
    assert conn.execute("SELECT pgsim.rrf(1), pgsim.rrf(NULL), pgsim.rrf(3, 10)").fetchone() == (1 / 61, 0.0, 1 / 13)


@pytest.fixture
def fulltext(conn: Any) -> Any:
    conn.execute(
        "ALTER TABLE packages ADD COLUMN IF NOT EXISTS fts tsvector GENERATED ALWAYS AS "
        "(to_tsvector('english', coalesce(synopsis, '') || ' ' || coalesce(description, ''))) STORED"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS packages_fts ON packages USING gin (fts)")
    return conn


@pytest.mark.parametrize("where", [None, {"section": "libs"}])
def test_hybrid_search_fuses_the_exact_vector_ranks_and_the_text_ranks(
    fulltext: Any, packages: list[Package], package_vectors: Any, encoder: Encoder, where: Any
) -> None:
    query = "library for parsing XML documents"
    keep = [i for i, p in enumerate(packages) if where is None or p.section == where["section"]]
    distances = 1 - package_vectors[keep] @ encoder.encode_query(query)
    vector_ranks = {packages[keep[i]].package: r for r, i in enumerate(np.argsort(distances, kind="stable")[:20], 1)}
    text_rows = fulltext.execute(
        "SELECT package FROM packages, CAST('librari | pars | xml | document' AS tsquery) q "
        "WHERE fts @@ q AND (%s::text IS NULL OR section = %s) ORDER BY ts_rank(fts, q, 1) DESC, ctid LIMIT 20",
        [where and where["section"]] * 2,
    ).fetchall()
    text_ranks = {name: r for r, (name,) in enumerate(text_rows, 1)}
    assert len(text_ranks) > 5
    assert where is not None or set(text_ranks) - set(vector_ranks)  # the text list adds rows
    fused = {n: 1 / (60 + vector_ranks.get(n, np.inf)) + 1 / (60 + text_ranks.get(n, np.inf))
             for n in set(vector_ranks) | set(text_ranks)}  # fmt: skip
    hits = hybrid_search(fulltext, "packages", "embedding", query, k=10, candidates=20, where=where)
    assert len(hits) == 10
    assert [h.score for h in hits] == pytest.approx(sorted(fused.values(), reverse=True)[:10])
    for hit in hits:
        name = hit.row["package"]
        assert hit.score == pytest.approx(fused[name])
        assert (hit.vector_rank, hit.text_rank) == (vector_ranks.get(name), text_ranks.get(name))
        assert where is None or hit.row["section"] == "libs"
        assert "embedding" not in hit.row and 0 <= hit.distance <= 2


def test_hybrid_search_refuses_bad_input(fulltext: Any) -> None:
    with pytest.raises(InvalidInput, match="query text is empty"):
        hybrid_search(fulltext, "packages", "embedding", "  ")
    with pytest.raises(InvalidInput, match="query text .* holds a NUL"):
        hybrid_search(fulltext, "packages", "embedding", "json\x00parser")
    with pytest.raises(InvalidInput, match="candidates"):
        hybrid_search(fulltext, "packages", "embedding", "json", k=10, candidates=5)
    with pytest.raises(InvalidInput, match="rrf_k"):
        hybrid_search(fulltext, "packages", "embedding", "json", rrf_k=0)
    with pytest.raises(InvalidInput, match="no tsvector column 'synopsis'"):
        hybrid_search(fulltext, "packages", "embedding", "json", text_column="synopsis")
    with pytest.raises(InvalidInput, match="no text search configuration"):
        hybrid_search(fulltext, "packages", "embedding", "json", text_config="klingon")
    fulltext.execute("CREATE TABLE IF NOT EXISTS plain (id int PRIMARY KEY, embedding vector(384))")
    with pytest.raises(InvalidInput, match="needs a full-text column; plain has no tsvector column"):
        hybrid_search(fulltext, "plain", "embedding", "json")


@pytest.mark.parametrize("where", [None, {"section": "libs"}])
def test_relevance_scores_are_the_margin_over_the_querys_reference_th_nearest_row(
    conn: Any, packages: list[Package], package_vectors: Any, encoder: Encoder, where: dict[str, str] | None
) -> None:
    query = packages[7].synopsis
    passing = [i for i, p in enumerate(packages) if where is None or p.section == "libs"]
    similar = package_vectors[passing] @ encoder.encode_query(query)
    order = np.argsort(-similar)
    floor = similar[order[49]] if len(order) >= 50 else similar[order[-1]]
    hits = relevant_search(conn, "packages", "embedding", query, k=5, min_score=0, where=where)
    assert [h.row["package"] for h in hits] == [packages[passing[i]].package for i in order[:5]]
    for hit, i in zip(hits, order[:5], strict=True):
        assert hit.score == pytest.approx(similar[i] - floor, abs=1e-4)
        assert where is None or hit.row["section"] == "libs"
    cut = (hits[1].score + hits[2].score) / 2
    kept = relevant_search(conn, "packages", "embedding", query, k=5, min_score=cut, where=where)
    assert [h.row["package"] for h in kept] == [h.row["package"] for h in hits[:2]]
    assert relevant_search(conn, "packages", "embedding", query, k=5, min_score=hits[0].score + 0.01, where=where) == []


def test_relevant_search_with_fewer_rows_than_the_reference_measures_against_the_last_row(
    conn: Any, packages: list[Package]
) -> None:
    four = psycopg.sql.SQL("package = ANY({})").format(psycopg.sql.Literal([p.package for p in packages[:4]]))
    hits = relevant_search(conn, "packages", "embedding", "a JSON parser", k=3, min_score=0, where=four)
    assert len(hits) == 3 and hits[-1].score > 0
    everything = relevant_search(conn, "packages", "embedding", "a JSON parser", k=10, min_score=0, where=four)
    assert len(everything) == 4 and everything[-1].score == 0  # the last row is its own reference


def test_relevant_search_refuses_bad_input(conn: Any) -> None:
    for bad in (float("nan"), -0.1, 2.5, True, "0.3"):
        with pytest.raises(InvalidInput, match="min_score"):
            relevant_search(conn, "packages", "embedding", "json", min_score=bad)  # type: ignore[arg-type]
    for bad_reference in (10, 5, True, 50.0, 10_001):
        with pytest.raises(InvalidInput, match="reference must be a whole number above k"):
            relevant_search(conn, "packages", "embedding", "json", reference=bad_reference)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="k must be"):
        relevant_search(conn, "packages", "embedding", "json", k=0)
    with pytest.raises(InvalidInput, match="non-empty query text"):
        relevant_search(conn, "packages", "embedding", " ")


def test_hubness_correction_reranks_by_similarity_less_mean_similarity_to_the_nearest_bank_queries(
    conn: Any, packages: list[Package], package_vectors: Any, encoder: Encoder
) -> None:
    bank_texts = [p.synopsis for p in packages[200:]]
    assert set_query_bank(conn, "packages", "embedding", bank_texts + ["", bank_texts[0]]) == len(set(bank_texts))
    query = "a tool to compress files"
    hits = corrected_search(conn, "packages", "embedding", query, k=10, weight=0.5, candidates=40)
    bank = np.stack(encoder.encode(sorted(set(bank_texts)), kind="query"))  # type: ignore[arg-type]
    similar = package_vectors @ encoder.encode_query(query)
    hubness = np.sort(package_vectors @ bank.T, axis=1)[:, -10:].mean(axis=1)
    pool = np.argsort(-similar, kind="stable")[:40]
    expected = sorted(pool, key=lambda i: -(similar[i] - 0.5 * hubness[i]))[:10]
    assert [h.row["package"] for h in hits] == [packages[i].package for i in expected]
    for hit, i in zip(hits, expected, strict=True):
        assert hit.score == pytest.approx(similar[i] - 0.5 * hubness[i], abs=1e-4)
    plain = corrected_search(conn, "packages", "embedding", query, k=10, weight=0)
    assert [h.row["package"] for h in plain] == [h.row["package"] for h in search(conn, "packages", "embedding", query)]


def test_hubness_correction_refuses_bad_input(conn: Any) -> None:
    with pytest.raises(InvalidInput, match="weight"):
        corrected_search(conn, "packages", "embedding", "zip", weight=1.5)
    with pytest.raises(InvalidInput, match="at least 10 distinct queries"):
        set_query_bank(conn, "packages", "embedding", ["one", "one", " "])
    conn.execute("DELETE FROM pgsim.query_bank")
    forget_banks()
    with pytest.raises(InvalidInput, match="no query bank: set one with"):
        corrected_search(conn, "packages", "embedding", "zip")
