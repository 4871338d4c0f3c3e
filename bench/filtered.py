"""Filtered k-NN on the Debian corpus: exact scan vs plain pgvector vs pgvector iterative scan vs pgsim.

    python bench/filtered.py [--dsn DSN] [--queries 200] [-k 10]

All ~63k packages but the query set go into one table with an HNSW index (cosine, m=16,
ef_construction=64); the queries are the synopses of held-out packages, so no query text is in the
table. Every mode answers the same queries with the same filters in the same run; recall@k is measured
against the exact scan. Embeddings are cached in bench/.cache/ (see corpus_cache.py).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_cache import debian_packages, embeddings  # noqa: E402

from pgsim.cli.common import format_table  # noqa: E402
from pgsim.db.connection import connect  # noqa: E402
from pgsim.db.schema import install  # noqa: E402
from pgsim.demo.corpus import Package  # noqa: E402
from pgsim.knn.advice import advise, create  # noqa: E402
from pgsim.knn.filtered import search
from pgsim.knn.statements import Between
from pgsim.psycopg import register  # noqa: E402

TABLE = "bench_filtered.packages"
TABLE_ID = sql.Identifier("bench_filtered", "packages")
HALF_TABLE = "bench_filtered.packages_half"


@dataclass(frozen=True)
class Filter:
    name: str
    clause: str  # a WHERE clause over constants chosen from the data, as a user writes it by hand
    where: dict[str, Any]  # the same filter for pgsim.search
    keep: Callable[[Package], bool]


def choose_filters(packages: list[Package]) -> list[Filter]:
    sections = Counter(p.section for p in packages)
    total = len(packages)
    common = max(sections, key=lambda s: sections[s])
    rare = max((s for s, n in sections.items() if n < 0.005 * total and n >= 30), key=lambda s: sections[s])
    size_low, size_high = 100, 200
    both_section, both_priority = "admin", "important"
    return [
        Filter("none", "TRUE", {}, lambda p: True),
        Filter(
            f"common: section='{common}' ({sections[common] / total:.1%})",
            f"section = '{common}'",
            {"section": common},
            lambda p: p.section == common,
        ),
        Filter(
            f"rare: section='{rare}' ({sections[rare] / total:.2%})",
            f"section = '{rare}'",
            {"section": rare},
            lambda p: p.section == rare,
        ),
        Filter(
            f"range: {size_low} <= installed_size < {size_high}",
            f"installed_size >= {size_low} AND installed_size < {size_high}",
            {"installed_size": Between(size_low, size_high)},
            lambda p: size_low <= p.installed_size < size_high,
        ),
        Filter(
            f"section='{both_section}' AND priority='{both_priority}'",
            f"section = '{both_section}' AND priority = '{both_priority}'",
            {"section": both_section, "priority": both_priority},
            lambda p: p.section == both_section and p.priority == both_priority,
        ),
    ]


def load_table(conn: psycopg.Connection[Any], packages: list[Package], vectors: np.ndarray[Any, Any]) -> None:
    have = conn.execute("SELECT to_regclass(%s)", [TABLE]).fetchone()
    count = sql.SQL("SELECT count(*) FROM {}").format(TABLE_ID)
    if have != (None,) and conn.execute(count).fetchone() == (len(packages),):
        print(f"{TABLE}: reusing {len(packages)} rows", flush=True)
        return
    conn.execute("DROP SCHEMA IF EXISTS bench_filtered CASCADE")
    conn.execute("CREATE SCHEMA bench_filtered")
    conn.execute(
        "CREATE TABLE bench_filtered.packages (package text PRIMARY KEY, section text, priority text, "
        "installed_size int, embedding vector(384))"
    )
    started = time.perf_counter()
    with conn.cursor() as cur, cur.copy("COPY bench_filtered.packages FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["text", "text", "text", "int4", "vector"])
        for package, vector in zip(packages, vectors, strict=True):
            copy.write_row((package.package, package.section, package.priority, package.installed_size, vector))
    print(f"{TABLE}: {len(packages)} rows copied in {time.perf_counter() - started:.1f}s", flush=True)
    started = time.perf_counter()
    with conn.transaction():
        conn.execute("SET LOCAL maintenance_work_mem = '1GB'")
        conn.execute("SET LOCAL max_parallel_maintenance_workers = 2")
        conn.execute("CREATE INDEX ON bench_filtered.packages USING hnsw (embedding vector_cosine_ops)")
    conn.execute("CREATE INDEX ON bench_filtered.packages (section)")
    conn.execute("ANALYZE bench_filtered.packages")
    print(f"HNSW index built in {time.perf_counter() - started:.1f}s", flush=True)
    conn.execute(
        "CREATE TABLE bench_filtered.packages_half AS SELECT package, section, priority, installed_size, "
        "embedding::halfvec(384) AS embedding FROM bench_filtered.packages"
    )
    conn.execute("ALTER TABLE bench_filtered.packages_half ADD PRIMARY KEY (package)")
    with conn.transaction():
        conn.execute("SET LOCAL maintenance_work_mem = '1GB'")
        conn.execute("SET LOCAL max_parallel_maintenance_workers = 2")
        conn.execute("CREATE INDEX ON bench_filtered.packages_half USING hnsw (embedding halfvec_cosine_ops)")
    conn.execute("CREATE INDEX ON bench_filtered.packages_half (section)")
    conn.execute("ANALYZE bench_filtered.packages_half")


HNSW_SIZE = """
SELECT pg_size_pretty(pg_table_size(%s::regclass)),
       (SELECT pg_size_pretty(pg_relation_size(i.indexrelid))
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
        WHERE i.indrelid = %s::regclass AND am.amname = 'hnsw' AND i.indpred IS NULL)
