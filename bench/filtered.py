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

from pgsim.cli import format_table  # noqa: E402
from pgsim.corpus import Package  # noqa: E402
from pgsim.database import connect  # noqa: E402
from pgsim.install import install  # noqa: E402
from pgsim.psycopg import register  # noqa: E402
from pgsim.search import Between, search  # noqa: E402

TABLE = "bench_filtered.packages"
TABLE_ID = sql.Identifier("bench_filtered", "packages")


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


def pgsim_mode(conn: psycopg.Connection[Any], vector: Any, flt: Filter, k: int) -> list[str]:
    hits = search(conn, TABLE, "embedding", vector, k=k, where=flt.where, columns=["package"])
    return [hit.row["package"] for hit in hits]


MODES: dict[str, Callable[[psycopg.Connection[Any], Any, Filter, int], list[str]]] = {
    "exact scan": sql_mode(["SET LOCAL enable_indexscan = off"], resort=False),
    "pgvector defaults (ef_search 40)": sql_mode([], resort=False),
    "pgvector iterative, hand-set": sql_mode(
        ["SET LOCAL hnsw.iterative_scan = relaxed_order", "SET LOCAL hnsw.ef_search = 100"], resort=True
    ),
    "pgsim.search": pgsim_mode,
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
    install(conn)
    register(conn)
    load_table(conn, packages, table_vectors)
    filters = choose_filters(packages)

    from tqdm import tqdm

    rows = []
    progress = tqdm(total=len(filters) * len(MODES) * len(query_vectors), desc="queries", file=sys.stderr)
    for flt in filters:
        matching = sum(1 for p in packages if flt.keep(p))
        truth: list[list[str]] = []
        for mode, run in MODES.items():
            latencies, recalls, returned = [], [], []
            for position, vector in enumerate(query_vectors):
                started = time.perf_counter()
                found = run(conn, vector, flt, args.k)
                latencies.append(time.perf_counter() - started)
                if mode == "exact scan":
                    truth.append(found)
                expected = truth[position]
                recalls.append(len(set(found) & set(expected)) / max(1, len(expected)))
                returned.append(len(found))
                progress.update()
            rows.append(
                [
                    flt.name,
                    matching,
                    mode,
                    f"{statistics.mean(recalls):.3f}",
                    f"{statistics.mean(returned):.2f}",
                    f"{min(returned)}",
                    f"{len(latencies) / sum(latencies):.0f}",
                    f"{np.percentile(latencies, 95) * 1000:.1f}",
                ]
            )
    progress.close()
    print(f"\n{len(packages)} rows, {len(query_vectors)} held-out queries, k={args.k}")
    headers = ["filter", "matching rows", "mode", f"recall@{args.k}", "mean rows", "min rows", "QPS", "p95 ms"]
    print(format_table(headers, rows, max_width=48))


if __name__ == "__main__":
    main()
