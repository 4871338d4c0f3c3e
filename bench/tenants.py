"""Multi-tenant tables: one table with a btree on the tenant, the table LIST-partitioned by tenant, and
partial HNSW indexes per tenant; pgsim.search against pgvector's iterative scan written by hand.

    python bench/tenants.py [--dsn DSN] [--rows 48000] [--queries 12] [-k 10] [--noise 0.02] [--keep]

Vectors: the 3,000 Debian packages shipped in pgsim/demo/data, encoded once with all-MiniLM-L6-v2 (cached
in bench/.cache/). 200 packages are held out as queries; the other 2,800 are grown to --rows rows, each a
copy of a random package's vector plus Gaussian noise (--noise per coordinate), renormalised. Rows go to
16 tenants with skewed shares (SHARES), independent of their content. Every tenant gets --queries held-out
queries of its own (all tenants weigh alike); every mode answers every query, interleaved query by query.
Recall@k is measured against the exact scan of the tenant's rows in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_cache import embeddings  # noqa: E402

from pgsim.cli.common import format_table  # noqa: E402
from pgsim.columns.adding import add_embedding  # noqa: E402
from pgsim.columns.registry import remove_embedding  # noqa: E402
from pgsim.db.connection import connect  # noqa: E402
from pgsim.db.schema import install  # noqa: E402
from pgsim.demo.corpus import load_sample  # noqa: E402
from pgsim.knn.advice import advise, create  # noqa: E402
from pgsim.knn.filtered import search_with_plan  # noqa: E402
from pgsim.psycopg import register  # noqa: E402

SCHEMA = "bench_tenants"
FLAT, PARTS = f"{SCHEMA}.flat", f"{SCHEMA}.parts"
# percent of the rows per tenant: Zipf-like, the largest 30 %, the smallest 0.5 %
SHARES = [30, 17, 12, 8, 6, 5, 4, 3.5, 3, 2.5, 2.5, 2, 1.5, 1.5, 1.0, 0.5]
BUCKETS = {"large (30-12 %)": range(0, 3), "medium (8-4 %)": range(3, 7), "small (3.5-0.5 %)": range(7, 16)}
HELD_OUT = 200

Vector = np.ndarray[Any, np.dtype[np.float32]]
Run = Callable[[psycopg.Connection[Any], Vector, int, int], tuple[list[int], str, float]]  # ids, path, seconds


def make_rows(rows: int, noise: float, seed: int = 11) -> tuple[np.ndarray[Any, Any], Vector, list[str], Vector]:
    """(tenant per row, vectors, body per row, query vectors): copies of the sample's vectors plus noise."""
    packages = load_sample()
    vectors = embeddings([p.text for p in packages])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(packages))
    held, base = order[:HELD_OUT], order[HELD_OUT:]
    source = rng.choice(base, size=rows)
    grown = vectors[source] + rng.normal(0.0, noise, size=(rows, vectors.shape[1])).astype(np.float32)
    grown /= np.linalg.norm(grown, axis=1, keepdims=True)
    counts = np.floor(np.array(SHARES) / 100 * rows).astype(int)
    counts[0] += rows - counts.sum()
    tenants = rng.permutation(np.repeat(np.arange(len(SHARES)), counts))
    return tenants, grown.astype(np.float32), [packages[i].synopsis for i in source], vectors[held]


def copy_rows(conn: psycopg.Connection[Any], table: str, tenants: Any, vectors: Vector, bodies: list[str]) -> None:
    statement = sql.SQL("COPY {} (id, tenant, body, embedding) FROM STDIN WITH (FORMAT BINARY)").format(
        sql.Identifier(*table.split("."))
    )
    with conn.cursor() as cur, cur.copy(statement) as copy:
        copy.set_types(["int4", "int4", "text", "vector"])
        for i, (tenant, vector, body) in enumerate(zip(tenants, vectors, bodies, strict=True)):
            copy.write_row((i, int(tenant), body, vector))


