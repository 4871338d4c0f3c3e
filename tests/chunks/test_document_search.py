"""Document-level search over chunks, on the real server and model: k distinct documents ranked by their
chunks, a sentence deep inside a long document that the truncated whole-text vector misses, filters on the
document's columns that keep k, fewer than k matching, and row-level security."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import pytest
from chunked_docs import (
    chunk_rows,
    chunked_table,
    document_class,
    document_distance,
    engine_as,
    last_query,
    owned_database,
    sync_as_worker,
)
from fixtures.roles import Roles, acting
from psycopg import sql
from sqlalchemy import event, select
from sqlalchemy.orm import Session, aliased

from pgsim.columns.chunking.settings import Chunks
from pgsim.demo.corpus import Package
from pgsim.encoding.encoder import Encoder
from pgsim.errors import InvalidInput
from pgsim.knn.caches import forget_plans
from pgsim.knn.documents import search_documents
from pgsim.knn.filtered import search, search_with_plan
from pgsim.quality.hybrid import hybrid_search
from pgsim.quality.relevance import relevant_search

SHORT, LONG, PER_LONG, DEEP = 30, 6, 12, 9  # short documents, long ones, packages per long one, the deep one


@dataclass(frozen=True)
class Corpus:
    dsn: str
    texts: dict[int, str]
    sections: dict[int, str]
    deep_queries: dict[int, str]  # long document id -> the synopsis of a package deep inside it
    deep_spans: dict[int, tuple[int, int]]  # long document id -> where that package's text is in it


@pytest.fixture(scope="module")
def corpus(server_dsn: str, roles: Roles, packages: list[Package]) -> Iterator[Corpus]:
    """30 package descriptions and 6 long documents of 12 descriptions each (about 1,100 word pieces, four times
    the model's window), chunked by 64 word pieces, encoded once."""
    texts = {i + 1: p.text for i, p in enumerate(packages[:SHORT])}
    sections = {i + 1: p.section for i, p in enumerate(packages[:SHORT])}
    deep: dict[int, str] = {}
    spans: dict[int, tuple[int, int]] = {}
    for j in range(LONG):
        parts = packages[100 + PER_LONG * j : 100 + PER_LONG * (j + 1)]
        doc_id = 1000 + j
        texts[doc_id] = "\n\n".join(p.text for p in parts)
        sections[doc_id] = "long" if j < 2 else "manual"
        deep[doc_id] = parts[DEEP].synopsis
        start = texts[doc_id].index(parts[DEEP].text)
        spans[doc_id] = (start, start + len(parts[DEEP].text))
    with owned_database(server_dsn, roles, "document_search") as dsn, psycopg.connect(dsn, autocommit=True) as admin:
        chunked_table(admin, roles, "docs", Chunks(64))
        with (
            acting(admin, roles.app),
            admin.cursor() as cur,
            cur.copy("COPY docs (id, section, body) FROM STDIN") as copy,
        ):
            for doc_id, text in texts.items():
                copy.write_row((doc_id, sections[doc_id], text))
        report = sync_as_worker(admin, roles, "docs")
        assert report.embedded == len(texts)
        admin.execute("ANALYZE docs")
        yield Corpus(dsn, texts, sections, deep, spans)


@pytest.fixture
def app(corpus: Corpus, roles: Roles) -> Iterator[psycopg.Connection[Any]]:
    """The application role's connection."""
    with psycopg.connect(corpus.dsn, autocommit=True) as conn, acting(conn, roles.app):
        yield conn


def exact_documents(conn: Any, encoder: Encoder, query: str, keep: Any = lambda doc_id: True) -> list[int]:
    """Every document with chunks, nearest first by its distance over its chunks (one minus the soft maximum of
    their similarities, log-mean-exp at temperature 0.05), by numpy."""
    vector = encoder.encode_query(query)
    distance = {
        doc_id: document_distance(np.array([v for *_, v in chunks]), vector)
        for doc_id, chunks in chunk_rows(conn, "docs").items()
        if keep(doc_id)
    }
    return sorted(distance, key=distance.__getitem__)


def test_search_returns_k_distinct_documents_by_their_chunks(
    app: Any, corpus: Corpus, encoder: Encoder, roles: Roles
) -> None:
    query = "command line tool to convert image files"
    hits = search_documents(app, "docs", "embedding", query, k=10)
    ids = [hit.row["id"] for hit in hits]
    assert len(ids) == 10 == len(set(ids))
    assert [hit.distance for hit in hits] == sorted(hit.distance for hit in hits)
    assert set(hits[0].row) == {"id", "section", "body"}  # the readable columns, not the embedding
    with psycopg.connect(corpus.dsn, autocommit=True) as owner, acting(owner, roles.owner):
        assert ids == exact_documents(owner, encoder, query)[:10]
        stored = chunk_rows(owner, "docs")
    for hit in hits:
        no, start, end, _, _ = stored[hit.row["id"]][hit.chunk_no]
        assert hit.span == (start, end) and start < end <= len(hit.row["body"])


@pytest.fixture(scope="module")
def first_windows(corpus: Corpus, encoder: Encoder) -> dict[int, Any]:
    """Each document's single vector as the model reads the whole text (its first window): truncation, the
    baseline (a chunked column's own vector is its chunks' mean instead)."""
    ids = sorted(corpus.texts)
    return dict(zip(ids, encoder.encode([corpus.texts[i] for i in ids]), strict=True))


def truncated(first_windows: dict[int, Any], encoder: Encoder, query: str) -> list[int]:
    """The 10 documents nearest by their truncated vector, exactly (numpy)."""
    vector = encoder.encode_query(query)
    return sorted(first_windows, key=lambda i: -float(first_windows[i] @ vector))[:10]


def test_a_sentence_deep_inside_a_long_document_finds_it_where_truncation_does_not(
    app: Any, corpus: Corpus, encoder: Encoder, first_windows: dict[int, Any]
) -> None:
    chunk_ranks, truncated_ranks = [], []
    for doc_id, query in corpus.deep_queries.items():
        hits = search_documents(app, "docs", "embedding", query, k=10)
        chunked = [hit.row["id"] for hit in hits]
        assert [(h.row["id"], h.chunk_no, h.span) for h in search(app, "docs", "embedding", query, k=10)] == [
            (h.row["id"], h.chunk_no, h.span) for h in hits
        ]  # pgsim.search on a chunked column: the same documents
        whole = truncated(first_windows, encoder, query)
        chunk_ranks.append(chunked.index(doc_id) + 1 if doc_id in chunked else None)
        truncated_ranks.append(whole.index(doc_id) + 1 if doc_id in whole else None)
        for hit in hits[:1]:
            if hit.row["id"] == doc_id:  # the chunk that matched is the deep package's, far past the window
                start, end = corpus.deep_spans[doc_id]
                assert hit.span[0] < end and hit.span[1] > start and hit.span[0] > 2000

    def mrr(ranks: list[int | None]) -> float:
        return sum(1 / rank for rank in ranks if rank) / len(ranks)

    assert mrr(chunk_ranks) >= 0.8, chunk_ranks
    assert mrr(chunk_ranks) >= mrr(truncated_ranks) + 0.4, (chunk_ranks, truncated_ranks)


@pytest.mark.parametrize("path", ["planned", "hnsw"])
def test_a_filter_on_the_documents_columns_keeps_k(app: Any, corpus: Corpus, encoder: Encoder, path: str) -> None:
    # "hnsw": the index path even for a narrow filter, which then needs more candidates than the first round
    tuning = {"exact_below_rows": 0, "min_hnsw_selectivity": 0.0} if path == "hnsw" else {}
    query = "documentation and reference manual"
    for section, k in (("manual", 3), ("long", 2)):
        where = sql.SQL("section = {}").format(sql.Literal(section))
        hits = search_documents(app, "docs", "embedding", query, k=k, where=where, **tuning)
        ids = [hit.row["id"] for hit in hits]
        assert len(ids) == k == len(set(ids))
        assert {corpus.sections[i] for i in ids} == {section}
        with psycopg.connect(corpus.dsn, autocommit=True) as owner:
            expected = exact_documents(owner, encoder, query, keep=lambda i, s=section: corpus.sections[i] == s)
        assert ids == expected[:k]
        if path == "planned":  # pgsim.search with a dict filter: the same documents, the plan says so
            found, plan = search_with_plan(app, "docs", "embedding", query, k=k, where={"section": section})
            assert [hit.row["id"] for hit in found] == ids and plan.reason == "documents by their chunks"


def test_fewer_matching_than_k_returns_them_all(app: Any, corpus: Corpus) -> None:
    where = sql.SQL("section = {}").format(sql.Literal("long"))
    assert sorted(hit.row["id"] for hit in search_documents(app, "docs", "embedding", "text", k=10, where=where)) == [
        1000,
        1001,
    ]
    everything = search_documents(app, "docs", "embedding", "software", k=100, exact_below_rows=0)
    assert sorted(hit.row["id"] for hit in everything) == sorted(corpus.texts)
    for tuning in ({}, {"exact_below_rows": 0, "min_hnsw_selectivity": 0.0}):
        assert search_documents(app, "docs", "embedding", "x", k=5, where=sql.SQL("false"), **tuning) == []


def test_filters_hold_percent_signs_and_bad_input_is_refused(app: Any) -> None:
    where = sql.SQL("body LIKE {}").format(sql.Literal("%library%"))
    hits = search_documents(app, "docs", "embedding", "shared library", k=3, where=where)
    assert len(hits) == 3 and all("library" in hit.row["body"] for hit in hits)
    with pytest.raises(InvalidInput, match="Composable"):
        search_documents(app, "docs", "embedding", "x", where="true; DROP TABLE docs")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="k must be"):
        search_documents(app, "docs", "embedding", "x", k=0)


