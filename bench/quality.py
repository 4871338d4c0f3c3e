"""Search quality on the Debian corpus: hybrid search, a calibrated relevance threshold, MMR diversity,
hubness correction, near-duplicate grouping and zero-shot labelling, each as pgsim's API does it (the
rows whose technique is a ``pgsim.`` call) beside its baseline and the prototypes it was chosen from.

    python bench/quality.py [--dsn DSN] [--queries 1000] [--bank 10000] [--hub-queries 5000] [--subset 5000]

Every package with a long description is a row of ``bench_quality.docs``: its long description only, as
a generated ``tsvector`` (english, GIN index) and as an all-MiniLM-L6-v2 vector (HNSW, cosine). The
evaluation sets and metrics are in quality_data.py: known-item search (a package's synopsis finds its
description; identical descriptions count as relevant), Source groups as entities, Section as label. The
query bank (QB-Norm, calibration) and the hubness probe are synopses of other packages, disjoint from the
test queries. Each technique is a function of the connection and the data that returns table rows: the
prototypes (SQL where it is about the query, numpy where that is simpler), the baselines, and the product
call's own output measured the same way. The database gets pgsim's schema (pgsim.install). Embeddings are
cached in bench/.cache/ (see corpus_cache.py); one table is printed.

Section 7 (``--only calibrated``) measures pgsim.quality.relevance_calibration on three tables: the
descriptions, the same packages' synopses (short texts) and Debian's man pages (manpages.py): the relevance
cut and hybrid search before and after ``calibrate_relevance``, in tables of their own; it leaves no
calibration behind, so the other sections measure the uncalibrated searches.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_cache import debian_packages, embeddings  # noqa: E402
from quality_data import (  # noqa: E402
    SECTION_DESCRIPTIONS,
    KnownItem,
    Matrix,
    accuracy_macro_f1,
    auc,
    best_threshold,
    components,
    intra_list_similarity,
    known_items,
    mrr_recall,
    pairwise_prf,
    reciprocal_rank,
    skewness,
    threshold_prf,
    twin_groups,
)

import pgsim  # noqa: E402
import pgsim.quality.relevance  # noqa: E402  (its defaults)
from pgsim.cli.common import format_table  # noqa: E402
from pgsim.db.connection import connect  # noqa: E402
from pgsim.demo.corpus import Package  # noqa: E402
from pgsim.psycopg import register  # noqa: E402

SCHEMA = "bench_quality"
DOCS = sql.Identifier(SCHEMA, "docs")
SUBSET = sql.Identifier(SCHEMA, "subset")
LABELS = sql.Identifier(SCHEMA, "labels")
LABELLED = sql.Identifier(SCHEMA, "labelled")
TABLE = f"{SCHEMA}.docs"  # the same table, named as pgsim's API takes it
K = 10
CANDIDATES = 100  # vector candidates fetched per query (plus the query's twins, for the held-out runs)
EF_SEARCH = 400  # >= CANDIDATES + the largest twin group (168), so the candidate lists are near exact

COLUMNS = ["technique", "setting", "MRR@10", "R@10", "P", "R", "F1", "acc", "macro-F1", "ILS@10", "N10 skew", "time"]
KEYS = ["mrr", "recall", "p", "r", "f1", "acc", "macro_f1", "ils", "skew", "time"]
Row = list[Any]


def row(technique: str, setting: str, **metrics: Any) -> Row:
    unknown = set(metrics) - set(KEYS)
    assert not unknown, unknown
    return [technique, setting, *(metrics.get(key) for key in KEYS)]


@dataclass
class Data:
    docs: list[Package]
    vectors: Matrix  # unit description vectors, row i = table id i
    twins: list[frozenset[int]]
    items: list[KnownItem]
    query_vectors: Matrix  # unit synopsis vectors of the items
    relevance_items: list[KnownItem]  # the relevance threshold's own, larger set of known-item queries
    relevance_vectors: Matrix
    bank: list[int]  # doc ids whose synopses form the query bank
    bank_vectors: Matrix
    probe_vectors: Matrix  # synopses of other packages, to measure hubness
    args: argparse.Namespace


@dataclass
class Candidates:
    """What the server returned per known-item query, collected once and shared by the techniques."""

    vector_ids: list[np.ndarray[Any, Any]] = field(default_factory=list)  # top CANDIDATES + twins, by cosine
    vector_cos: list[np.ndarray[Any, Any]] = field(default_factory=list)
    hnsw_default: list[list[int]] = field(default_factory=list)  # LIMIT 10 at pgvector's default ef_search
    text: dict[str, list[list[int]]] = field(default_factory=dict)  # full-text variant -> top CANDIDATES
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def unit(matrix: Matrix) -> Matrix:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms == 0, 1, norms)).astype(np.float32)


# --- the table -----------------------------------------------------------------------------------------


def load_table(conn: psycopg.Connection[Any], docs: list[Package], vectors: Matrix) -> None:
    digest = hashlib.sha256("\x00".join(f"{p.package}\x01{p.description}" for p in docs).encode()).hexdigest()[:16]
    tag = f"{len(docs)} {digest} v1"
    if conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", [f"{SCHEMA}.docs"]).fetchone() == (tag,):
        print(f"{SCHEMA}.docs: reusing {len(docs)} rows", flush=True)
        return
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (id int PRIMARY KEY, package text NOT NULL, section text, source text, "
            "description text NOT NULL, "
            "tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', description)) STORED, "
            "embedding vector(384))"
        ).format(DOCS)
    )
    started = time.perf_counter()
    copy_sql = sql.SQL("COPY {} (id, package, section, source, description, embedding) FROM STDIN (FORMAT BINARY)")
    with conn.cursor() as cur, cur.copy(copy_sql.format(DOCS)) as copy:
        copy.set_types(["int4", "text", "text", "text", "text", "vector"])
        for i, (p, vector) in enumerate(zip(docs, vectors, strict=True)):
            copy.write_row((i, p.package, p.section, p.source, p.description, vector))
    print(f"{SCHEMA}.docs: {len(docs)} rows copied (tsvector generated) in {time.perf_counter() - started:.1f}s")
    started = time.perf_counter()
    with conn.transaction():
        conn.execute("SET LOCAL maintenance_work_mem = '1GB'")
        conn.execute("SET LOCAL max_parallel_maintenance_workers = 2")
        conn.execute(sql.SQL("CREATE INDEX ON {} USING hnsw (embedding vector_cosine_ops)").format(DOCS))
    conn.execute(sql.SQL("CREATE INDEX ON {} USING gin (tsv)").format(DOCS))
    conn.execute(sql.SQL("ANALYZE {}").format(DOCS))
    conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(DOCS, sql.Literal(tag)))
    print(f"HNSW and GIN indexes built in {time.perf_counter() - started:.1f}s", flush=True)


# --- the searches a product would offer (prototypes) --------------------------------------------------

VECTOR_TOP = sql.SQL("SELECT id, 1 - (embedding <=> %(q)s) FROM {} ORDER BY embedding <=> %(q)s LIMIT %(n)s").format(
    DOCS
)

# tsquery constructions over the synopsis; OR: plainto_tsquery's lexemes (stemmed, stop words gone) with
# every & and phrase operator (<->, <N>) replaced by | in its text form, which quotes the lexemes safely
TSQUERIES = {
    "plainto (AND)": sql.SQL("plainto_tsquery('english', %(text)s)"),
    "websearch": sql.SQL("websearch_to_tsquery('english', %(text)s)"),
    "OR of lexemes": sql.SQL(
        "CAST(regexp_replace(plainto_tsquery('english', %(text)s)::text, ' (&|<->|<[0-9]+>) ', ' | ', 'g') AS tsquery)"
    ),
}
RANKS = {
    "ts_rank_cd": sql.SQL("ts_rank_cd(tsv, query)"),
    "ts_rank": sql.SQL("ts_rank(tsv, query)"),
    "ts_rank norm 1": sql.SQL("ts_rank(tsv, query, 1)"),  # divided by 1 + log(document length)
}
TEXT_VARIANTS = [
    ("plainto (AND)", "ts_rank_cd"),
    ("websearch", "ts_rank_cd"),
    ("OR of lexemes", "ts_rank_cd"),
    ("OR of lexemes", "ts_rank"),
    ("OR of lexemes", "ts_rank norm 1"),
]


def text_query(tsquery: str, rank: str) -> sql.Composed:
    return sql.SQL(
        "SELECT id FROM {docs}, {tsquery} AS query WHERE tsv @@ query ORDER BY {rank} DESC, id LIMIT %(n)s"
    ).format(docs=DOCS, tsquery=TSQUERIES[tsquery], rank=RANKS[rank])


def hybrid_query(tsquery: str, rank: str) -> sql.Composed:
    """Reciprocal rank fusion in one statement: top-n by vector (HNSW) and top-n by full-text rank (GIN),
    score = sum of weight / (k_rrf + rank) over the lists a row is in."""
    return sql.SQL(
        """
        WITH v AS (
            SELECT id, row_number() OVER (ORDER BY d) AS r FROM (
                SELECT id, embedding <=> %(q)s AS d FROM {docs} ORDER BY embedding <=> %(q)s LIMIT %(n)s) s),
        t AS (
            SELECT id, row_number() OVER (ORDER BY score DESC, id) AS r FROM (
                SELECT id, {rank} AS score FROM {docs}, {tsquery} AS query WHERE tsv @@ query
                ORDER BY score DESC, id LIMIT %(n)s) s)
        SELECT id FROM (
            SELECT id, %(wv)s / (%(k)s + r) AS s FROM v
            UNION ALL
            SELECT id, %(wt)s / (%(k)s + r) FROM t) u
        GROUP BY id ORDER BY sum(s) DESC, id LIMIT %(limit)s
        """
    ).format(docs=DOCS, tsquery=TSQUERIES[tsquery], rank=RANKS[rank])


def collect(conn: psycopg.Connection[Any], data: Data) -> Candidates:
    """One pass over the known-item queries: vector candidates and full-text candidates per variant; timed per
    kind."""
    from tqdm import tqdm

    found = Candidates()
    text_sql = {f"{tsq}, {rank}": text_query(tsq, rank) for tsq, rank in TEXT_VARIANTS}
    found.text = {name: [] for name in text_sql}
    conn.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(EF_SEARCH)))
    for item, vector in tqdm(
        list(zip(data.items, data.query_vectors, strict=True)), desc="known-item queries", file=sys.stderr
    ):
        started = time.perf_counter()
        rows = conn.execute(VECTOR_TOP, {"q": vector, "n": CANDIDATES + len(item.relevant)}).fetchall()
        found.seconds["vector"] += time.perf_counter() - started
        found.vector_ids.append(np.array([r[0] for r in rows], dtype=np.int64))
        found.vector_cos.append(np.array([r[1] for r in rows], dtype=np.float64))
        with conn.transaction():
            conn.execute("SET LOCAL hnsw.ef_search = 40")
            started = time.perf_counter()
            found.hnsw_default.append([r[0] for r in conn.execute(VECTOR_TOP, {"q": vector, "n": K})])
            found.seconds["hnsw default"] += time.perf_counter() - started
        for name, query in text_sql.items():
            started = time.perf_counter()
            found.text[name].append([r[0] for r in conn.execute(query, {"text": item.text, "n": CANDIDATES})])
            found.seconds[name] += time.perf_counter() - started
    conn.execute("RESET hnsw.ef_search")
    return found


def rrf(lists: Sequence[tuple[Sequence[int], float]], k_rrf: float, n: int) -> list[int]:
    scores: dict[int, float] = defaultdict(float)
    for ranked, weight in lists:
        for rank, doc in enumerate(ranked[:n], start=1):
            scores[doc] += weight / (k_rrf + rank)
    return sorted(scores, key=lambda doc: (-scores[doc], doc))[:K]


def ms(seconds: float, count: int) -> str:
    return f"{seconds / count * 1000:.1f} ms/q"


def timed_calls(desc: str, inputs: Sequence[Any], call: Any) -> tuple[list[Any], float]:
    """``call(x)`` for each input, under a progress bar; the results and the seconds spent in the calls."""
    from tqdm import tqdm

    results, seconds = [], 0.0
    for x in tqdm(inputs, desc=desc, file=sys.stderr):
        started = time.perf_counter()
        results.append(call(x))
        seconds += time.perf_counter() - started
    return results, seconds


def hit_ids(hits: Sequence[Any]) -> list[int]:
    return [int(hit.row["id"]) for hit in hits]


# --- 1. hybrid search ----------------------------------------------------------------------------------


def hybrid_search(conn: psycopg.Connection[Any], data: Data, found: Candidates) -> list[Row]:
    items, n_q = data.items, len(data.items)
    rows = []
    exact = [np.argsort(-(data.vectors @ v), kind="stable")[:K].tolist() for v in data.query_vectors]
    mrr, rec = mrr_recall(exact, items)
    rows.append(row("baseline: vector only", "exact cosine (numpy), description vectors", mrr=mrr, recall=rec))
    mrr, rec = mrr_recall(found.hnsw_default, items)
    rows.append(
        row(
            "baseline: vector only",
            "HNSW, ef_search 40, LIMIT 10",
            mrr=mrr,
            recall=rec,
            time=ms(found.seconds["hnsw default"], n_q),
        )
    )
    vector_lists = [ids.tolist() for ids in found.vector_ids]
    mrr, rec = mrr_recall(vector_lists, items)
    rows.append(
        row(
            "baseline: vector only",
            f"HNSW, ef_search {EF_SEARCH}, LIMIT {CANDIDATES}+",
            mrr=mrr,
            recall=rec,
            time=ms(found.seconds["vector"], n_q),
        )
    )
    text_mrr = {}
    for name, lists in found.text.items():
        mrr, rec = mrr_recall(lists, items)
        text_mrr[name] = mrr
        empty = sum(1 for ranked in lists if not ranked) / n_q
        rows.append(
            row(
                "full-text only",
                f"{name} ({empty:.0%} of queries match nothing)",
                mrr=mrr,
                recall=rec,
                time=ms(found.seconds[name], n_q),
            )
        )
    best = max(text_mrr, key=lambda name: text_mrr[name])
    grid = [(60, n, 1.0, 1.0) for n in (20, 50, 100)] + [(10, 50, 1.0, 1.0), (60, 50, 1.0, 0.5), (60, 50, 0.5, 1.0)]
    for k_rrf, n, w_vec, w_text in grid:
        fused = [rrf([(v, w_vec), (t, w_text)], k_rrf, n) for v, t in zip(vector_lists, found.text[best], strict=True)]
        mrr, rec = mrr_recall(fused, items)
        rows.append(
            row(
                "hybrid RRF (fusion in Python)",
                f"{best}; k_rrf {k_rrf}, N {n}, w_vec {w_vec}, w_text {w_text}",
                mrr=mrr,
                recall=rec,
            )
        )
    strict = "plainto (AND), ts_rank_cd"
    fused = [rrf([(v, 1.0), (t, 1.0)], 60, 50) for v, t in zip(vector_lists, found.text[strict], strict=True)]
    mrr, rec = mrr_recall(fused, items)
    rows.append(row("hybrid RRF (fusion in Python)", f"{strict}; k_rrf 60, N 50", mrr=mrr, recall=rec))

    # the same fusion as one SQL statement, at pgvector's default ef_search raised to N
    tsq, rank = best.split(", ")
    statement = hybrid_query(tsq, rank)
    from tqdm import tqdm

    results, seconds = [], 0.0
    for item, vector in tqdm(
        list(zip(items, data.query_vectors, strict=True)), desc="hybrid, one SQL statement", file=sys.stderr
    ):
        with conn.transaction():
            conn.execute("SET LOCAL hnsw.ef_search = 100")
            started = time.perf_counter()
            params = {"q": vector, "text": item.text, "n": 50, "k": 60.0, "wv": 1.0, "wt": 1.0, "limit": K}
            results.append([r[0] for r in conn.execute(statement, params)])
            seconds += time.perf_counter() - started
    mrr, rec = mrr_recall(results, items)
    rows.append(
        row(
            "hybrid RRF (one SQL statement)",
            f"{best}; k_rrf 60, N 50, ef_search 100",
            mrr=mrr,
            recall=rec,
            time=ms(seconds, n_q),
        )
    )
    rows.append(product_hybrid(conn, data))
    return rows


def product_hybrid(conn: psycopg.Connection[Any], data: Data) -> Row:
    """pgsim.hybrid_search on the same table: it takes the query as text, so each call also encodes it (timed
    apart here, with the same encoder, to tell the two costs apart)."""
    from pgsim.encoding.encoder import encoder_for

    encoder = encoder_for(pgsim.DEFAULT_MODEL)
    texts = [item.text for item in data.items]
    encoder.encode_query(texts[0])  # loads the model outside the timings
    encoded, encode_seconds = timed_calls("encoding the query texts alone", texts, encoder.encode_query)
    agree = float(np.mean((unit(np.array(encoded)) * data.query_vectors).sum(axis=1)))
    print(f"query texts encoded in the call vs the bench's query vectors: mean cosine {agree:.5f}", file=sys.stderr)

    def call(text: str) -> list[int]:
        hits = pgsim.hybrid_search(
            conn, TABLE, "embedding", text, k=K, text_column="tsv", columns=["id"], candidates=50, rrf_k=60
        )
        return hit_ids(hits)

    results, seconds = timed_calls("pgsim.hybrid_search", texts, call)
    mrr, rec = mrr_recall(results, data.items)
    n_q = len(texts)
    return row(
        "pgsim.hybrid_search",
        "k 10, candidates 50, rrf_k 60, text_column tsv (ORed lexemes, ts_rank norm 1); encodes the query text",
        mrr=mrr,
        recall=rec,
        time=f"{ms(seconds, n_q)}, of it {encode_seconds / n_q * 1000:.1f} encoding",
    )


# --- 2. relevance threshold ----------------------------------------------------------------------------

SPLITS = 20  # random (held-out, tuning) splits of the relevance queries; each figure is their mean
REFERENCE = pgsim.quality.relevance.DEFAULT_REFERENCE
PRODUCT_RELEVANCE = "pgsim.relevant_search's score"
PRESENT = "present"


def relevance_threshold(
    conn: psycopg.Connection[Any], data: Data, doc_stats: dict[str, np.ndarray[Any, Any]]
) -> list[Row]:
    """Known-item queries of their own (``--relevance-queries``). In each of SPLITS random splits half of
    them have their answer removed from consideration (the target and its twins; in the second condition
    also every package of the target's Source, whose descriptions often share paragraphs with it): nothing
    relevant is left for them. A query "returns" its top-10 results scoring >= t; precision is the share of
    returning queries that returned something relevant, recall the share of answerable queries that did.
    t is tuned (for best F1, or for the best recall at precision >= 0.6) on a random half of the queries and
    evaluated on the other. AUC: the chance that a query whose answer is present has a higher best score
    than one whose answer was removed (0.5: the score cannot tell them apart). Figures are means over the
    splits. The other scorers run in numpy on exact neighbours; the product row is pgsim.relevant_search on
    the server, the removed rows kept out by its ``where``."""
    items = data.relevance_items
    by_source: dict[str, set[int]] = defaultdict(set)
    for doc, package in enumerate(data.docs):
        by_source[package.source].add(doc)
    conditions = {
        "held out: target+twins": [item.relevant for item in items],
        "held out: +Source siblings": [
            item.relevant | frozenset(by_source[data.docs[item.doc].source]) for item in items
        ],
    }
    outcomes = {state: Outcome() for state in [PRESENT, *conditions]}
    exact_outcomes(data, conditions, doc_stats, outcomes)
    seconds = product_outcomes(conn, data, conditions, outcomes)
    rows = []
    for condition in conditions:
        for name in outcomes[PRESENT].best:
            label = "pgsim.relevant_search" if name == PRODUCT_RELEVANCE else "relevance threshold"
            extra = {"time": ms(seconds, len(items) * (1 + len(conditions)))} if name == PRODUCT_RELEVANCE else {}
            for goal in ("best F1", "P>=0.6", "default"):
                if goal == "default" and name != PRODUCT_RELEVANCE:
                    continue
                t, p, r, f1, separation = np.mean(
                    [
                        split_figures(outcomes[PRESENT], outcomes[condition], name, split, goal)
                        for split in range(SPLITS)
                    ],
                    axis=0,
                )
                how = "the product's default" if goal == "default" else f"tuned for {goal}"
                label = "baseline: relevance threshold" if name == "raw cosine" else label
                setting = f"{condition}; {name} >= {t:.3f} ({how}); AUC {separation:.3f}"
                rows.append(row(label, setting, p=p, r=r, f1=f1, **extra))
    return rows


@dataclass
class Outcome:
    """Per scorer, per query: the best score among its top 10, and the best among its relevant rows there
    (-inf when none is); with every top-10 score pooled, the thresholds to try."""

    best: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    best_relevant: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    pooled: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, name: str, scores: np.ndarray[Any, Any], flags: np.ndarray[Any, Any]) -> None:
        self.best[name].append(float(scores.max()) if len(scores) else -np.inf)
        self.best_relevant[name].append(float(scores[flags].max()) if flags.any() else -np.inf)
        self.pooled[name].extend(scores.tolist())


def exact_outcomes(
    data: Data,
    conditions: dict[str, list[frozenset[int]]],
    doc_stats: dict[str, np.ndarray[Any, Any]],
    outcomes: dict[str, Outcome],
) -> None:
    """Raw cosine and the calibrations measured against it, on exact neighbours in numpy."""
    from tqdm import tqdm

    items, vectors = data.relevance_items, data.relevance_vectors
    sample = data.vectors[sorted(random.Random(11).sample(range(len(data.docs)), min(1000, len(data.docs))))]
    hub = doc_stats["topk_unmasked"]
    step = 256
    for start in tqdm(range(0, len(items), step), desc="relevance: exact neighbours", file=sys.stderr):
        for q, similar in enumerate(vectors[start : start + step] @ data.vectors.T, start=start):
            background = sample @ vectors[q]
            for state, removed in [(PRESENT, frozenset()), *((name, lists[q]) for name, lists in conditions.items())]:
                sims = similar.astype(np.float64)
                sims[list(removed)] = -np.inf
                top = np.argpartition(-sims, CANDIDATES)[:CANDIDATES]
                top = top[np.argsort(-sims[top])]
                cos = sims[top]
                flags = np.array([doc in items[q].relevant for doc in top[:K]], dtype=bool)
                outcome = outcomes[state]
                outcome.add("raw cosine", cos[:K], flags)
                outcome.add(f"margin over the {REFERENCE}th nearest row", cos[:K] - cos[REFERENCE - 1], flags)
                outcome.add("z: query vs 1000 random rows", (cos[:K] - background.mean()) / background.std(), flags)
                outcome.add("cos - 0.5 * hubness (query bank)", cos[:K] - 0.5 * hub[top[:K]], flags)


def product_outcomes(
    conn: psycopg.Connection[Any], data: Data, conditions: dict[str, list[frozenset[int]]], outcomes: dict[str, Outcome]
) -> float:
    """pgsim.relevant_search's top 10 with every score (min_score 0), per query once whole and once per
    condition with the removed rows excluded by ``where``; the seconds spent in the calls."""
    calls = [(q, state, frozenset[int]()) for q in range(len(data.relevance_items)) for state in [PRESENT]]
    calls += [(q, name, lists[q]) for name, lists in conditions.items() for q in range(len(data.relevance_items))]

    def call(args: tuple[int, str, frozenset[int]]) -> None:
        q, state, removed = args
        where = sql.SQL("NOT (id = ANY({}))").format(sql.Literal(sorted(removed))) if removed else None
        hits = pgsim.relevant_search(
            conn, TABLE, "embedding", data.relevance_vectors[q], k=K, min_score=0, where=where, columns=["id"]
        )
        found = hit_ids(hits)
        assert not removed & set(found)
        flags = np.array([doc in data.relevance_items[q].relevant for doc in found], dtype=bool)
        outcomes[state].add(PRODUCT_RELEVANCE, np.array([hit.score for hit in hits]), flags)

    conn.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(EF_SEARCH)))
    _, seconds = timed_calls("pgsim.relevant_search", calls, call)
    conn.execute("RESET hnsw.ef_search")
    return seconds


def split_figures(present: Outcome, removed: Outcome, name: str, split: int, goal: str) -> tuple[float, ...]:
    """Threshold, precision, recall, F1 and AUC of one random split (see relevance_threshold)."""
    count = len(present.best[name])
    rng = random.Random(1000 + split)
    held = np.zeros(count, dtype=bool)
    held[rng.sample(range(count), count // 2)] = True
    tuning = np.zeros(count, dtype=bool)
    tuning[rng.sample(range(count), count // 2)] = True
    best = np.where(held, removed.best[name], present.best[name])
    good = np.where(held, removed.best_relevant[name], present.best_relevant[name])
    answerable = ~held
    separation = auc(best[answerable], best[held])
    if goal == "default":
        t = pgsim.quality.relevance.DEFAULT_MIN_SCORE
    else:
        pooled = np.array(present.pooled[name] + removed.pooled[name])
        minimum = 0.6 if goal == "P>=0.6" else None
        t = best_threshold(pooled, best[tuning], good[tuning], answerable[tuning], min_precision=minimum)
    p, r, f1 = threshold_prf(best[~tuning], good[~tuning], answerable[~tuning], t)
    return t, p, r, f1, separation


# --- 3. diversity --------------------------------------------------------------------------------------


def mmr(query_sims: np.ndarray[Any, Any], vectors: Matrix, lam: float, k: int) -> list[int]:
    """Maximal marginal relevance: positions picked greedily by lam * sim(q, d) - (1 - lam) * max sim(d, S)."""
    chosen: list[int] = []
    redundancy = np.zeros(len(query_sims))
    for _ in range(min(k, len(query_sims))):
        score = lam * query_sims - (1 - lam) * redundancy
        score[chosen] = -np.inf
        pick = int(np.argmax(score))
        chosen.append(pick)
        sims = vectors @ vectors[pick]
        redundancy = sims if len(chosen) == 1 else np.maximum(redundancy, sims)
    return chosen


def diversity(conn: psycopg.Connection[Any], data: Data, found: Candidates, pool: int = 50) -> list[Row]:
    rows = []
    for lam in (1.0, 0.7, 0.5, 0.3):
        rankings, ils, distinct = [], [], []
        for ids, cos in zip(found.vector_ids, found.vector_cos, strict=True):
            ids, cos = ids[:pool], cos[:pool]
            picked = mmr(cos, data.vectors[ids], lam, K)
            top = ids[picked]
            rankings.append(top.tolist())
            ils.append(intra_list_similarity(data.vectors[top]))
            distinct.append(len({data.docs[d].description for d in top}))
        mrr, rec = mrr_recall(rankings, data.items)
        label = "baseline: no diversity" if lam == 1.0 else "diversity MMR"
        rows.append(
            row(
                label,
                f"lambda {lam}, top {pool} candidates; {np.mean(distinct):.1f} distinct descriptions in 10",
                mrr=mrr,
                recall=rec,
                ils=float(np.mean(ils)),
            )
        )
    for lam in (0.7, 0.5):

        def call(vector: np.ndarray[Any, Any], lam: float = lam) -> list[int]:
            hits = pgsim.diverse_search(
                conn, TABLE, "embedding", vector, k=K, lambda_mult=lam, candidates=pool, columns=["id"]
            )
            return hit_ids(hits)

        rankings, seconds = timed_calls(f"pgsim.diverse_search, lambda {lam}", list(data.query_vectors), call)
        mrr, rec = mrr_recall(rankings, data.items)
        distinct = np.mean([len({data.docs[d].description for d in top}) for top in rankings])
        rows.append(
            row(
                "pgsim.diverse_search",
                f"lambda_mult {lam}, candidates {pool}; {distinct:.1f} distinct descriptions in 10",
                mrr=mrr,
                recall=rec,
                ils=float(np.mean([intra_list_similarity(data.vectors[top]) for top in rankings])),
                time=ms(seconds, len(rankings)),
            )
        )
    return rows


# --- 4. hubness ----------------------------------------------------------------------------------------


def bank_statistics(data: Data, k: int = 10, betas: Sequence[float] = (10.0, 20.0)) -> dict[str, np.ndarray[Any, Any]]:
    """Per row, against the bank of queries (a row's own synopsis and its twins' are left out): mean of its
    top-k cosines (CSLS-style hub score), log-sum-exp of beta * cosine (QB-Norm's inverted softmax), mean and
    sd. Each is one number per row: a product would store it in a column and refresh it with the bank."""
    from tqdm import tqdm

    group_of = {}
    for doc, twins in enumerate(data.twins):
        group_of[doc] = min(twins)
    row_groups = np.array([group_of[d] for d in range(len(data.docs))])
    bank_groups = np.array([group_of[d] for d in data.bank])
    names = ("topk", "topk_unmasked", "mean", "sd", *(f"lse{b:g}" for b in betas))
    out = {name: np.zeros(len(data.docs)) for name in names}
    step = 2048
    for start in tqdm(range(0, len(data.docs), step), desc="row statistics over the query bank", file=sys.stderr):
        sims = data.vectors[start : start + step] @ data.bank_vectors.T
        out["topk_unmasked"][start : start + step] = np.partition(sims, -k, axis=1)[:, -k:].mean(axis=1)
        own = row_groups[start : start + step, None] == bank_groups[None, :]
        counts = len(data.bank) - own.sum(axis=1)
        sims[own] = 0.0
        out["mean"][start : start + step] = sims.sum(axis=1) / counts
        out["sd"][start : start + step] = np.sqrt(
            np.maximum((sims**2).sum(axis=1) / counts - out["mean"][start : start + step] ** 2, 1e-12)
        )
        sims[own] = -np.inf
        out["topk"][start : start + step] = np.sort(np.partition(sims, -k, axis=1)[:, -k:], axis=1).mean(axis=1)
        for beta in betas:
            scaled = beta * sims.astype(np.float64)
            top = scaled.max(axis=1, keepdims=True)
            out[f"lse{beta:g}"][start : start + step] = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
    return out


def hubness(
    conn: psycopg.Connection[Any], data: Data, found: Candidates, doc_stats: dict[str, np.ndarray[Any, Any]]
) -> list[Row]:
    """Re-rank the top-100 vector candidates by cosine minus a per-row penalty learnt from the query bank;
    MRR on the known-item queries, and the skewness of N10 (how often each row is in a probe query's top 10).
    The bank's synopses are of packages in the table, so a bank package's own synopsis is among its row's
    nearest bank queries: the prototypes leave each row's own and its twins' synopses out, pgsim cannot (a
    bank is just texts); "unmasked" is the prototype as pgsim sees the bank."""
    from tqdm import tqdm

    penalties: dict[str, np.ndarray[Any, Any] | None] = {
        "none": None,
        "CSLS-style: cos - 0.5 * mean top-10 bank cos": 0.5 * doc_stats["topk"],
        "CSLS-style: cos - 0.5 * mean top-10 bank cos, bank unmasked": 0.5 * doc_stats["topk_unmasked"],
        "CSLS-style: cos - 1.0 * mean top-10 bank cos": doc_stats["topk"],
        "QB-Norm inverted softmax, beta 10": doc_stats["lse10"] / 10,
        "QB-Norm inverted softmax, beta 20": doc_stats["lse20"] / 20,
    }
    # exact top-100 of every probe query, then the same re-ranking: N10 before and after
    probe_ids, probe_cos = [], []
    for start in tqdm(range(0, len(data.probe_vectors), 500), desc="hubness probe queries", file=sys.stderr):
        sims = data.probe_vectors[start : start + 500] @ data.vectors.T
        top = np.argpartition(-sims, CANDIDATES, axis=1)[:, :CANDIDATES]
        probe_ids.append(top)
        probe_cos.append(np.take_along_axis(sims, top, axis=1))
    all_ids, all_cos = np.concatenate(probe_ids), np.concatenate(probe_cos)
    rows = []
    for name, penalty in penalties.items():
        rankings = []
        for ids, cos in zip(found.vector_ids, found.vector_cos, strict=True):
            ids, cos = ids[:CANDIDATES], cos[:CANDIDATES]
            score = cos if penalty is None else cos - penalty[ids]
            rankings.append(ids[np.argsort(-score, kind="stable")[:K]].tolist())
        mrr, rec = mrr_recall(rankings, data.items)
        score = all_cos if penalty is None else all_cos - penalty[all_ids]
        top10 = np.take_along_axis(all_ids, np.argsort(-score, axis=1)[:, :K], axis=1)
        n10 = np.bincount(top10.ravel(), minlength=len(data.docs))
        label = "baseline: no hubness correction" if penalty is None else "hubness correction"
        rows.append(
            row(
                label,
                f"{name}; max N10 {n10.max()}, {np.mean(n10 == 0):.0%} rows never in a top 10",
                mrr=mrr,
                recall=rec,
                skew=skewness(n10),
            )
        )
    rows.append(product_hubness(conn, data))
    return rows


def product_hubness(conn: psycopg.Connection[Any], data: Data, candidates: int = 50) -> Row:
    """pgsim.set_query_bank with the bench's bank synopses (less any equal to a test query's text), then
    pgsim.corrected_search per known-item query and per probe query (for N10)."""
    tested = {item.text for item in data.items}
    texts = [data.docs[d].synopsis for d in data.bank]
    kept = [text for text in texts if text not in tested]
    started = time.perf_counter()
    banked = pgsim.set_query_bank(conn, TABLE, "embedding", kept)
    bank_seconds = time.perf_counter() - started
    print(
        f"query bank: {len(texts)} synopses, {len(texts) - len(kept)} equal to a test query's left out, {banked} "
        "distinct kept",
        file=sys.stderr,
    )

    def call(vector: np.ndarray[Any, Any]) -> list[int]:
        hits = pgsim.corrected_search(
            conn, TABLE, "embedding", vector, k=K, weight=0.5, neighbours=10, candidates=candidates, columns=["id"]
        )
        return hit_ids(hits)

    rankings, seconds = timed_calls("pgsim.corrected_search", list(data.query_vectors), call)
    mrr, rec = mrr_recall(rankings, data.items)
    probes, _ = timed_calls("pgsim.corrected_search, hubness probe", list(data.probe_vectors), call)
    n10 = np.bincount(np.array([d for top in probes for d in top], dtype=np.int64), minlength=len(data.docs))
    print(f"pgsim.corrected_search: {np.mean(n10 == 0):.0%} rows never in a probe's top 10", file=sys.stderr)
    return row(
        "pgsim.corrected_search",
        f"weight 0.5, neighbours 10, candidates {candidates}; bank {banked} (no test query; own synopses NOT "
        f"masked); max N10 {n10.max()}",
        mrr=mrr,
        recall=rec,
        skew=skewness(n10),
        time=f"{ms(seconds, len(rankings))}; set_query_bank {bank_seconds:.0f}s",
    )


# --- 5. near-duplicates --------------------------------------------------------------------------------

KNN_PAIRS = sql.SQL(
    """
    SELECT a.id, b.id, 1 - b.d FROM {t} a CROSS JOIN LATERAL (
        SELECT s.id, s.embedding <=> a.embedding AS d FROM {t} s ORDER BY s.embedding <=> a.embedding LIMIT %(k)s
    ) b WHERE b.id <> a.id AND b.d <= %(d)s
    """
).format(t=SUBSET)
ALL_PAIRS = sql.SQL(
    "SELECT a.id, b.id, 1 - (a.embedding <=> b.embedding) FROM {t} a JOIN {t} b ON a.id < b.id "
    "WHERE a.embedding <=> b.embedding <= %(d)s"
).format(t=SUBSET)


def near_duplicates(conn: psycopg.Connection[Any], data: Data, size: int, k: int = 10) -> list[Row]:
    """Whole Source groups (at most 50 packages each: the gcc cross-toolchain sources have hundreds) drawn at
    random until ``size`` rows, in their own table with its own HNSW index; pairs with cosine >= threshold
    by a k-NN self-join served by the index and by an all-pairs join, then connected components."""
    by_source: dict[str, list[int]] = defaultdict(list)
    for doc, package in enumerate(data.docs):
        by_source[package.source].append(doc)
    sources = sorted(s for s, members in by_source.items() if len(members) <= 50)
    random.Random(17).shuffle(sources)
    chosen: list[int] = []
    for source in sources:
        if len(chosen) >= size:
            break
        chosen += by_source[source]
    chosen.sort()
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(SUBSET))
    conn.execute(
        sql.SQL("CREATE TABLE {} AS SELECT id, embedding FROM {} WHERE id = ANY(%s)").format(SUBSET, DOCS), [chosen]
    )
    conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(SUBSET))  # pgsim names rows by it
    with conn.transaction():
        conn.execute("SET LOCAL maintenance_work_mem = '512MB'")
        started = time.perf_counter()
        conn.execute(sql.SQL("CREATE INDEX ON {} USING hnsw (embedding vector_cosine_ops)").format(SUBSET))
        index_seconds = time.perf_counter() - started
    conn.execute(sql.SQL("ANALYZE {}").format(SUBSET))
    thresholds = (0.70, 0.80, 0.90, 0.95)
    lowest = 1 - min(thresholds)
    plan = "\n".join(r[0] for r in conn.execute(sql.SQL("EXPLAIN {}").format(KNN_PAIRS), {"k": k + 1, "d": lowest}))
    served = "index-served" if "Index Scan" in plan else "NOT index-served"
    started = time.perf_counter()
    knn = conn.execute(KNN_PAIRS, {"k": k + 1, "d": lowest}).fetchall()
    knn_seconds = time.perf_counter() - started
    started = time.perf_counter()
    every = conn.execute(ALL_PAIRS, {"d": lowest}).fetchall()
    all_seconds = time.perf_counter() - started
    position = {doc: i for i, doc in enumerate(chosen)}
    truth = [data.docs[d].source for d in chosen]
    n, full = len(chosen), len(data.docs)
    sources_in = len(set(truth))
    rows = []
    p, r, f1 = pairwise_prf([data.docs[d].description for d in chosen], truth)
    rows.append(
        row("baseline: near-duplicates", f"identical description ({n} rows, {sources_in} sources)", p=p, r=r, f1=f1)
    )
    p, r, f1 = pairwise_prf(list(range(n)), truth)
    rows.append(row("baseline: near-duplicates", "every row alone", p=p, r=r, f1=f1))
    for threshold in thresholds:
        for name, pairs, seconds, scale in (
            (f"k-NN self-join (HNSW, k {k}, {served})", knn, knn_seconds + index_seconds, full / n),
            ("all-pairs join", every, all_seconds, (full / n) ** 2),
        ):
            edges = [(position[a], position[b]) for a, b, cos in pairs if cos >= threshold]
            p, r, f1 = pairwise_prf(components(n, edges), truth)
            rows.append(
                row(
                    "near-duplicates",
                    f"{name}, cos >= {threshold}, components",
                    p=p,
                    r=r,
                    f1=f1,
                    time=f"{seconds:.1f}s; ~{seconds * scale / 60:.1f} min at {full}",
                )
            )
    for threshold in (0.90, 0.95):
        started = time.perf_counter()
        groups = pgsim.near_duplicates(conn, f"{SCHEMA}.subset", "embedding", threshold=threshold, neighbours=k)
        seconds = time.perf_counter() - started
        p, r, f1 = pairwise_prf(group_labels(chosen, groups), truth)
        grouped = sum(len(group) for group in groups)
        rows.append(
            row(
                "pgsim.near_duplicates",
                f"same {n} rows, threshold {threshold}, neighbours {k}; {len(groups)} groups of {grouped} rows",
                p=p,
                r=r,
                f1=f1,
                time=f"{seconds:.1f}s (+{index_seconds:.1f}s HNSW build)",
            )
        )
    return rows


def group_labels(ids: Sequence[int], groups: Sequence[Sequence[dict[str, Any]]]) -> list[int]:
    """One cluster label per id, from pgsim.near_duplicates' groups of primary keys (a row in no group is
    alone in its own)."""
    label = {int(key["id"]): number for number, group in enumerate(groups) for key in group}
    return [label.get(doc, len(groups) + position) for position, doc in enumerate(ids)]


def near_duplicates_full(conn: psycopg.Connection[Any], data: Data, threshold: float = 0.95) -> list[Row]:
    """pgsim.near_duplicates once on the whole table (its HNSW index is the one the searches use)."""
    truth = [p.source for p in data.docs]
    n = len(data.docs)
    rows = []
    p, r, f1 = pairwise_prf([p.description for p in data.docs], truth)
    rows.append(row("baseline: near-duplicates", f"identical description (all {n} rows)", p=p, r=r, f1=f1))
    print(f"pgsim.near_duplicates on all {n} rows ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    groups = pgsim.near_duplicates(conn, TABLE, "embedding", threshold=threshold, neighbours=10)
    seconds = time.perf_counter() - started
    p, r, f1 = pairwise_prf(group_labels(range(n), groups), truth)
    grouped = sum(len(group) for group in groups)
    rows.append(
        row(
            "pgsim.near_duplicates",
            f"all {n} rows, threshold {threshold}, neighbours 10; {len(groups)} groups of {grouped} rows",
            p=p,
            r=r,
            f1=f1,
            time=f"{seconds:.1f}s (measured)",
        )
    )
    return rows


# --- 6. zero-shot labelling ----------------------------------------------------------------------------

NEAREST_LABEL = sql.SQL(
    "SELECT d.id, (SELECT l.section FROM {labels} l WHERE l.variant = %(v)s "
    "ORDER BY l.embedding <=> d.embedding LIMIT 1) FROM {docs} d ORDER BY d.id"
).format(labels=LABELS, docs=DOCS)


def zero_shot_labels(conn: psycopg.Connection[Any], data: Data, examples: int = 10) -> list[Row]:
    """Each row gets the Section whose reference vector is nearest (one SQL statement per variant)."""
    sections = sorted({p.section for p in data.docs})
    truth = [p.section for p in data.docs]
    majority = Counter(truth).most_common(1)[0][0]
    rows = []
    acc, f1 = accuracy_macro_f1([majority] * len(truth), truth)
    rows.append(row("baseline: labels", f"majority class ({majority!r})", acc=acc, macro_f1=f1))
    texts = {
        "section name": sections,
        "written description": [SECTION_DESCRIPTIONS.get(s, s) for s in sections],
        "name: written description": [f"{s}: {SECTION_DESCRIPTIONS.get(s, s)}" for s in sections],
    }
    references: dict[str, Matrix] = {name: unit(embeddings(t)) for name, t in texts.items()}
    rng = random.Random(19)
    by_section: dict[str, list[int]] = defaultdict(list)
    for doc, package in enumerate(data.docs):
        by_section[package.section].append(doc)
    used: set[int] = set()
    centroids = []
    for section in sections:
        members = by_section[section]
        picked = rng.sample(members, min(examples, max(1, len(members) // 2)))
        used.update(picked)
        centroids.append(data.vectors[picked].mean(axis=0))
    centroid_name = f"centroid of {examples} labelled rows (NOT zero-shot)"
    references[centroid_name] = unit(np.array(centroids, dtype=np.float32))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(LABELS))
    conn.execute(sql.SQL("CREATE TABLE {} (variant text, section text, embedding vector(384))").format(LABELS))
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(LABELS)) as copy:
        copy.set_types(["text", "text", "vector"])
        for name, matrix in references.items():
            for section, vector in zip(sections, matrix, strict=True):
                copy.write_row((name, section, vector))
    from tqdm import tqdm

    for name in tqdm(references, desc="zero-shot labelling", file=sys.stderr):
        started = time.perf_counter()
        predicted = dict(conn.execute(NEAREST_LABEL, {"v": name}).fetchall())
        seconds = time.perf_counter() - started
        keep = [d for d in range(len(data.docs)) if name != centroid_name or d not in used]
        acc, f1 = accuracy_macro_f1([predicted[d] for d in keep], [truth[d] for d in keep])
        rows.append(
            row("zero-shot labels", f"nearest {name} ({len(keep)} rows)", acc=acc, macro_f1=f1, time=f"{seconds:.1f}s")
        )
    rows.append(product_labels(conn, data, {s: SECTION_DESCRIPTIONS.get(s, s) for s in sections}))
    return rows


def product_labels(conn: psycopg.Connection[Any], data: Data, labels: dict[str, str]) -> Row:
    """pgsim.label_rows with the written descriptions, into a new text column of a copy of the table's ids and
    vectors (an UPDATE of every row of the searched table would add a version of each to its HNSW and GIN
    indexes, and bloat them for the measurements of later runs)."""
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(LABELLED))
    conn.execute(sql.SQL("CREATE TABLE {} AS SELECT id, embedding FROM {}").format(LABELLED, DOCS))
    conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id), ADD COLUMN section_label text").format(LABELLED))
    started = time.perf_counter()
    counts = pgsim.label_rows(conn, f"{SCHEMA}.labelled", "embedding", labels, into="section_label")
    seconds = time.perf_counter() - started
    predicted = dict(conn.execute(sql.SQL("SELECT id, section_label FROM {}").format(LABELLED)).fetchall())
    assert sum(counts.values()) == len(predicted) == len(data.docs)
    acc, f1 = accuracy_macro_f1([predicted[d] for d in range(len(data.docs))], [p.section for p in data.docs])
    return row(
        "pgsim.label_rows",
        f"written description per section ({len(labels)} labels) into a new text column ({len(data.docs)} rows)",
        acc=acc,
        macro_f1=f1,
        time=f"{seconds:.1f}s",
    )


# --- 7. calibrated threshold and fusion, on two corpora ----------------------------------------------

MANPAGES = sql.Identifier(SCHEMA, "manpages")
SYNOPSES = sql.Identifier(SCHEMA, "synopses")
CALIBRATED_TABLES = {"debian": TABLE, "debian synopses": f"{SCHEMA}.synopses", "man pages": f"{SCHEMA}.manpages"}
FIRST_SENTENCE = re.compile(r"(?<=[a-z0-9)])[.!?]\s")
AND_THEN_OR = sql.SQL(
    "SELECT id FROM {t}, (SELECT string_agg(quote_literal(lexeme), ' | ')::tsquery AS some, "
    "string_agg(quote_literal(lexeme), ' & ')::tsquery AS every FROM unnest(to_tsvector('english', %(text)s))) q "
    "WHERE tsv @@ q.some ORDER BY tsv @@ q.every DESC, CASE WHEN tsv @@ q.every THEN ts_rank(tsv, q.every, 1) "
    "ELSE ts_rank(tsv, q.some, 1) END DESC, id LIMIT 10"
)
OR_ONLY = sql.SQL(
    "SELECT id FROM {t}, (SELECT string_agg(quote_literal(lexeme), ' | ')::tsquery AS some "
    "FROM unnest(to_tsvector('english', %(text)s))) q WHERE tsv @@ q.some ORDER BY ts_rank(tsv, q.some, 1) DESC, "
    "id LIMIT 10"
)


@dataclass
class QuerySet:
    corpus: str
    kind: str
    texts: list[str]
    relevant: list[frozenset[int]]
    vectors: Matrix


def load_manpages(conn: psycopg.Connection[Any]) -> list[QuerySet]:
    """bench_quality.manpages (see manpages.py): each page's text without its NAME section, as a tsvector
    (english, GIN) and an all-MiniLM-L6-v2 vector (HNSW, cosine); and its two query sets."""
    from manpages import deep_queries, manpages, name_queries

    pages = manpages()
    tag = f"{len(pages)} v1"
    if conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", [f"{SCHEMA}.manpages"]).fetchone() != (tag,):
        vectors = unit(embeddings([page.text for page in pages]))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(MANPAGES))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id int PRIMARY KEY, name text, section text, body text, "
                "tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', body)) STORED, embedding vector(384))"
            ).format(MANPAGES)
        )
        copy_sql = sql.SQL("COPY {} (id, name, section, body, embedding) FROM STDIN (FORMAT BINARY)")
        with conn.cursor() as cur, cur.copy(copy_sql.format(MANPAGES)) as copy:
            copy.set_types(["int4", "text", "text", "text", "vector"])
            for i, (page, vector) in enumerate(zip(pages, vectors, strict=True)):
                copy.write_row((i, page.name, page.section, page.text, vector))
        conn.execute(sql.SQL("CREATE INDEX ON {} USING hnsw (embedding vector_cosine_ops)").format(MANPAGES))
        conn.execute(sql.SQL("CREATE INDEX ON {} USING gin (tsv)").format(MANPAGES))
        conn.execute(sql.SQL("ANALYZE {}").format(MANPAGES))
        conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(MANPAGES, sql.Literal(tag)))
    sets = []
    for kind, queries in (
        ("NAME line", name_queries(pages, 300, seed=141)),
        ("deep sentence", deep_queries(pages, 300, seed=143)),
    ):
        texts = [q.text for q in queries]
        sets.append(QuerySet("man pages", kind, texts, [q.relevant for q in queries], unit(embeddings(texts))))
    print(f"{SCHEMA}.manpages: {len(pages)} pages", file=sys.stderr, flush=True)
    return sets


def load_synopses(conn: psycopg.Connection[Any], data: Data) -> QuerySet:
    """bench_quality.synopses: the same packages' one-line synopses only (short texts), as a tsvector and a
    vector; queries: the first sentence of a package's long description (at most 20 words), whose answer is
    its synopsis (and every package with the same synopsis)."""
    tag = f"{len(data.docs)} v1"
    if conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", [f"{SCHEMA}.synopses"]).fetchone() != (tag,):
        vectors = unit(embeddings([p.synopsis for p in data.docs]))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(SYNOPSES))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id int PRIMARY KEY, synopsis text, "
                "tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', synopsis)) STORED, embedding vector(384))"
            ).format(SYNOPSES)
        )
        with (
            conn.cursor() as cur,
            cur.copy(sql.SQL("COPY {} (id, synopsis, embedding) FROM STDIN (FORMAT BINARY)").format(SYNOPSES)) as copy,
        ):
            copy.set_types(["int4", "text", "vector"])
            for i, (p, vector) in enumerate(zip(data.docs, vectors, strict=True)):
                copy.write_row((i, p.synopsis, vector))
        conn.execute(sql.SQL("CREATE INDEX ON {} USING hnsw (embedding vector_cosine_ops)").format(SYNOPSES))
        conn.execute(sql.SQL("CREATE INDEX ON {} USING gin (tsv)").format(SYNOPSES))
        conn.execute(sql.SQL("ANALYZE {}").format(SYNOPSES))
        conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(SYNOPSES, sql.Literal(tag)))
    same: dict[str, set[int]] = defaultdict(set)
    for i, p in enumerate(data.docs):
        same[p.synopsis].add(i)
    items = known_items(data.docs, data.twins, 300, seed=131)
    texts = [
        " ".join(FIRST_SENTENCE.split(" ".join(data.docs[i.doc].description.split()), 1)[0].split()[:20]) for i in items
    ]
    relevant = [frozenset(same[data.docs[i.doc].synopsis]) for i in items]
    return QuerySet("debian synopses", "description's 1st sentence", texts, relevant, unit(embeddings(texts)))


def calibrated(conn: psycopg.Connection[Any], data: Data) -> tuple[list[Row], list[Row]]:
    """Before and after pgsim.quality.relevance_calibration.calibrate_relevance on each corpus: the
    relevance cut (the default min_score, then the table's own) and hybrid search (plain RRF, then the
    calibrated fusion), on query sets drawn with other seeds than those the constants were tuned on."""
    from pgsim.quality.relevance_calibration import calibrate_relevance

    items = known_items(data.docs, data.twins, 300, seed=101)
    texts = [item.text for item in items]
    sets = [QuerySet("debian", "synopsis", texts, [i.relevant for i in items], unit(embeddings(texts)))]
    sets += [load_synopses(conn, data), *load_manpages(conn)]
    conn.execute(
        "DELETE FROM pgsim.calibration WHERE table_oid = ANY(%s::regclass[])", [list(CALIBRATED_TABLES.values())]
    )
    lists = {id(qs): {"vector": _searches(conn, qs, "vector"), "old": _searches(conn, qs, "hybrid")} for qs in sets}
    scores = {id(qs): _relevance_scores(conn, qs) for qs in sets}
    thresholds, seconds = {}, {}
    for corpus, table in CALIBRATED_TABLES.items():
        result = calibrate_relevance(conn, table, "embedding", seconds=60)
        assert result.stored, result.reason
        thresholds[corpus], seconds[corpus] = result.min_score(REFERENCE), result.seconds
    relevance_rows, hybrid_rows = [], []
    for qs in sets:
        table = CALIBRATED_TABLES[qs.corpus]
        lists[id(qs)]["new"] = _searches(conn, qs, "hybrid")
        for name, statement in (("OR", OR_ONLY), ("AND before OR", AND_THEN_OR)):
            lists[id(qs)][name] = [
                [r[0] for r in conn.execute(statement.format(t=sql.SQL(table)), {"text": text})] for text in qs.texts
            ]
        known = [KnownItem(-1, text, relevant) for text, relevant in zip(qs.texts, qs.relevant, strict=True)]
        figures = {name: mrr_recall(ranked, known) for name, ranked in lists[id(qs)].items()}
        best = max(("vector", "OR", "AND before OR"), key=lambda name: figures[name][0])
        low, high = paired_difference_interval(lists[id(qs)]["new"], lists[id(qs)][best], known)
        hybrid_rows.append(
            [
                qs.corpus,
                qs.kind,
                *(f"{figures[n][0]:.3f} / {figures[n][1]:.3f}" for n in HYBRID_COLUMNS),
                f"{figures['new'][0] - figures[best][0]:+.3f} ({low:+.3f} to {high:+.3f})",
            ]  # fmt: skip
        )
        for when, t in (
            ("before: default", pgsim.quality.relevance.DEFAULT_MIN_SCORE),
            ("after: calibrated", thresholds[qs.corpus]),
        ):
            p, r, present, absent = _cut_figures(scores[id(qs)], t)
            relevance_rows.append([qs.corpus, qs.kind, f"{when} {t:.3f}", p, r, present, absent])
        _check_default_cut(conn, qs, thresholds[qs.corpus])
    for corpus in CALIBRATED_TABLES:
        print(f"calibrate_relevance({corpus}): {seconds[corpus]:.1f}s, min_score {thresholds[corpus]:.3f}", flush=True)
    # the other sections measure the uncalibrated searches, in this run's order or the next run's
    conn.execute(
        "DELETE FROM pgsim.calibration WHERE table_oid = ANY(%s::regclass[])", [list(CALIBRATED_TABLES.values())]
    )
    return relevance_rows, hybrid_rows


HYBRID_COLUMNS = ("vector", "OR", "AND before OR", "old", "new")
BOOTSTRAP_ROUNDS = 2000


def paired_difference_interval(
    ours: list[list[int]], theirs: list[list[int]], known: list[KnownItem], k: int = K
) -> tuple[float, float]:
    """A 95 % interval of MRR@k(ours) - MRR@k(theirs) on the same queries (paired bootstrap over queries):
    whether a difference of a few thousandths is one at all."""
    difference = np.array(
        [
            reciprocal_rank(a, item.relevant, k) - reciprocal_rank(b, item.relevant, k)
            for a, b, item in zip(ours, theirs, known, strict=True)
        ]
    )
    rng = np.random.default_rng(23)
    means = difference[rng.integers(0, len(difference), (BOOTSTRAP_ROUNDS, len(difference)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _searches(conn: psycopg.Connection[Any], qs: QuerySet, how: str) -> list[list[int]]:
    table = CALIBRATED_TABLES[qs.corpus]

    def vector(v: Any) -> list[int]:
        return hit_ids(pgsim.search(conn, table, "embedding", v, k=K, columns=["id"]))

    def hybrid(text: str) -> list[int]:
        return hit_ids(pgsim.hybrid_search(conn, table, "embedding", text, k=K, text_column="tsv", columns=["id"]))

    if how == "vector":
        return timed_calls(f"pgsim.search, {qs.corpus} {qs.kind}", list(qs.vectors), vector)[0]
    return timed_calls(f"pgsim.hybrid_search, {qs.corpus} {qs.kind}", qs.texts, hybrid)[0]


def _relevance_scores(conn: psycopg.Connection[Any], qs: QuerySet) -> dict[str, np.ndarray[Any, Any]]:
    """Per query, with its answer present and held out (kept out by ``where``): the best score of
    pgsim.relevant_search's top 10 (min_score 0), and the best among its relevant rows (-inf when none)."""
    table = CALIBRATED_TABLES[qs.corpus]
    out: dict[str, list[float]] = defaultdict(list)
    for state in ("present", "held out"):
        for vector, relevant in zip(qs.vectors, qs.relevant, strict=True):
            where = sql.SQL("NOT (id = ANY({}))").format(sql.Literal(sorted(relevant))) if state == "held out" else None
            hits = pgsim.relevant_search(
                conn, table, "embedding", vector, k=K, min_score=0, where=where, columns=["id"]
            )
            scores = np.array([hit.score for hit in hits])
            flags = np.array([int(hit.row["id"]) in relevant for hit in hits], dtype=bool)
            out[f"{state} best"].append(float(scores.max()) if len(scores) else -np.inf)
            out[f"{state} good"].append(float(scores[flags].max()) if flags.any() else -np.inf)
    return {key: np.array(values) for key, values in out.items()}


def _cut_figures(scores: dict[str, np.ndarray[Any, Any]], t: float) -> tuple[float, float, str, str]:
    """Precision and recall at threshold t, means over SPLITS random halves held out (as in section 2), and
    how often a query returns anything when its answer is present and when it is held out."""
    count = len(scores["present best"])
    figures = []
    for split in range(SPLITS):
        held = np.zeros(count, dtype=bool)
        held[random.Random(2000 + split).sample(range(count), count // 2)] = True
        best = np.where(held, scores["held out best"], scores["present best"])
        good = np.where(held, scores["held out good"], scores["present good"])
        figures.append(threshold_prf(best, good, ~held, t)[:2])
    p, r = np.mean(figures, axis=0)
    present = f"{np.mean(scores['present best'] >= t):.0%} ({np.mean(scores['present good'] >= t):.0%} right)"
    return float(p), float(r), present, f"{np.mean(scores['held out best'] >= t):.0%}"


def _check_default_cut(conn: psycopg.Connection[Any], qs: QuerySet, t: float) -> None:
    """pgsim.relevant_search with min_score left out cuts at the table's calibrated threshold."""
    for vector in qs.vectors[:20]:
        table = CALIBRATED_TABLES[qs.corpus]
        everything = pgsim.relevant_search(conn, table, "embedding", vector, k=K, min_score=0, columns=["id"])
        default = pgsim.relevant_search(conn, table, "embedding", vector, k=K, columns=["id"])
        assert hit_ids(default) == [i for i, hit in zip(hit_ids(everything), everything, strict=True) if hit.score >= t]


# --- main ----------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> Data:
    corpus = debian_packages()
    docs_at = [i for i, p in enumerate(corpus) if p.description.strip()]
    if args.docs:  # a fixed-seed sample, in corpus order; only its descriptions are encoded
        docs_at = sorted(random.Random(31).sample(docs_at, min(args.docs, len(docs_at))))
        docs = [corpus[i] for i in docs_at]
        vectors = unit(embeddings([p.description for p in docs]))
    else:
        docs = [corpus[i] for i in docs_at]
        vectors = unit(embeddings([p.description for p in corpus])[docs_at])
    twins = twin_groups(docs)
    items = known_items(docs, twins, args.queries, seed=7)
    relevance_items = known_items(docs, twins, args.relevance_queries, seed=29)
    rng = random.Random(23)
    others = sorted(set(range(len(docs))) - {q.doc for q in items} - {q.doc for q in relevance_items})
    sampled = rng.sample(others, min(len(others), args.bank + args.hub_queries))
    bank, probes = sorted(sampled[: args.bank]), sorted(sampled[args.bank :])
    wanted = [q.doc for q in items] + bank + probes + [q.doc for q in relevance_items]
    synopsis_vectors = unit(embeddings([docs[d].synopsis for d in wanted]))
    n_q, n_b = len(items), len(bank)
    return Data(
        docs=docs,
        vectors=vectors,
        twins=twins,
        items=items,
        query_vectors=synopsis_vectors[:n_q],
        bank=bank,
        bank_vectors=synopsis_vectors[n_q : n_q + n_b],
        probe_vectors=synopsis_vectors[n_q + n_b : n_q + n_b + len(probes)],
        relevance_items=relevance_items,
        relevance_vectors=synopsis_vectors[n_q + n_b + len(probes) :],
        args=args,
    )


SECTIONS = ("hybrid", "threshold", "diversity", "hubness", "duplicates", "labels", "calibrated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--queries", type=int, default=1000, help="known-item queries (fixed-seed sample)")
    parser.add_argument(
        "--relevance-queries", type=int, default=5000, help="known-item queries of the relevance threshold"
    )
    parser.add_argument("--bank", type=int, default=10000, help="query-bank synopses (QB-Norm, calibration)")
    parser.add_argument("--hub-queries", type=int, default=5000, help="probe synopses for hubness (N10)")
    parser.add_argument("--subset", type=int, default=5000, help="rows for the near-duplicate joins")
    parser.add_argument(
        "--docs", type=int, default=0, help="a fixed-seed sample of N documents (0: all; for a quick run)"
    )
    parser.add_argument(
        "--skip-full-duplicates", action="store_true", help="no pgsim.near_duplicates on the whole table"
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="these sections only (default: all)")
    args = parser.parse_args()
    started = time.perf_counter()

    data = prepare(args)
    conn = connect(args.dsn)
    pgsim.install(conn)  # pgvector and pgsim's schema: the product calls need its SQL functions and tables
    register(conn)
    load_table(conn, data.docs, data.vectors)
    stage = time.perf_counter()

    def timed(name: str, rows: list[Row]) -> list[Row]:
        nonlocal stage
        print(f"{name}: {time.perf_counter() - stage:.0f}s", file=sys.stderr, flush=True)
        stage = time.perf_counter()
        return rows

    sections = set(args.only or SECTIONS)
    rows: list[Row] = []
    found = collect(conn, data) if sections & {"hybrid", "diversity", "hubness"} else Candidates()
    doc_stats = bank_statistics(data) if sections & {"threshold", "hubness"} else {}
    timed("candidates and bank statistics", [])
    if "hybrid" in sections:
        rows += timed("1. hybrid", hybrid_search(conn, data, found))
    if "threshold" in sections:
        rows += timed("2. threshold", relevance_threshold(conn, data, doc_stats))
    if "diversity" in sections:
        rows += timed("3. diversity", diversity(conn, data, found))
    if "hubness" in sections:
        rows += timed("4. hubness", hubness(conn, data, found, doc_stats))
    if "duplicates" in sections:
        rows += timed("5. near-duplicates", near_duplicates(conn, data, args.subset))
        if not args.skip_full_duplicates:
            rows += timed("5. near-duplicates, whole table", near_duplicates_full(conn, data))
    if "labels" in sections:
        rows += timed("6. labels", zero_shot_labels(conn, data))
    calibration_tables: tuple[list[Row], list[Row]] = ([], [])
    if "calibrated" in sections:
        calibration_tables = timed("7. calibrated", calibrated(conn, data))  # type: ignore[arg-type]
    print(
        f"\n{len(data.docs)} rows (long descriptions), {len(data.items)} known-item queries (synopses), "
        f"bank {len(data.bank)}, hubness probe {len(data.probe_vectors)}; {time.perf_counter() - started:.0f}s"
    )
    if rows:
        print(format_table(COLUMNS, rows, max_width=110))
    relevance_rows, hybrid_rows = calibration_tables
    if relevance_rows:
        headers = ["corpus", "queries", "min_score", "P", "R", "returns: answer present", "answer held out"]
        print("\nrelevance cut, before and after calibration (pgsim.relevant_search, 10 hits, reference 50)")
        print(format_table(headers, relevance_rows, max_width=110))
        headers = ["corpus", "queries", "vector", "text OR", "text AND before OR", "hybrid before", "hybrid after",
                   "after - best list (95 % interval)"]  # fmt: skip
        print("\nhybrid search, MRR@10 / R@10, before and after calibration (pgsim.hybrid_search)")
        print(format_table(headers, hybrid_rows, max_width=110))


if __name__ == "__main__":
    main()