def timed(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def index_mib(conn: psycopg.Connection[Any], table: str, partial: bool | None = None, hnsw: bool = False) -> float:
    """MiB of the indexes on ``table`` and its partitions (partial: only partial ones, or only full ones;
    hnsw: only HNSW indexes)."""
    row = conn.execute(
        """SELECT coalesce(sum(pg_relation_size(i.indexrelid)), 0) FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
           WHERE (i.indrelid = %s::regclass OR i.indrelid IN (SELECT inhrelid FROM pg_inherits
                                                            WHERE inhparent = %s::regclass))
             AND (%s::bool IS NULL OR (i.indpred IS NOT NULL) = %s::bool)
             AND (NOT %s OR am.amname = 'hnsw')""",
        [table, table, partial, partial, hnsw],
    ).fetchone()
    return int(row[0]) / 2**20 if row else 0.0


def load(conn: psycopg.Connection[Any], tenants: Any, vectors: Vector, bodies: list[str]) -> list[list[Any]]:
    """Both layouts, loaded by COPY before their indexes are built; the build times and sizes per layout."""
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
    columns = "id int, tenant int NOT NULL, body text, embedding vector(384)"
    conn.execute(f"CREATE TABLE {FLAT} ({columns}, PRIMARY KEY (id))")
    conn.execute(f"CREATE TABLE {PARTS} ({columns}, PRIMARY KEY (id, tenant)) PARTITION BY LIST (tenant)")
    for tenant in range(len(SHARES)):
        conn.execute(f"CREATE TABLE {PARTS}_{tenant:02d} PARTITION OF {PARTS} FOR VALUES IN ({tenant})")
    conn.execute("SET maintenance_work_mem = '512MB'")  # both graphs fit in memory while they are built
    sizes = []
    for table in (FLAT, PARTS):
        copy_time = timed(lambda t=table: copy_rows(conn, t, tenants, vectors, bodies))  # type: ignore[misc]
        hnsw_time = timed(
            lambda t=table: add_embedding(conn, t, "embedding", source="body", queue_existing=False)  # type: ignore[misc]
        )
        btree_time = timed(lambda: conn.execute(f"CREATE INDEX ON {FLAT} (tenant)")) if table == FLAT else 0.0
        conn.execute(f"ANALYZE {table}")
        layout = "(a) one table + btree" if table == FLAT else f"(b) {len(SHARES)} partitions"
        hnsw, size = index_mib(conn, table, hnsw=True), index_mib(conn, table)
        times = [f"{copy_time:.1f}", f"{hnsw_time:.1f}", f"{btree_time:.1f}"]
        sizes.append([layout, *times, f"{hnsw:.1f}", f"{size:.1f}"])
        print(f"{layout}: copy {copy_time:.1f}s, HNSW {hnsw_time:.1f}s, btree {btree_time:.1f}s", flush=True)
    return sizes


def hand_written(table: str, settings: list[str], resort: bool = True, exact: bool = False) -> Run:
    """The query a user writes: WHERE tenant = %s ORDER BY embedding <=> %s LIMIT k, under SET LOCALs;
    ``resort`` wraps it in a materialized CTE re-sorted by distance, as pgvector's README advises for
    relaxed order; ``exact`` computes every distance of the tenant's rows in a materialized CTE first, so
    no index can order them (enable_indexscan = off alone still let PostgreSQL 18 walk a partition's HNSW
    index). Returns the ids, whether PostgreSQL walked an HNSW index (``EXPLAIN`` of the first query per
    tenant, not timed) and the seconds the query took."""
    name = sql.Identifier(*table.split("."))
    inner = sql.SQL(
        "SELECT id, embedding <=> %(q)s AS d FROM {} WHERE tenant = %(t)s ORDER BY embedding <=> %(q)s LIMIT %(k)s"
    ).format(name)
    query = sql.SQL("WITH r AS MATERIALIZED ({}) SELECT id FROM r ORDER BY d").format(inner) if resort else inner
    if exact:
        query = sql.SQL(
            "WITH r AS MATERIALIZED (SELECT id, embedding <=> %(q)s AS d FROM {} WHERE tenant = %(t)s) "
            "SELECT id FROM r ORDER BY d LIMIT %(k)s"
        ).format(name)
    explained: dict[int, str] = {}

    def run(conn: psycopg.Connection[Any], vector: Vector, tenant: int, k: int) -> tuple[list[int], str, float]:
        params = {"q": vector, "t": tenant, "k": k}
        if tenant not in explained:
            with conn.transaction() as tx:
                for setting in settings:
                    conn.execute(setting)
                plan = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params).fetchone()
                explained[tenant] = "hnsw" if '"Order By"' in json.dumps(plan) else "exact"
                raise psycopg.Rollback(tx)
        started = time.perf_counter()
        with conn.transaction() as tx:
            for setting in settings:
                conn.execute(setting)
            rows = conn.execute(query, params).fetchall()
            raise psycopg.Rollback(tx)
        return [row[0] for row in rows], explained[tenant], time.perf_counter() - started

    return run