def test_row_level_security_on_the_documents_holds_for_their_chunks(corpus: Corpus, roles: Roles) -> None:
    with psycopg.connect(corpus.dsn, autocommit=True) as conn:
        with acting(conn, roles.owner):
            conn.execute("ALTER TABLE docs ENABLE ROW LEVEL SECURITY")
            conn.execute(f"CREATE POLICY no_manuals ON docs TO {roles.app} USING (section <> 'manual')")
        try:
            with acting(conn, roles.app):
                hits = search_documents(conn, "docs", "embedding", "documentation and reference manual", k=60)
                assert hits and all(hit.row["section"] != "manual" for hit in hits)
                assert len(hits) == len(corpus.texts) - 4  # the four manuals are hidden
                visible = conn.execute("SELECT DISTINCT id FROM docs__embedding_chunks").fetchall()
                assert {i for (i,) in visible} == {i for i, s in corpus.sections.items() if s != "manual"}
        finally:
            with acting(conn, roles.owner):
                conn.execute("DROP POLICY no_manuals ON docs")
                conn.execute("ALTER TABLE docs DISABLE ROW LEVEL SECURITY")


def sql_documents(
    conn: Any, statement: str, vector: Any, *params: Any
) -> list[tuple[int, float, int, tuple[int, int]]]:
    rows = conn.execute(statement, [vector, *params]).fetchall()
    return [(row[0]["id"], row[1], row[2], (row[3], row[4])) for row in rows]