"""


def storage_sizes(conn: psycopg.Connection[Any]) -> list[list[str]]:
    rows = []
    for table in ("bench_filtered.packages", "bench_filtered.packages_half"):
        heap, hnsw = conn.execute(
            HNSW_SIZE,
            [table, table],
        ).fetchone()  # type: ignore[misc]
        rows.append([table, heap, hnsw])
    return rows


def sql_mode(settings: list[str], resort: bool) -> Callable[[psycopg.Connection[Any], Any, Filter, int], list[str]]:
    """A hand-written query under the given SET LOCALs; ``resort`` wraps it as pgvector's docs advise for
    relaxed order."""

    def run(conn: psycopg.Connection[Any], vector: Any, flt: Filter, k: int) -> list[str]:
        inner = sql.SQL(
            "SELECT package, embedding <=> %(q)s AS d FROM {} WHERE {} ORDER BY embedding <=> %(q)s LIMIT %(k)s"
        ).format(TABLE_ID, sql.SQL(flt.clause))  # type: ignore[arg-type]  # the bench's own constants
        query = (
            sql.SQL("WITH r AS MATERIALIZED ({}) SELECT package FROM r ORDER BY d").format(inner) if resort else inner
        )
        with conn.transaction() as tx:
            for setting in settings:
                conn.execute(setting)
            rows = conn.execute(query, {"q": vector, "k": k}).fetchall()
            raise psycopg.Rollback(tx)
        return [row[0] for row in rows]

    return run


def pgsim_half_mode(conn: psycopg.Connection[Any], vector: Any, flt: Filter, k: int) -> list[str]:
    hits = search(conn, HALF_TABLE, "embedding", vector, k=k, where=flt.where, columns=["package"])
    return [hit.row["package"] for hit in hits]


def pgsim_mode(conn: psycopg.Connection[Any], vector: Any, flt: Filter, k: int) -> list[str]:
    hits = search(conn, TABLE, "embedding", vector, k=k, where=flt.where, columns=["package"])
    return [hit.row["package"] for hit in hits]


MODES: dict[str, Callable[[psycopg.Connection[Any], Any, Filter, int], list[str]]] = {
    "exact scan": sql_mode(["SET LOCAL enable_indexscan = off"], resort=False),
    "pgvector defaults (ef_search 40)": sql_mode([], resort=False),
    # what pgvector's README suggests: relaxed order, default ef_search, re-sorted in a materialized CTE
    "pgvector iterative (relaxed, re-sorted)": sql_mode(["SET LOCAL hnsw.iterative_scan = relaxed_order"], resort=True),
    "pgsim.search": pgsim_mode,
    "pgsim.search, halfvec": pgsim_half_mode,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()

    corpus = debian_packages()
    vectors = embeddings([p.text for p in corpus])
    held_out = set(random.Random(5).sample(range(len(corpus)), args.queries))
    packages = [p for i, p in enumerate(corpus) if i not in held_out]
    table_vectors = vectors[[i for i in range(len(corpus)) if i not in held_out]]
    query_texts = [corpus[i].synopsis for i in sorted(held_out)]
    query_vectors = embeddings(query_texts)

    conn = connect(args.dsn)
    conn.prepare_threshold = None  # no mode may run on a plan that another mode's settings produced
    install(conn)
    register(conn)
    load_table(conn, packages, table_vectors)
    filters = choose_filters(packages)
    position_of = {p.package: i for i, p in enumerate(packages)}

    from tqdm import tqdm

    def measure(modes: dict[str, Callable[..., list[str]]], flt: Filter, truth: list[list[str]]) -> list[list[Any]]:
        """Every mode on every query, interleaved query by query (exact scan first, for the truth), so that
        drift in the machine's speed falls on all modes alike. QPS is also given as a ratio to the exact
        scan's, measured beside it."""
        latencies: dict[str, list[float]] = {mode: [] for mode in modes}
        recalls: dict[str, list[float]] = {mode: [] for mode in modes}
        returned: dict[str, list[int]] = {mode: [] for mode in modes}
        for position, vector in enumerate(query_vectors):
            for mode, run in modes.items():
                started = time.perf_counter()
                found = run(conn, vector, flt, args.k)
                latencies[mode].append(time.perf_counter() - started)
                if len(truth) <= position:
                    truth.append(found)
                # recall within ties: a row as near as the exact k-th row counts (Debian repeats descriptions)
                exact = truth[position]
                kth = float(1 - table_vectors[position_of[exact[-1]]] @ vector) if exact else 0.0
                near = sum(1 for name in found if 1 - table_vectors[position_of[name]] @ vector <= kth + 1e-5)
                recalls[mode].append(near / max(1, len(exact)))
                returned[mode].append(len(found))
                progress.update()
        matching = sum(1 for p in packages if flt.keep(p))
        qps = {mode: len(times) / sum(times) for mode, times in latencies.items()}
        return [
            [
                flt.name,
                matching,
                mode,
                f"{statistics.mean(recalls[mode]):.3f}",
                f"{statistics.mean(returned[mode]):.2f}",
                f"{min(returned[mode])}",
                f"{qps[mode]:.0f}",
                f"{qps[mode] / qps['exact scan']:.2f}x",
                f"{np.percentile(latencies[mode], 95) * 1000:.1f}",
            ]
            for mode in modes
        ]

    progress = tqdm(total=len(filters) * (len(MODES) + 6) * len(query_vectors), desc="queries", file=sys.stderr)
    results: dict[str, list[list[Any]]] = {}
    truths: dict[str, list[list[str]]] = {flt.name: [] for flt in filters}
    for flt in filters:
        results[flt.name] = measure(MODES, flt, truths[flt.name])
    advised = advise(conn, TABLE, "embedding", [f.where for f in filters], min_share=0.1)
    for item in advised:
        create(conn, item)
    beside_advice = {"exact scan": MODES["exact scan"], "pgsim.search + index-advise": pgsim_mode}
    for flt in filters:
        results[flt.name] += measure(beside_advice, flt, truths[flt.name])[1:]
    alone_rows = []
    for flt in filters:
        # each mode on its own, second of two rounds: what a workload of only these searches sees, with the
        # index in the CPU caches (interleaving lets the exact scans evict the graph between searches)
        rates = {}
        for mode, run in beside_advice.items():
            for _ in range(2):
                started = time.perf_counter()
                for vector in query_vectors:
                    run(conn, vector, flt, args.k)
                    progress.update()
                rates[mode] = len(query_vectors) / (time.perf_counter() - started)
        exact_rate, advised_rate = rates["exact scan"], rates["pgsim.search + index-advise"]
        alone_rows.append([flt.name, f"{exact_rate:.0f}", f"{advised_rate:.0f}", f"{advised_rate / exact_rate:.2f}x"])
    progress.close()
    print(
        f"\n{len(packages)} rows, {len(query_vectors)} held-out queries, k={args.k}; recall counts ties with the k-th"
    )
    headers = ["filter", "matching", "mode", f"recall@{args.k}", "mean rows", "min rows", "QPS", "vs exact", "p95 ms"]
    print(format_table(headers, [row for flt in filters for row in results[flt.name]], max_width=48))
    print("\neach mode alone, warm (second of two rounds), with the advised indexes in place:")
    print(format_table(["filter", "exact scan QPS", "pgsim.search QPS", "vs exact"], alone_rows, max_width=48))
    print(
        "\nindex-advise built: "
        + (", ".join(f"{a.index_name} ({a.column} = {a.value!r})" for a in advised) or "nothing")
    )
    print("\nstorage:")
    print(format_table(["table", "table size", "HNSW index size"], storage_sizes(conn)))
    for item in advised:
        conn.execute(sql.SQL("DROP INDEX bench_filtered.{}").format(sql.Identifier(item.index_name)))


if __name__ == "__main__":
    main()