def pgsim_mode(table: str) -> Run:
    def run(conn: psycopg.Connection[Any], vector: Vector, tenant: int, k: int) -> tuple[list[int], str, float]:
        started = time.perf_counter()
        hits, plan = search_with_plan(conn, table, "embedding", vector, k=k, where={"tenant": tenant}, columns=["id"])
        return [hit.row["id"] for hit in hits], plan.path, time.perf_counter() - started

    return run


EXACT = ["SET LOCAL enable_indexscan = off"]  # the btree's bitmap scan (or the partition's scan), then a sort
ITERATIVE = ["SET LOCAL hnsw.iterative_scan = relaxed_order", "SET LOCAL hnsw.ef_search = 100"]


class Results:
    """Per mode and tenant: latencies, recalls, rows returned and the path taken, per query."""

    def __init__(self) -> None:
        self.data: dict[str, dict[int, dict[str, list[Any]]]] = {}

    def add(self, mode: str, tenant: int, seconds: float, recall: float, rows: int, path: str) -> None:
        cell = self.data.setdefault(mode, {}).setdefault(tenant, {"s": [], "r": [], "n": [], "p": []})
        for key, value in zip("srnp", (seconds, recall, rows, path), strict=True):
            cell[key].append(value)

    def bucket(self, mode: str, tenants: range) -> dict[str, list[Any]]:
        cells = [self.data[mode][t] for t in tenants]
        return {key: [v for cell in cells for v in cell[key]] for key in "srnp"}


def measure(
    conn: psycopg.Connection[Any],
    modes: dict[str, Run],
    queries: dict[int, Vector],
    vectors: Vector,
    truth: dict[tuple[int, int], float],
    results: Results,
    k: int,
    progress: Any,
) -> None:
    """Every mode on every (tenant, query), interleaved; the first mode must be an exact scan, whose k-th
    distance (recorded in ``truth`` when missing) decides recall: a row as near as the exact k-th is a hit."""
    for tenant, vectors_of_tenant in queries.items():
        for query_no, query in enumerate(vectors_of_tenant):
            for mode, run in modes.items():
                ids, path, seconds = run(conn, query, tenant, k)
                distances = 1 - vectors[ids] @ query if ids else np.zeros(0)
                key = (tenant, query_no)
                if key not in truth:
                    truth[key] = float(distances.max()) if len(ids) else 0.0
                recall = float((distances <= truth[key] + 1e-5).sum()) / k
                results.add(mode, tenant, seconds, recall, len(ids), path)
                progress.update()