@pytest.mark.parametrize("tuning", [(1000.0, 0.05), (0.0, 0.0)], ids=["planned", "hnsw"])
def test_sql_knn_documents_and_pgsim_knn_agree_with_the_python_search(
    app: Any, encoder: Encoder, tuning: tuple[float, float]
) -> None:
    """pgsim.knn_documents (SQL) returns what search_documents returns, chunk spans included, on both paths; on a
    chunked column pgsim.knn returns the same documents."""
    from pgsim.psycopg import register

    register(app)
    exact_below_rows, min_selectivity = tuning
    for query, filter_, k in (
        ("command line tool to convert image files", None, 10),
        ("documentation and reference manual", "section = 'manual'", 3),
        ("shared library", "docs.body LIKE '%library%'", 4),
        ("anything", "false", 5),
    ):
        where = None if filter_ is None else sql.SQL(filter_.replace("docs.", "")).format()  # type: ignore[arg-type]
        expected = [
            (hit.row["id"], hit.distance, hit.chunk_no, hit.span)
            for hit in search_documents(
                app, "docs", "embedding", query, k=k, where=where, exact_below_rows=exact_below_rows,
                min_hnsw_selectivity=min_selectivity,
            )
        ]  # fmt: skip
        vector = encoder.encode_query(query)
        found = sql_documents(
            app,
            "SELECT * FROM pgsim.knn_documents('docs', 'embedding', %s, %s, %s, exact_below_rows => %s, "
            "min_hnsw_selectivity => %s)",
            vector, k, filter_, exact_below_rows, min_selectivity,
        )  # fmt: skip
        assert [(i, no, span) for i, _, no, span in found] == [(i, no, span) for i, _, no, span in expected]
        assert np.allclose([d for _, d, _, _ in found], [d for _, d, _, _ in expected], atol=1e-6)
        knn = app.execute("SELECT row, distance FROM pgsim.knn('docs', 'embedding', %s, %s, %s)", [vector, k, filter_])
        assert [row["id"] for row, _ in knn.fetchall()] == [i for i, *_ in expected]


