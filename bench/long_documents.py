"""Long documents (issue 21): truncation against chunks, multi-vector re-ranking, MUVERA and hybrid, on man pages.

    python bench/long_documents.py [--dsn DSN] [--pages N] [--queries 300] [--chunks 128/16 254/32] [--fresh]
        [--held-out] [--skip muvera hybrid] [--temperatures T ...] [--more-candidates N ...]

Corpus: Debian's man pages (bench/manpages.py, sections 2, 3, 5 and 7), each page's text without its NAME
section; queries ``name`` (the NAME one-liner) and ``deep`` (a sentence from the page's second half), each
with and without a filter on the section of the page it came from; ``--held-out`` draws other queries of both
kinds instead (no page of the default sets, no text equal to a default query), to check what was chosen on
the default ones. One table per chunk setting, filled by pgsim.sync (the chunks and the page's own vector,
their mean), timed against encoder.encode on a random sample of the same chunk texts, and each page's
truncated vector written beside it (untimed); then, since another session shares the cores,
``--ingest-rounds`` rounds of sync of ``--ingest-pages`` pages into a fresh table and encoder.encode of
exactly its chunk texts, in alternating order.
Modes, same run, same data, k = 10:

- truncated: an exact scan of the page's single vector (its first 254 word pieces), in SQL;
- chunk mean: an exact scan of pgsim's own column of a chunked embedding (the mean of the page's chunk
  vectors, unit length), in SQL;
- pgsim: pgsim.knn.documents.search_documents, for each chunk setting (documents by the soft maximum of their
  chunk similarities since this bench chose it; by their best chunk before); the rest use the best setting;
- multi-vector re-rank: the best-chunk top ``--candidates`` documents (pgsim's top ``--candidates``, as a set)
  re-scored by an aggregate of all their
  chunk similarities (numpy, chunk vectors read from the chunk table); ``--temperatures`` adds log-mean-exp
  aggregates, ``--more-candidates`` re-ranks other candidate counts too (max and every log-mean-exp);
  "max" over them is best chunk; paired bootstrap intervals (queries resampled) of pgsim's and log-mean-exp's
  MRR@10 against best chunk and truncated;
- MUVERA: fixed-dimensional encodings of each page's chunk set, brute force in numpy for ``--candidates``
  documents, then exact best chunk over them;
- hybrid: reciprocal rank fusion (k = 60) of the best-chunk list and a full-text list (ts_rank over
  to_tsvector('english', body), every word first, then any), computed here; pgsim.hybrid_search on the
  chunked column (its vector list from the chunks since 8339e2f) is shown too.

``--skip muvera hybrid`` leaves out the MUVERA and the hybrid and full-text modes (``--ingest-rounds 0`` the
interleaved ingest) for a short quality-only run.

Latency: query vectors are encoded before timing, except for pgsim.hybrid_search, which takes text.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))

from long_documents_data import Ingest, Matrix, build, chunk_vectors, interleaved, sizes, table_name  # noqa: E402
from long_documents_scores import (  # noqa: E402
    AGGREGATES,
    MUVERAS,
    Aggregate,
    log_sum_exp,
    paired_bootstrap,
    percentile,
    recall,
    reciprocal_rank,
    rerank,
    rrf,
)
from manpages import Query, deep_queries, manpages, name_queries  # noqa: E402

import pgsim  # noqa: E402
from pgsim.cli.common import format_table  # noqa: E402
from pgsim.columns.chunking import Chunks  # noqa: E402
from pgsim.db.connection import connect  # noqa: E402
from pgsim.encoding.encoder import encoder_for  # noqa: E402
from pgsim.knn.documents import search_documents  # noqa: E402

K = 10
FULL_TEXT = (
    "SELECT id FROM {t}, (SELECT string_agg(quote_literal(lexeme), ' | ')::tsquery AS some, "
    "string_agg(quote_literal(lexeme), ' & ')::tsquery AS every FROM unnest(to_tsvector('english', %(text)s))) q "
    "WHERE tsv @@ q.some AND {cond} ORDER BY tsv @@ q.every DESC, CASE WHEN tsv @@ q.every "
    "THEN ts_rank(tsv, q.every, 1) ELSE ts_rank(tsv, q.some, 1) END DESC, id LIMIT %(limit)s"
)
Run = tuple[list[int], float]  # documents found, seconds
Key = tuple[str, bool]  # query kind, filtered


HELD_OUT_SEEDS = {"name": 241, "deep": 243}  # the default sets' are 141 and 143
LOG_MEAN_EXP = "log-mean-exp t=0.05"


class Bench:
    def __init__(self, conn: psycopg.Connection[Any], pages: list[Any], queries: dict[str, list[Query]]) -> None:
        self.conn, self.pages, self.queries = conn, pages, queries
        self.aggregates: dict[str, Aggregate] = dict(AGGREGATES)
        self.reranked: list[str] = []  # the re-rank modes, in the order run
        encoder = encoder_for(pgsim.DEFAULT_MODEL)
        self.vectors = {
            kind: unit(np.asarray(encoder.encode([q.text for q in qs], kind="query"), dtype=np.float32))
            for kind, qs in queries.items()
        }
        self.runs: dict[str, dict[Key, list[Run]]] = defaultdict(lambda: defaultdict(list))

    def each(self, mode: str, run: Callable[[Query, Matrix, str | None], list[int]]) -> None:
        """Run ``mode`` for every query, without and with its page's section as filter; record what it found."""
        for kind, queries in self.queries.items():
            for query, vector in zip(queries, self.vectors[kind], strict=True):
                for filtered in (False, True):
                    section = self.pages[query.doc].section if filtered else None
                    started = time.perf_counter()
                    found = run(query, vector, section)
                    self.runs[mode][(kind, filtered)].append((found, time.perf_counter() - started))
        print(f"  {mode}: done", file=sys.stderr, flush=True)

    def summary(self, mode: str) -> list[list[Any]]:
        rows = []
        for (kind, filtered), runs in self.runs[mode].items():
            queries = self.queries[kind]
            seconds = [s * 1000 for _, s in runs]
            matching = [
                sum(p.section == self.pages[q.doc].section or not filtered for p in self.pages) for q in queries
            ]
            distinct = [len(set(found)) for (found, _), n in zip(runs, matching, strict=True) if n >= K]
            rows.append([
                mode, kind, "section" if filtered else "none",
                statistics.mean(reciprocal_rank(f, q.relevant) for (f, _), q in zip(runs, queries, strict=True)),
                statistics.mean(recall(f, q.relevant) for (f, _), q in zip(runs, queries, strict=True)),
                f"{min(distinct)} ({sum(d == K for d in distinct) / len(distinct):.0%} = {K})",
                f"{percentile(seconds, 50):.1f}", f"{percentile(seconds, 95):.1f}",
            ])  # fmt: skip
        return rows

    def mrr(self, mode: str, kind: str | None = None, filtered: bool | None = None) -> float:
        values = [
            reciprocal_rank(found, query.relevant)
            for (k, f), runs in self.runs[mode].items()
            if (kind is None or k == kind) and (filtered is None or f == filtered)
            for (found, _), query in zip(runs, self.queries[k], strict=True)
        ]
        return statistics.mean(values)

    def per_query(self, mode: str, kind: str, filtered: bool) -> list[float]:
        runs = self.runs[mode][(kind, filtered)]
        return [reciprocal_rank(found, q.relevant) for (found, _), q in zip(runs, self.queries[kind], strict=True)]

    def recall(self, mode: str, kind: str, filtered: bool) -> float:
        runs = self.runs[mode][(kind, filtered)]
        return statistics.mean(
            recall(found, q.relevant) for (found, _), q in zip(runs, self.queries[kind], strict=True)
        )


