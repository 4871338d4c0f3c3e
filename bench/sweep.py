"""Filtered k-NN across selectivities, before and after pgsim.calibrate, on two corpora.

    python bench/sweep.py [--dsn DSN] [--queries 100] [-k 10] [--calibrate-seconds 60] [--chart DIR]

Corpus "descriptions": the Debian packages of bench/filtered.py (long descriptions, ~63k rows), filtered
on a column of uniform random numbers (``r < s``, a btree on it): no correlation with the text.
Corpus "synopses": the same packages' one-line synopses (short texts, another table and index), filtered on
``installed_size`` up to its s-quantile (a real, heavy-tailed value that goes with the kind of package,
so the filter is correlated with the text). Queries: held-out packages' synopses (none is in a table).

Modes, same queries, same run, interleaved: the exact scan (the truth), pgvector's iterative scan set by
hand (relaxed order, ef_search 200, re-sorted), pgsim.search with no calibration (the fixed thresholds),
pgsim.search after pgsim.calibrate (query vectors sampled from the table's rows), and pgsim.search after
pgsim.calibrate on a query log (the other held-out packages' synopses: real queries, none of them a test
query). Recall@k counts a row as near as the exact k-th as found.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_cache import debian_packages, embeddings  # noqa: E402
from filtered import load_table  # noqa: E402
from sweep_chart import line_chart  # noqa: E402

from pgsim.cli.common import format_table  # noqa: E402
from pgsim.db.connection import connect  # noqa: E402
from pgsim.db.schema import install  # noqa: E402
from pgsim.knn.filtered import search_with_plan  # noqa: E402
from pgsim.psycopg import register  # noqa: E402
from pgsim.quality.index_calibration import calibrate  # noqa: E402

SELECTIVITIES = (0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)
Mode = Callable[[psycopg.Connection[Any], Any, str, int], list[float]]


def prepare_descriptions(conn: psycopg.Connection[Any], packages: list[Any], vectors: Any) -> str:
    load_table(conn, packages, vectors)
    table = "bench_filtered.packages"
    has = conn.execute("SELECT 1 FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'r'", [table]).fetchone()
    if has is None:
        conn.execute("ALTER TABLE bench_filtered.packages ADD COLUMN r double precision")
        conn.execute("UPDATE bench_filtered.packages SET r = random()")
        conn.execute("CREATE INDEX ON bench_filtered.packages (r)")
        conn.execute("VACUUM ANALYZE bench_filtered.packages")
    return table


def prepare_synopses(conn: psycopg.Connection[Any], packages: list[Any], vectors: Any) -> str:
    table = "bench_filtered.synopses"
    if conn.execute("SELECT to_regclass(%s)", [table]).fetchone() != (None,):
        if conn.execute(sql.SQL("SELECT count(*) FROM bench_filtered.synopses")).fetchone() == (len(packages),):
            return table
        conn.execute("DROP TABLE bench_filtered.synopses")
    conn.execute(
        "CREATE TABLE bench_filtered.synopses (package text PRIMARY KEY, installed_size int, embedding vector(384))"
    )
    with conn.cursor() as cur, cur.copy("COPY bench_filtered.synopses FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["text", "int4", "vector"])
        for package, vector in zip(packages, vectors, strict=True):
            copy.write_row((package.package, package.installed_size, vector))
    with conn.transaction():
        conn.execute("SET LOCAL maintenance_work_mem = '1GB'")
        conn.execute("CREATE INDEX ON bench_filtered.synopses USING hnsw (embedding vector_cosine_ops)")
    conn.execute("CREATE INDEX ON bench_filtered.synopses (installed_size)")
    conn.execute("VACUUM ANALYZE bench_filtered.synopses")
    return table


def uniform_filter(selectivity: float) -> str:
    return "TRUE" if selectivity >= 1 else f"r < {selectivity}"


def quantile_filter(conn: psycopg.Connection[Any], table: str) -> Callable[[float], str]:
    def condition(selectivity: float) -> str:
        if selectivity >= 1:
            return "TRUE"
        (bound,) = conn.execute(
            sql.SQL("SELECT percentile_disc(%s) WITHIN GROUP (ORDER BY installed_size) FROM {}").format(
                sql.Identifier(*table.split("."))
            ),
            [selectivity],
        ).fetchone()  # type: ignore[misc]
        return f"installed_size <= {int(bound)}"  # < would leave out the ties at the bound

    return condition


def hand_mode(table: str, settings: list[str]) -> Mode:
    def run(conn: psycopg.Connection[Any], vector: Any, condition: str, k: int) -> list[float]:
        inner = sql.SQL(
            "SELECT embedding <=> %(q)s AS d FROM {} WHERE {} ORDER BY embedding <=> %(q)s LIMIT %(k)s"
        ).format(sql.Identifier(*table.split(".")), sql.SQL(condition))  # type: ignore[arg-type]
        statement = sql.SQL("WITH r AS MATERIALIZED ({}) SELECT d FROM r ORDER BY d").format(inner)
        with conn.transaction() as tx:
            for setting in settings:
                conn.execute(setting)  # type: ignore[arg-type]
            rows = conn.execute(statement, {"q": vector, "k": k}).fetchall()
            raise psycopg.Rollback(tx)
        return [row[0] for row in rows]

    return run


def pgsim_mode(table: str, paths: dict[str, str]) -> Mode:
    def run(conn: psycopg.Connection[Any], vector: Any, condition: str, k: int) -> list[float]:
        hits, chosen = search_with_plan(
            conn, table, "embedding", vector, k=k, where=sql.SQL(condition), columns=["package"]
        )  # type: ignore[arg-type]
        paths[condition] = f"{chosen.path} {chosen.ef_search or ''}".strip()
        return [hit.distance for hit in hits]

    return run


def sweep(
    conn: psycopg.Connection[Any],
    table: str,
    conditions: Callable[[float], str],
    queries: Any,
    k: int,
    modes: dict[str, Mode],
) -> list[dict[str, Any]]:
    """Every mode on every query at every selectivity, interleaved query by query."""
    results = []
    for selectivity in SELECTIVITIES:
        condition = conditions(selectivity)
        latencies: dict[str, list[float]] = {mode: [] for mode in modes}
        recalls: dict[str, list[float]] = {mode: [] for mode in modes}
        returned: dict[str, list[int]] = {mode: [] for mode in modes}
        for vector in queries:
            truth: list[float] = []
            for mode, run in modes.items():
                started = time.perf_counter()
                found = run(conn, vector, condition, k)
                latencies[mode].append(time.perf_counter() - started)
                if not truth:
                    truth = found
                kth = truth[-1] + 1e-6 if truth else 0.0
                recalls[mode].append(sum(1 for d in found if d <= kth) / max(len(truth), 1))
                returned[mode].append(len(found))
        exact_qps = len(queries) / sum(latencies["exact scan"])
        for mode in modes:
            qps = len(queries) / sum(latencies[mode])
            results.append(
                {
                    "selectivity": selectivity,
                    "filter": condition,
                    "mode": mode,
                    "recall": statistics.mean(recalls[mode]),
                    "min_rows": min(returned[mode]),
                    "qps": qps,
                    "p95_ms": 1000 * float(np.percentile(latencies[mode], 95)),
                    "vs_exact": qps / exact_qps,
                }
            )
        print(f"  {selectivity:.1%} done", file=sys.stderr, flush=True)
    return results


def run_corpus(
    conn: psycopg.Connection[Any],
    name: str,
    table: str,
    conditions: Callable[[float], str],
    queries: Any,
    log: Any,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    print(f"\n## {name}: {table}", flush=True)
    conn.execute("DELETE FROM pgsim.calibration WHERE table_oid = %s::regclass", [table])
    before: dict[str, str] = {}
    after: dict[str, str] = {}
    logged: dict[str, str] = {}
    modes: dict[str, Mode] = {
        "exact scan": hand_mode(table, ["SET LOCAL enable_indexscan = off"]),
        "pgvector iterative, ef_search 200": hand_mode(
            table, ["SET LOCAL hnsw.iterative_scan = relaxed_order", "SET LOCAL hnsw.ef_search = 200"]
        ),
        "pgsim, not calibrated": pgsim_mode(table, before),
    }
    uncalibrated = sweep(conn, table, conditions, queries, args.k, modes)
    started = time.perf_counter()
    result = calibrate(conn, table, "embedding", seconds=args.calibrate_seconds, k=args.k)
    print(f"calibrated in {time.perf_counter() - started:.1f} s ({len(result.levels)} levels, stored: {result.stored})")
    calibrated = sweep(
        conn,
        table,
        conditions,
        queries,
        args.k,
        {"exact scan": modes["exact scan"], "pgsim, calibrated": pgsim_mode(table, after)},
    )
    started = time.perf_counter()
    result = calibrate(conn, table, "embedding", seconds=args.calibrate_seconds, k=args.k, queries=log)
    print(
        f"calibrated on {len(log)} logged queries in {time.perf_counter() - started:.1f} s "
        f"({len(result.levels)} levels)"
    )
    from_log = sweep(
        conn,
        table,
        conditions,
        queries,
        args.k,
        {"exact scan": modes["exact scan"], "pgsim, calibrated on a query log": pgsim_mode(table, logged)},
    )
    rows = uncalibrated + [r for r in calibrated + from_log if r["mode"] != "exact scan"]
    order = [*modes, "pgsim, calibrated", "pgsim, calibrated on a query log"]
    rows.sort(key=lambda r: (r["selectivity"], order.index(r["mode"])))
    paths = {"pgsim, not calibrated": before, "pgsim, calibrated": after, "pgsim, calibrated on a query log": logged}
    table_rows = [
        [
            f"{r['selectivity']:.1%}",
            r["mode"],
            paths.get(r["mode"], {}).get(r["filter"], ""),
            f"{r['recall']:.3f}",
            r["min_rows"],
            f"{r['qps']:.0f}",
            f"{r['p95_ms']:.1f}",
            f"{r['vs_exact']:.2f}x",
        ]
        for r in rows
    ]
    print(
        format_table(["selectivity", "mode", "path", "recall@k", "min rows", "QPS", "p95 ms", "vs exact"], table_rows)
    )
    for row in rows:
        row["corpus"] = name
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--calibrate-seconds", type=float, default=60.0)
    parser.add_argument("--chart", type=Path, help="write the sweep's SVG charts into this directory")
    args = parser.parse_args()

    corpus = debian_packages()
    vectors = embeddings([p.text for p in corpus])
    held_out = set(random.Random(5).sample(range(len(corpus)), 200))  # bench/filtered.py's split
    keep = [i for i in range(len(corpus)) if i not in held_out]
    packages = [corpus[i] for i in keep]
    query_ids = sorted(held_out)[: args.queries]
    held_out_synopses = embeddings([corpus[i].synopsis for i in sorted(held_out)])
    queries = held_out_synopses[: len(query_ids)]
    log = held_out_synopses[len(query_ids) :]  # the other held-out packages: a query log, none of them a test query
    synopsis_vectors = embeddings([p.synopsis for p in packages])

    conn = connect(args.dsn)
    conn.prepare_threshold = None
    install(conn)
    register(conn)
    descriptions = prepare_descriptions(conn, packages, vectors[keep])
    synopses = prepare_synopses(conn, packages, synopsis_vectors)
    rows = run_corpus(conn, "descriptions", descriptions, uniform_filter, queries, log, args)
    rows += run_corpus(conn, "synopses", synopses, quantile_filter(conn, synopses), queries, log, args)
    if args.chart:
        args.chart.mkdir(parents=True, exist_ok=True)
        for corpus_name in ("descriptions", "synopses"):
            mine = [r for r in rows if r["corpus"] == corpus_name]
            for metric, label in (("qps", "queries per second"), ("recall", "recall@10")):
                series = {
                    mode: [(r["selectivity"], r[metric]) for r in mine if r["mode"] == mode]
                    for mode in dict.fromkeys(r["mode"] for r in mine)
                }
                path = args.chart / f"sweep-{corpus_name}-{metric}.svg"
                path.write_text(line_chart(f"{corpus_name}: {label} by selectivity", series, log_y=metric == "qps"))
                print(f"wrote {path}")


if __name__ == "__main__":
    main()