def table_rows(results: Results, modes: list[str], k: int) -> list[list[Any]]:
    rows = []
    for bucket, tenants in BUCKETS.items():
        qps = {}
        for mode in results.data:
            qps[mode] = len(results.bucket(mode, tenants)["s"]) / sum(results.bucket(mode, tenants)["s"])
        for mode in modes:
            cell = results.bucket(mode, tenants)
            short = sum(1 for n in cell["n"] if n != k)
            paths = {p: cell["p"].count(p) for p in sorted(set(cell["p"]))}
            rows.append(
                [
                    bucket,
                    mode,
                    f"{statistics.mean(cell['r']):.3f}",
                    f"{min(cell['n'])}",
                    f"{short}/{len(cell['n'])}",
                    " ".join(f"{p} {n}" for p, n in paths.items()),
                    f"{qps[mode]:.0f}",
                    f"{np.percentile(cell['s'], 95) * 1000:.1f}",
                    f"{qps[mode] / qps['exact scan (a)']:.2f}x",
                    f"{qps[mode] / qps['pgvector iterative (a)']:.2f}x",
                ]
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--rows", type=int, default=48_000)
    parser.add_argument("--queries", type=int, default=12, help="queries per tenant")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--noise", type=float, default=0.02, help="Gaussian noise per coordinate before renorm")
    parser.add_argument("--no-advise", action="store_true", help="skip the partial indexes per tenant (d)")
    parser.add_argument("--keep", action="store_true", help=f"keep schema {SCHEMA} at the end")
    args = parser.parse_args()
    if args.queries * len(SHARES) > HELD_OUT:
        parser.error(f"at most {HELD_OUT // len(SHARES)} queries per tenant")
    load_before = os.getloadavg()
    tenants, vectors, bodies, held = make_rows(args.rows, args.noise)
    counts = np.bincount(tenants, minlength=len(SHARES))
    queries = {t: held[t * args.queries : (t + 1) * args.queries] for t in range(len(SHARES))}

    conn = connect(args.dsn)
    conn.prepare_threshold = None  # no mode may run on a plan that another mode's settings produced
    install(conn)
    register(conn)
    sizes = load(conn, tenants, vectors, bodies)

    from tqdm import tqdm

    modes: dict[str, Run] = {
        "exact scan (a)": hand_written(FLAT, EXACT, exact=True),
        "pgvector iterative (a)": hand_written(FLAT, ITERATIVE),
        "pgsim.search (a)": pgsim_mode(FLAT),
        "exact scan (b)": hand_written(PARTS, EXACT, exact=True),
        "pgvector iterative (b)": hand_written(PARTS, ITERATIVE),
        "pgsim.search (b)": pgsim_mode(PARTS),
    }
    late: dict[str, Run] = {}
    total = len(SHARES) * args.queries * (len(modes) + (0 if args.no_advise else 3))
    progress = tqdm(total=total, desc="queries", file=sys.stderr)
    results, truth = Results(), {}
    measure(conn, modes, queries, vectors, truth, results, args.k, progress)
    advised: list[Any] = []
    if not args.no_advise:
        workload = [{"tenant": t} for t in range(len(SHARES)) for _ in range(args.queries)]
        advised = advise(conn, FLAT, "embedding", workload, k=args.k)
        build = timed(lambda: [create(conn, item) for item in advised])
        size = index_mib(conn, FLAT, partial=True)
        added = f"+{size:.1f}"
        sizes.append([f"(d) (a) + {len(advised)} partial HNSW", "", f"+{build:.1f}", "", added, added])
        # the partial indexes as index-advise builds them, beside a fresh exact scan: one table, one phase
        late = {
            "exact scan (a) again": hand_written(FLAT, EXACT, exact=True),
            "pgvector iterative (d)": hand_written(FLAT, ITERATIVE),
            "pgsim.search (d)": pgsim_mode(FLAT),
        }
        measure(conn, late, queries, vectors, truth, results, args.k, progress)
    progress.close()
    load_after = os.getloadavg()

    shares = ", ".join(f"{n / args.rows:.1%}" for n in counts)
    print(f"\n{args.rows} rows over {len(SHARES)} tenants ({shares}); noise {args.noise} per coordinate")
    print(f"{args.queries} held-out queries per tenant, k={args.k}; interleaved query by query")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    headers = [
        "tenants",
        "mode",
        f"recall@{args.k}",
        "min rows",
        f"!= {args.k} rows",
        "plan",
        "QPS",
        "p95 ms",
        "vs exact (a)",
        "vs pgvector (a)",
    ]
    print(format_table(headers, table_rows(results, list(modes), args.k), max_width=40))
    if late:
        print("\nwith the partial indexes of (d) in place, beside a fresh exact scan (ratios to that exact scan):")
        results.data["exact scan (a)"] = results.data.pop("exact scan (a) again")
        late_headers = [*headers[:-1], "vs pgvector (a), first phase"]
        print(format_table(late_headers, table_rows(results, list(late)[1:], args.k), max_width=40))
        tenants_advised = sorted(item.value for item in advised)
        print(f"index-advise built partial indexes for tenants {tenants_advised}")
    print("\nlayouts (build times in seconds, index sizes in MiB, partitions included):")
    layout_headers = ["layout", "COPY s", "HNSW build s", "btree s", "HNSW MiB", "all indexes MiB"]
    print(format_table(layout_headers, sizes, max_width=40))
    if not args.keep:
        for table in (FLAT, PARTS):
            remove_embedding(conn, table, "embedding")
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(SCHEMA)))


if __name__ == "__main__":
    main()