def test_sql_knn_documents_refuses_bad_input(app: Any, encoder: Encoder) -> None:
    from pgsim.psycopg import register

    register(app)
    vector = encoder.encode_query("x")
    bad = [
        ((np.zeros(384, dtype=np.float32), 3, None), "all zeros"),
        ((vector, 0, None), "k must be"),
        ((vector, 3, "true; DROP TABLE docs"), "multi-query|syntax error"),
        ((vector, 3, "section = 'x') OR (true"), "syntax error"),  # a filter cannot close its parentheses
    ]
    for (query, k, filter_), error in bad:
        statement = "SELECT * FROM pgsim.knn_documents('docs', 'embedding', %s, %s, %s)"
        with pytest.raises(psycopg.Error, match=error):
            app.execute(statement, [query, k, filter_])
    assert app.execute("SELECT count(*) FROM docs").fetchone()[0] > 0
    with pytest.raises(psycopg.Error, match="not a registered embedding"):
        app.execute("SELECT * FROM pgsim.knn_documents('docs', 'body', %s, 3)", [vector])


Doc = document_class("docs", "worker", Chunks(64))


def test_the_orms_nearest_on_a_chunked_column_yields_documents_as_the_other_searches_do(
    app: Any, corpus: Corpus, roles: Roles
) -> None:
    engine = engine_as(corpus.dsn, roles.app)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, statement, *_: statements.append(statement))
    query = "documentation and reference manual"
    try:
        with Session(engine) as session:
            nearest = Doc.embedding.nearest(query)
            for where, k, offset in ((None, 10, 0), (Doc.section == "manual", 3, 0), (None, 4, 3)):
                statement = select(Doc).order_by(nearest).limit(k).offset(offset)
                condition = None
                if where is not None:
                    statement = statement.where(where)
                    condition = sql.SQL("section = {}").format(sql.Literal("manual"))
                found = [doc.id for doc in session.scalars(statement)]
                expected = [hit.row["id"] for hit in search_documents(app, "docs", "embedding", query, k=k + offset,
                                                                        where=condition)][offset:]  # fmt: skip
                assert found == expected and len(found) == k
                assert "pgsim.knn_documents" in last_query(statements)  # the planned path, no fallback after it
            # not plannable (another ORDER BY term first; a subquery on another table): the exact path, same answer
            by_section = [doc.id for doc in session.scalars(select(Doc).order_by(Doc.section, nearest).limit(40))]
            assert len(by_section) == len(set(by_section)) == len(corpus.texts)
            assert "knn_documents" not in last_query(statements) and "pg_catalog.avg(" in last_query(statements)
            everything = [hit.row["id"] for hit in search_documents(app, "docs", "embedding", query, k=40)]
            assert by_section == sorted(everything, key=lambda i: (corpus.sections[i], everything.index(i)))
            other = aliased(Doc)
            joined = select(Doc).where(Doc.id.in_(select(other.id).where(other.section == "long"))).order_by(nearest)
            joined = joined.limit(5)
            assert sorted(doc.id for doc in session.scalars(joined)) == [1000, 1001]
            rows = session.execute(select(Doc.id, Doc.section).order_by(nearest).limit(5)).all()
            assert [row.id for row in rows] == everything[:5]
            other = aliased(Doc)  # an alias of the documents: the exact path, documents still
            by_alias = session.scalars(select(other).order_by(other.embedding.nearest(query)).limit(5))
            assert [doc.id for doc in by_alias] == everything[:5]
    finally:
        engine.dispose()