def unit(matrix: Matrix) -> Matrix:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=-1, keepdims=True), 1e-12)


def where(section: str | None) -> sql.Composable | None:
    return None if section is None else sql.SQL("section = {}").format(sql.Literal(section))


def documents(conn: psycopg.Connection[Any], table: str, vector: Matrix, section: str | None, k: int) -> list[int]:
    return [hit.row["id"] for hit in search_documents(conn, table, "embedding", vector, k=k, where=where(section))]


def single_vector(
    conn: psycopg.Connection[Any], table: str, column: str, vector: Matrix, section: str | None
) -> list[int]:
    """The K pages nearest by their single vector in ``column``, by an exact scan."""
    statement = sql.SQL("SELECT id FROM {} WHERE {} ORDER BY ({} <=> %s) + 0, id LIMIT %s").format(
        sql.Identifier(*table.split(".")), where(section) or sql.SQL("true"), sql.Identifier(column)
    )
    return [row[0] for row in conn.execute(statement, [vector, K]).fetchall()]


def full_text(conn: psycopg.Connection[Any], table: str, text: str, section: str | None, limit: int) -> list[int]:
    statement = sql.SQL(FULL_TEXT).format(t=sql.Identifier(*table.split(".")), cond=where(section) or sql.SQL("true"))
    return [row[0] for row in conn.execute(statement, {"text": text, "limit": limit}).fetchall()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--pages", type=int, default=0, help="a fixed-seed sample of N pages (0: all)")
    parser.add_argument("--queries", type=int, default=300, help="queries of each kind")
    parser.add_argument("--chunks", nargs="+", default=["128/16", "254/32"], help="chunk settings, tokens/overlap")
    parser.add_argument("--candidates", type=int, default=100, help="documents the re-rankers re-score")
    parser.add_argument("--encoder-sample", type=int, default=1200, help="chunk texts timed with encoder.encode")
    parser.add_argument("--ingest-pages", type=int, default=80, help="pages of the interleaved ingest rounds")
    parser.add_argument("--ingest-rounds", type=int, default=3, help="interleaved ingest rounds per chunk setting")
    parser.add_argument("--fresh", action="store_true", help="rebuild the tables even if they exist")
    parser.add_argument(
        "--held-out",
        action="store_true",
        help="held-out queries: NAME lines of pages outside the default NAME sample (seed 241), sentences of pages "
        "outside the default deep sample (seed 243), none equal to a default query",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["muvera", "hybrid"], help="modes to leave out")
    parser.add_argument("--temperatures", nargs="*", type=float, default=[], help="more log-mean-exp temperatures")
    parser.add_argument(
        "--more-candidates",
        nargs="*",
        type=int,
        default=[],
        help="more candidate counts to re-rank (max, log-mean-exp)",
    )
    args = parser.parse_args()
    started = time.perf_counter()

    pages = manpages()
    if args.pages:
        pages = [pages[i] for i in sorted(random.Random(3).sample(range(len(pages)), args.pages))]
    queries = {
        "name": name_queries(pages, args.queries, seed=141),
        "deep": deep_queries(pages, args.queries, seed=143),
    }
    if args.held_out:
        defaults = queries
        queries = {
            "name": name_queries(pages, args.queries, seed=HELD_OUT_SEEDS["name"], exclude=defaults["name"]),
            "deep": deep_queries(pages, args.queries, seed=HELD_OUT_SEEDS["deep"], exclude=defaults["deep"]),
        }
        for kind, qs in queries.items():
            assert not {q.text for q in qs} & {q.text for q in defaults[kind]}, kind
            assert not {q.doc for q in qs} & {q.doc for q in defaults[kind]}, kind
    conn = connect(args.dsn)
    pgsim.install(conn)
    pgsim.register(conn)
    settings = [Chunks(*(int(part) for part in text.split("/"))) for text in args.chunks]
    ingests = {c: build(conn, pages, c, sample=args.encoder_sample, fresh=args.fresh) for c in settings}
    tables = {c: table_name(c, len(pages)) for c in settings}
    sample = [pages[i] for i in sorted(random.Random(5).sample(range(len(pages)), min(args.ingest_pages, len(pages))))]
    rounds = {c: interleaved(conn, sample, c, args.ingest_rounds) for c in settings if args.ingest_rounds}
    bench = Bench(conn, pages, queries)
    for t in args.temperatures:
        bench.aggregates.setdefault(f"log-mean-exp t={t:g}", log_sum_exp(t, mean=True))
    print(f"{len(pages)} pages, queries {[len(q) for q in queries.values()]}; searching ...", file=sys.stderr)

    first = tables[settings[0]]

    def truncated(q: Query, v: Matrix, s: str | None) -> list[int]:
        return single_vector(conn, first, "first_window", v, s)

    bench.each("truncated", truncated)
    bench.each("chunk mean (pgsim's column)", lambda q, v, s: single_vector(conn, first, "embedding", v, s))
    for c, table in tables.items():
        bench.each(f"pgsim {c.tokens}/{c.overlap}", lambda q, v, s, t=table: documents(conn, t, v, s, K))
    best = max(settings, key=lambda c: bench.mrr(f"pgsim {c.tokens}/{c.overlap}"))
    table = tables[best]
    chunks = chunk_vectors(conn, table)

    def rerank_top(n: int, names: list[str], prefix: str) -> dict[tuple[int, bool], tuple[list[int], float]]:
        """The best-chunk top ``n`` of every query, re-ranked by each aggregate of ``names`` (modes ``prefix`` name)."""
        pool: dict[tuple[int, bool], tuple[list[int], float]] = {}

        def candidates_of(query: Query, vector: Matrix, section: str | None) -> list[int]:
            found = documents(conn, table, vector, section, n)
            pool[(id(query), section is not None)] = (found, 0.0)
            return found

        bench.each(f"best-chunk candidates ({n})", candidates_of)
        seconds = {
            (id(q), f): s
            for (kind, f), runs in bench.runs[f"best-chunk candidates ({n})"].items()
            for q, (_, s) in zip(queries[kind], runs, strict=True)
        }
        for name in names:
            aggregate = bench.aggregates[name]
            bench.each(
                f"{prefix}{name}", lambda q, v, s, a=aggregate: rerank(v, pool[(id(q), s is not None)][0], chunks, a, K)
            )
            add_seconds(bench, f"{prefix}{name}", seconds)
            bench.reranked.append(f"{prefix}{name}")
        return pool

    candidates = rerank_top(args.candidates, list(bench.aggregates), "re-rank: ")
    cand_seconds = {
        (id(q), f): s
        for (kind, f), runs in bench.runs[f"best-chunk candidates ({args.candidates})"].items()
        for q, (_, s) in zip(queries[kind], runs, strict=True)
    }
    log_mean_exps = [name for name in bench.aggregates if name.startswith("log-mean-exp")]
    for n in args.more_candidates:
        if n != args.candidates:
            rerank_top(n, ["max (= best chunk)", *log_mean_exps], f"re-rank top {n}: ")

    ids = sorted(chunks)
    sections = np.asarray([pages[i].section for i in ids])
    stacked = np.concatenate([chunks[i] for i in ids])
    owner = np.concatenate([np.full(len(chunks[i]), n) for n, i in enumerate(ids)])

    def exact(q: Query, v: Matrix, s: str | None) -> list[int]:
        best_sim = np.full(len(ids), -np.inf, dtype=np.float32)
        np.maximum.at(best_sim, owner, stacked @ v)
        if s is not None:
            best_sim[sections != s] = -np.inf
        return [ids[i] for i in np.argsort(-best_sim, kind="stable")[:K] if np.isfinite(best_sim[i])]

    bench.each("best chunk, exact (numpy)", exact)
    muvera_rows = []
    for muvera in () if "muvera" in args.skip else MUVERAS:
        built = time.perf_counter()
        fdes = muvera.documents(chunks, ids)
        build_seconds = time.perf_counter() - built
        pool: dict[tuple[int, bool], list[int]] = {}

        def fde_search(
            q: Query, v: Matrix, s: str | None, m: Any = muvera, f: Matrix = fdes, pool: Any = pool
        ) -> list[int]:
            scores = f @ m.query(v)
            if s is not None:
                scores[sections != s] = -np.inf
            top = np.argpartition(-scores, min(args.candidates, len(ids) - 1))[: args.candidates]
            found = [ids[i] for i in top if np.isfinite(scores[i])]
            pool[(id(q), s is not None)] = found
            return rerank(v, found, chunks, AGGREGATES["max (= best chunk)"], K)

        mode = f"MUVERA {muvera.label()}"
        bench.each(mode, fde_search)
        for kind, qs in queries.items():
            exact_runs = bench.runs["best chunk, exact (numpy)"][(kind, False)]
            truth = {id(q): found for q, (found, _) in zip(qs, exact_runs, strict=True)}
            cand_recall = statistics.mean(recall(pool[(id(q), False)], q.relevant, args.candidates) for q in qs)
            coverage = statistics.mean(len(set(truth[id(q)]) & set(pool[(id(q), False)])) / K for q in qs)
            muvera_rows.append([muvera.label(), kind, f"{build_seconds:.1f}", cand_recall, coverage,
                                bench.mrr(mode, kind, False), bench.mrr(mode, kind, True)])  # fmt: skip

    def hybrid(q: Query, v: Matrix, s: str | None) -> list[int]:
        vector_list = candidates[(id(q), s is not None)][0][:50]
        return rrf([vector_list, full_text(conn, table, q.text, s, 50)], K)

    if "hybrid" not in args.skip:
        bench.each("hybrid: best chunk + full text (RRF)", hybrid)
        add_seconds(bench, "hybrid: best chunk + full text (RRF)", cand_seconds)
        bench.each("full text alone", lambda q, v, s: full_text(conn, table, q.text, s, K))
        bench.each("pgsim.hybrid_search (chunked column)", lambda q, v, s: [h.row["id"] for h in pgsim.hybrid_search(
            conn, table, "embedding", q.text, k=K, where=None if s is None else {"section": s})])  # fmt: skip
    report(bench, args, pages, settings, best, ingests, rounds, tables, muvera_rows, time.perf_counter() - started)


def add_seconds(bench: Bench, mode: str, extra: dict[tuple[int, bool], float]) -> None:
    """Add the candidate search's time to a re-ranking mode's (its numpy time alone was measured)."""
    for (kind, filtered), runs in bench.runs[mode].items():
        bench.runs[mode][(kind, filtered)] = [
            (found, seconds + extra[(id(q), filtered)])
            for q, (found, seconds) in zip(bench.queries[kind], runs, strict=True)
        ]


def report(
    bench: Bench,
    args: argparse.Namespace,
    pages: list[Any],
    settings: list[Chunks],
    best: Chunks,
    ingests: dict[Chunks, Ingest],
    rounds: dict[Chunks, list[list[float]]],
    tables: dict[Chunks, str],
    muvera_rows: list[list[Any]],
    seconds: float,
) -> None:
    conn = bench.conn
    held_out = f" (held out, seeds {HELD_OUT_SEEDS['name']}/{HELD_OUT_SEEDS['deep']})" if args.held_out else ""
    print(f"\n{len(pages)} pages, {', '.join(f'{len(q)} {k}' for k, q in bench.queries.items())} queries{held_out}, "
          f"k = {K}; best chunk setting {best.tokens}/{best.overlap}; {seconds:.0f}s")  # fmt: skip
    headers = ["mode", "query", "filter", "MRR@10", "R@10", "distinct: min (=k)", "p50 ms", "p95 ms"]
    aggregates = {name: bench.mrr(f"re-rank: {name}") for name in bench.aggregates}
    # held out: the aggregate chosen on the default queries, not the best on these
    winner = LOG_MEAN_EXP if args.held_out else max(aggregates, key=lambda name: aggregates[name])
    muveras = [m for m in MUVERAS if f"MUVERA {m.label()}" in bench.runs]
    muvera_best = max(muveras, key=lambda m: bench.mrr(f"MUVERA {m.label()}")) if muveras else None
    main_modes = [
        "truncated",
        "chunk mean (pgsim's column)",
        *(f"pgsim {c.tokens}/{c.overlap}" for c in settings),
        f"re-rank: {winner}",
        *([f"MUVERA {muvera_best.label()}"] if muvera_best else []),
        "hybrid: best chunk + full text (RRF)",
        "full text alone",
        "pgsim.hybrid_search (chunked column)",
        "best chunk, exact (numpy)",
    ]
    main_modes = [mode for mode in main_modes if mode in bench.runs]
    rows = [row for mode in main_modes for row in sorted(bench.summary(mode), key=lambda r: (r[1] != "name", r[2]))]
    print(format_table(headers, rows, max_width=60))
    print(f"\nmulti-vector re-rank of the best-chunk top {args.candidates} ({best.tokens}/{best.overlap}), MRR@10")
    rows = [[name, *(bench.mrr(f"re-rank: {name}", kind, f) for kind in bench.queries for f in (False, True))]
            for name in bench.aggregates]  # fmt: skip
    print(format_table(["aggregate", "name", "name, section", "deep", "deep, section"], rows))
    keys = [(kind, f) for kind in bench.queries for f in (False, True)]
    reference = "re-rank: max (= best chunk)"
    ours_now = f"pgsim {best.tokens}/{best.overlap}"
    print(f"\nMRR@10 / R@10 of truncated, best chunk and every re-rank{held_out}")
    rows = [[mode.removeprefix("re-rank: "), *(f"{bench.mrr(mode, k, f):.4f} / {bench.recall(mode, k, f):.4f}"
                                               for k, f in keys)]
            for mode in ["truncated", ours_now, *bench.reranked]]  # fmt: skip
    print(format_table(["mode", "name", "name, section", "deep", "deep, section"], rows))
    print("\npaired bootstrap over queries (2,000 draws, seed 23): MRR@10 difference [95 % interval]")
    pairs = [(ours_now, "truncated"), (ours_now, reference), (f"re-rank: {LOG_MEAN_EXP}", "truncated")]
    pairs += [(mode, reference) for mode in bench.reranked if "log-mean-exp" in mode]
    rows = []
    for ours, theirs in pairs:
        if ours not in bench.runs:
            continue
        cells = []
        for k, f in keys:
            mean, low, high = paired_bootstrap(bench.per_query(ours, k, f), bench.per_query(theirs, k, f))
            cells.append(f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]")
        rows.append([f"{ours.removeprefix('re-rank: ')} - {theirs}", *cells])
    print(format_table(["difference", "name", "name, section", "deep", "deep, section"], rows))
    if muvera_rows:
        print(f"\nMUVERA candidates ({args.candidates} by FDE dot product, numpy) then exact best chunk")
        print(format_table(["FDE", "query", "build s", f"R@{args.candidates}", "exact top-10 covered",
                            "MRR@10", "MRR@10, section"], muvera_rows))  # fmt: skip
    print("\nstorage (bytes; totals include TOAST and indexes)")
    rows = [[f"{c.tokens}/{c.overlap}", name, size] for c in settings for name, size in sizes(conn, tables[c]).items()]
    print(format_table(["chunks", "relation", "bytes"], rows))
    print("\ningest: pgsim.sync (chunks and their mean) against encoder.encode on a sample of the chunk texts")
    rows = []
    for c in settings:
        ingest = ingests[c]
        per_page = ingest.chunks / len(pages)
        sync_rate = len(pages) / ingest.sync_seconds
        chunk_docs = ingest.chunk_rate / per_page
        rows.append([f"{c.tokens}/{c.overlap}", ingest.chunks, f"{per_page:.1f}", f"{ingest.sync_seconds:.0f}",
                     f"{ingest.sync_encode_seconds / ingest.sync_seconds:.0%}", f"{sync_rate:.2f}",
                     f"{ingest.chunk_rate:.1f}", f"{chunk_docs:.2f}", f"{sync_rate / chunk_docs:.2f}x"])  # fmt: skip
    print(format_table(["chunks", "chunks", "per page", "sync s", "encoding", "sync pages/s", "encoder chunks/s",
                        "= pages/s", "sync vs that"], rows))  # fmt: skip
    print(f"(encoder rate on a fixed-seed sample of {ingests[settings[0]].sample} chunk texts)")
    if not rounds:
        return
    print(f"\ningest, interleaved: {args.ingest_rounds} rounds of pgsim.sync of {args.ingest_pages} pages into a "
          "fresh table and encoder.encode of exactly its chunk texts, in alternating order")  # fmt: skip
    rows = []
    for c in rounds:
        ratios = [chunk_s / sync_s for sync_s, chunk_s in rounds[c]]
        for n, (sync_s, chunk_s) in enumerate(rounds[c], 1):
            rows.append([f"{c.tokens}/{c.overlap}", n, f"{args.ingest_pages / sync_s:.2f}",
                         f"{args.ingest_pages / chunk_s:.2f}", f"{chunk_s / sync_s:.2f}x"])  # fmt: skip
        rows.append([f"{c.tokens}/{c.overlap}", "median", "", "", f"{statistics.median(ratios):.2f}x"])
    print(format_table(["chunks", "round", "sync pages/s", "encoder chunks: pages/s", "sync vs that"], rows))


if __name__ == "__main__":
    main()