@pytest.fixture
def full_text(corpus: Corpus, roles: Roles) -> Iterator[None]:
    """A tsvector column on the documents, for hybrid search, while the test runs."""
    with psycopg.connect(corpus.dsn, autocommit=True) as owner, acting(owner, roles.owner):
        owner.execute(
            "ALTER TABLE docs ADD COLUMN fts tsvector GENERATED ALWAYS AS (to_tsvector('english', coalesce(body, ''))) "
            "STORED"
        )
        forget_plans()  # the table's columns as searches knew them, before ALTER TABLE
        try:
            yield
        finally:
            owner.execute("ALTER TABLE docs DROP COLUMN fts")


def test_sql_hybrid_and_relevant_search_rank_documents_by_their_chunks(
    app: Any, corpus: Corpus, encoder: Encoder, full_text: None
) -> None:
    """pgsim.hybrid_search and pgsim.relevant_search (SQL) take their vector list from pgsim.knn, so on a chunked
    column they fuse and judge documents by their nearest chunk: a sentence deep inside a long document finds it."""
    from pgsim.psycopg import register

    register(app)
    for doc_id, query in corpus.deep_queries.items():
        vector = encoder.encode_query(query)
        relevant = app.execute(
            "SELECT row, distance FROM pgsim.relevant_search('docs', 'embedding', %s, 10, min_score => 0)", [vector]
        ).fetchall()
        knn = app.execute("SELECT row FROM pgsim.knn_documents('docs', 'embedding', %s, 10)", [vector]).fetchall()
        assert [row["id"] for row, _ in relevant] == [row["id"] for (row,) in knn]
        fused = app.execute(
            "SELECT row, vector_rank FROM pgsim.hybrid_search('docs', 'embedding', %s, %s, 10)", [vector, query]
        ).fetchall()
        ids = [row["id"] for row, _ in fused]
        assert len(ids) == len(set(ids)) == 10
        assert ids[0] == doc_id, (query, ids)  # its words and its chunk both name it
        python_fused = hybrid_search(app, "docs", "embedding", query, k=10)  # Python's: the same documents
        assert [hit.row["id"] for hit in python_fused] == ids and set(python_fused[0].row) == {
            "id",
            "section",
            "body",
            "fts",
        }
        sql_distances = [distance for _, distance in app.execute(
            "SELECT row, distance FROM pgsim.hybrid_search('docs', 'embedding', %s, %s, 10)", [vector, query]
        ).fetchall()]  # fmt: skip
        assert [hit.distance for hit in python_fused] == pytest.approx(sql_distances, abs=1e-6)
        python_relevant = relevant_search(app, "docs", "embedding", query, k=10, min_score=0)
        assert [hit.row["id"] for hit in python_relevant] == [row["id"] for row, _ in relevant]
        assert "embedding" not in fused[0][0]
