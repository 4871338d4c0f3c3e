"""Scale (issue 20): how size, build time, recall and speed grow with the rows, per storage type.

    python bench/scale.py [--sizes 50000 100000 200000] [--storages vector halfvec bit tenants] [--queries 100]
        [--noise 0.3] [--chart DIR] [--model NAME]
    python bench/scale.py --model wordllama-l2-supercat --storages vector prefix128 prefix64 ...

Rows: the all-MiniLM-L6-v2 vectors of Debian's package synopses (bench/corpus_cache.py, about 63,600 after 100
held out as queries), grown to each size by copies: row i is synopsis i mod B (B the base count); the first
copy is the vector itself, every later one the vector plus Gaussian noise of norm about ``--noise`` (each
coordinate N(0, noise^2 / 384)), scaled back to unit length, so copies are near, not equal, to their original.
Each row also has ``r``, uniform in 0..999 with a btree, for filters passing 10 % (``r < 100``) and 0.5 %
(``r < 5``) of the rows, and ``tenant`` (id mod 16, with a btree) for a filter on one tenant of 16 (``tenant = 3``,
6.25 %). Storage ``tenants`` is the vector table partitioned by tenant (16 list partitions, each with its own
HNSW index, registered on the parent): the multi-tenant pattern, where the tenant filter prunes the search to
one partition. One table per size and storage, registered with pgsim (the vectors written with the rows, as
pgsim.ingest would), the HNSW index built after the rows by pgsim's sized build
(pgsim.db.hnsw.create_hnsw_index: m 16, ef_construction 64, maintenance_work_mem and parallel workers sized by
pgsim), timed. Storage ``bit`` keeps the full vectors in a vector(384) column and builds the HNSW index over
binary_quantize(embedding)::bit(384) (Hamming): ``pgsim.search`` re-ranks the walk's candidates on the full
vectors, and the query by hand is pgvector's README recipe for it (the 4k nearest by Hamming distance at the
default ef_search, re-ranked by cosine distance); ``bit8`` and ``bit4`` are bit storage with a sparser graph
(HNSW m 8 and 4 instead of 16), for how far the binary index shrinks when its neighbour lists do.
Storages ``prefix128`` and ``prefix64`` (prefix storage, for
a Matryoshka-trained ``--model`` such as wordllama-l2-supercat, whose 256-dimension vectors of the same
synopses are then the rows) keep the full vectors and build the cosine HNSW index over the first 128 or 64
values, subvector(embedding, 1, n)::vector(n); by hand, the same recipe as bit's over that prefix. Then the
held-out synopses as queries (k = 10) through ``pgsim.search`` and through the query a user writes by hand
with pgvector's defaults, interleaved, and with ``--calibrate`` through ``pgsim.search`` again after
``pgsim.calibrate`` (the two filters given as its workload): recall@10 against the exact neighbours over the
float32 vectors (numpy), rows returned, QPS on one connection and p95. Growth: the exponent b of
a least-squares fit of log(y) = a + b log(N) over the sizes, for build time, index size and QPS. Against vector: each
storage's index size and QPS over the vector table's at the same size, filter and mode. ``--chart DIR`` draws
build time, index size and QPS against N as SVG.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_cache import debian_packages, embeddings  # noqa: E402
from sweep_chart import line_chart  # noqa: E402

import pgsim  # noqa: E402
from pgsim.cli.common import format_table  # noqa: E402
from pgsim.db.hnsw import HNSW, create_hnsw_index  # noqa: E402
from pgsim.encoding.models import DEFAULT_MODEL  # noqa: E402

SCHEMA = "bench_scale"
K = 10
FILTERS = {"none": None, "10%": "r < 100", "0.5%": "r < 5", "tenant": "tenant = 3"}
TENANTS = 16
Matrix = np.ndarray[Any, np.dtype[np.float32]]
STORAGES = ["vector", "halfvec", "bit", "tenants", "prefix128", "prefix64", "bit8", "bit4"]


def passing_rows(condition: str | None, r: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The ids that pass one of FILTERS (``tenant`` is id mod TENANTS)."""
    ids = np.arange(len(r))
    if condition is None:
        return ids
    column, operator, value = condition.split()
    values = r if column == "r" else ids % TENANTS
    return ids[values < int(value)] if operator == "<" else ids[values == int(value)]


def grown(base: Matrix, rows: int, noise: float) -> Matrix:
    """``rows`` unit vectors: copies of ``base``, the first exact, later ones with noise (see the module text)."""
    generator = np.random.default_rng(7)
    copies = base[np.arange(rows) % len(base)].copy()
    noisy = np.arange(rows) >= len(base)
    copies[noisy] += generator.normal(0.0, noise / math.sqrt(base.shape[1]), (int(noisy.sum()), base.shape[1]))
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    return copies.astype(np.float32)


def graph_m(storage: str) -> int:
    """HNSW m of a storage: ``bit8`` and ``bit4`` are bit storage with a sparser graph (m 8, 4), else 16."""
    return int(storage.removeprefix("bit")) if storage.startswith("bit") and storage != "bit" else 16


def kind_of(storage: str) -> str:
    """``bit`` for every bit storage, else the storage."""
    return "bit" if storage.startswith("bit") else storage


def prefix_of(storage: str) -> int | None:
    """The prefix length of storage ``prefix<n>``; None for the others."""
    return int(storage.removeprefix("prefix")) if storage.startswith("prefix") else None


def build(
    conn: psycopg.Connection[Any], storage: str, vectors: Matrix, r: np.ndarray[Any, Any], model: str
) -> dict[str, Any]:
    """Table SCHEMA.<storage>_<rows>, registered, filled, indexed: its sizes and build seconds."""
    name = f"{storage}_{len(vectors)}" + ("" if model == DEFAULT_MODEL else f"_{model.split('-')[0]}")
    dimension, prefix = vectors.shape[1], prefix_of(storage)
    table = f"{SCHEMA}.{name}"
    ident = sql.Identifier(SCHEMA, name)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(SCHEMA)))
    if pgsim.get_registration(conn, table, "embedding") is not None:
        pgsim.remove_embedding(conn, table, "embedding")
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
    column_type = "halfvec" if storage == "halfvec" else "vector"  # bit: full vectors in the table, a binary index
    partitioned = storage == "tenants"
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (id bigint, r int, tenant int, body text, embedding {}({}), PRIMARY KEY (id, tenant))"
            + (" PARTITION BY LIST (tenant)" if partitioned else "")
        ).format(ident, sql.SQL(column_type), sql.Literal(dimension))
    )
    for tenant in range(TENANTS if partitioned else 0):
        conn.execute(
            sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES IN ({})").format(
                sql.Identifier(SCHEMA, f"{name}_p{tenant}"), ident, sql.Literal(tenant)
            )
        )
    dtype = "vector" if partitioned or prefix else kind_of(storage)
    pgsim.add_embedding(conn, table, "embedding", source="body", model=model, dtype=dtype, index=None,
                        queue_existing=False, prefix=prefix)  # fmt: skip
    started = time.perf_counter()
    conn.execute("DROP TABLE IF EXISTS pg_temp.scale_rows")
    conn.execute(f"CREATE TEMP TABLE scale_rows (id bigint, r int, embedding vector({dimension}))")
    with conn.cursor() as cur, cur.copy("COPY scale_rows FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["int8", "int4", "vector"])
        for i in range(len(vectors)):
            copy.write_row((i, int(r[i]), vectors[i]))
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (id, r, tenant, embedding) SELECT id, r, id % {}, embedding::{} FROM scale_rows"
        ).format(ident, sql.Literal(TENANTS), sql.SQL(column_type))
    )
    conn.execute("DROP TABLE scale_rows")
    conn.execute(sql.SQL("CREATE INDEX ON {} (r)").format(ident))
    conn.execute(sql.SQL("CREATE INDEX ON {} (tenant)").format(ident))
    loaded = time.perf_counter() - started
    started = time.perf_counter()
    opclass = {"halfvec": "halfvec_cosine_ops", "bit": "bit_hamming_ops"}.get(kind_of(storage), "vector_cosine_ops")
    # a partitioned table's index is built partition by partition, each with pgsim's sized settings
    report = create_hnsw_index(
        conn,
        table,
        "embedding",
        f"{name}_hnsw",
        HNSW(m=graph_m(storage), ef_construction=64),
        opclass=opclass,
        prefix=prefix,
    )
    seconds = time.perf_counter() - started
    conn.execute(sql.SQL("VACUUM ANALYZE {}").format(ident))
    sizes = conn.execute(  # a partitioned table's and index's: their partitions' sums
        "SELECT coalesce((SELECT sum(pg_table_size(relid))::bigint FROM pg_partition_tree(%(t)s)), "
        "pg_table_size(%(t)s)), coalesce((SELECT sum(pg_relation_size(relid))::bigint "
        "FROM pg_partition_tree(%(i)s)), pg_relation_size(%(i)s))",
        {"t": table, "i": f"{SCHEMA}.{name}_hnsw"},
    ).fetchone()
    assert sizes is not None
    return {"table": table, "load s": loaded, "build s": seconds, "table bytes": sizes[0], "index bytes": sizes[1],
            "build memory MB": report.settings.maintenance_work_mem_mb}  # fmt: skip


def measure(
    conn: psycopg.Connection[Any],
    table: str,
    vectors: Matrix,
    r: np.ndarray[Any, Any],
    queries: Matrix,
    modes: tuple[str, ...] = ("pgsim", "by hand"),
    storage: str = "vector",
) -> dict[tuple[str, str], tuple[float, int, float, float]]:
    """Per (mode, filter): (recall@10 against the exact float32 neighbours, fewest rows returned, QPS, p95 ms).
    Modes: ``pgsim.search``, and the query a user writes by hand with pgvector's defaults (``WHERE ... ORDER BY
    embedding <=> q LIMIT 10``, ef_search 40, no iterative scan; on bit storage pgvector's re-rank recipe),
    interleaved query by query."""
    hand = sql.SQL("SELECT id FROM {} WHERE {} ORDER BY embedding <=> %s::vector LIMIT {}")
    dimension, prefix = vectors.shape[1], prefix_of(storage)
    if kind_of(storage) == "bit" or prefix:  # 4 k candidates, as pgvector's README, re-ranked
        order = (
            f"binary_quantize(embedding)::bit({dimension}) <~> binary_quantize(%s::vector)::bit({dimension})"
            if kind_of(storage) == "bit"
            else f"subvector(embedding, 1, {prefix})::vector({prefix}) "
            f"<=> subvector(%s::vector, 1, {prefix})::vector({prefix})"
        )
        hand = sql.SQL(
            "SELECT id FROM (SELECT id, embedding FROM {} WHERE {} ORDER BY " + order + " LIMIT 40) AS c "  # noqa: S608
            "ORDER BY embedding <=> %s::vector LIMIT {}"  # (order is made of this function's numbers)
        )
    found = {}
    for label, condition in FILTERS.items():
        passing = passing_rows(condition, r)
        where = None if condition is None else sql.SQL(condition)
        by_hand = hand.format(sql.Identifier(*table.split(".")), where or sql.SQL("true"), sql.Literal(K))
        runs: dict[str, tuple[list[float], list[int], list[float]]] = {mode: ([], [], []) for mode in modes}
        for number, query in enumerate(queries):
            scores = vectors[passing] @ query
            kth = float(np.sort(scores)[-K])
            for mode in runs:
                started = time.perf_counter()
                if mode.startswith("pgsim"):
                    ids = [hit.row["id"] for hit in pgsim.search(conn, table, "embedding", query, k=K, where=where,
                                                                 columns=["id"])]  # fmt: skip
                else:
                    arguments = [query, query] if kind_of(storage) == "bit" or prefix else [query]
                    ids = [row[0] for row in conn.execute(by_hand, arguments).fetchall()]
                recalls, counts, latencies = runs[mode]
                if number:  # the first query of each filter pays for the plan and cache
                    latencies.append(time.perf_counter() - started)
                counts.append(len(ids))
                near = sum(1 for i in ids if float(vectors[i] @ query) >= kth - 1e-6)  # ties count
                recalls.append(min(near, K) / min(K, len(passing)))
        for mode, (recalls, counts, latencies) in runs.items():
            cuts = statistics.quantiles(latencies, n=20)
            found[(mode, label)] = (
                statistics.mean(recalls),
                min(counts),
                len(latencies) / sum(latencies),
                cuts[18] * 1000,
            )
    return found


def exponent(points: list[tuple[float, float]]) -> float:
    """b of the least-squares fit log(y) = a + b log(x)."""
    xs = np.log([x for x, _ in points])
    ys = np.log([y for _, y in points])
    return float(np.polyfit(xs, ys, 1)[0]) if len(points) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--sizes", nargs="+", type=int, default=[50_000, 100_000, 200_000])
    parser.add_argument("--storages", nargs="+", default=STORAGES, choices=STORAGES)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--calibrate", type=float, default=0, help="also pgsim.calibrate (this budget, s), then search")
    parser.add_argument("--chart", type=Path, help="write the growth charts (SVG) into this directory")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model whose vectors are the rows")
    args = parser.parse_args()

    packages = [p for p in debian_packages() if p.synopsis]
    every = embeddings([p.synopsis for p in packages], args.model)
    base, queries = every[: -args.queries], every[-args.queries :]
    conn = pgsim.connect(args.dsn, autocommit=True)
    pgsim.install(conn)
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for rows in args.sizes:
        vectors = grown(base, rows, args.noise)
        r = np.random.default_rng(11).integers(0, 1000, rows)
        for storage in args.storages:
            print(f"{storage} x {rows}: loading and building ...", file=sys.stderr, flush=True)
            built = build(conn, storage, vectors, r, args.model)
            print(f"  built in {built['build s']:.1f}s; searching ...", file=sys.stderr, flush=True)
            built["search"] = measure(conn, built["table"], vectors, r, queries, storage=storage)
            if args.calibrate:
                print(f"  calibrating ({args.calibrate:.0f}s budget) ...", file=sys.stderr, flush=True)
                started = time.perf_counter()
                pgsim.calibrate(conn, built["table"], "embedding", seconds=args.calibrate, relevance=False,
                                filters=[condition for condition in FILTERS.values() if condition])  # fmt: skip
                built["calibrate s"] = time.perf_counter() - started
                built["search"].update(
                    measure(conn, built["table"], vectors, r, queries, ("pgsim, calibrated",), storage=storage)
                )
            results[(storage, rows)] = built
    sizes, table = [], []
    for (storage, rows), built in results.items():
        megabytes = [f"{built[name] / 2**20:.0f}" for name in ("table bytes", "index bytes")]
        seconds = [f"{built['load s']:.1f}", f"{built['build s']:.1f}", f"{built['build s'] / rows * 1e6:.0f}",
                   f"{built.get('calibrate s', 0):.0f}"]  # fmt: skip
        sizes.append([storage, rows, *megabytes, built["build memory MB"], *seconds])
        for (mode, label), (recall, fewest, qps, p95) in built["search"].items():
            ours = built["search"][("pgsim", label)][2]
            table.append([storage, rows, label, mode, f"{recall:.3f}", fewest, f"{qps:.0f}", f"{p95:.1f}",
                          f"{qps / ours:.2f}x"])  # fmt: skip
    print(
        f"\nmodel {args.model}: base {len(base)} synopsis vectors, noise {args.noise}, "
        f"{len(queries)} held-out queries, k = {K}\n"
    )
    print(format_table(["storage", "rows", "table MB", "index MB", "build memory MB", "load s", "build s",
                        "build us/row", "calibrate s"], sizes))  # fmt: skip
    print()
    print(format_table(["storage", "rows", "filter", "mode", "recall@10", "min rows", "QPS", "p95 ms",
                        "QPS vs pgsim"], table))  # fmt: skip
    against = []
    for (storage, rows), built in results.items():
        vector = results.get(("vector", rows))
        if storage == "vector" or vector is None:
            continue
        for (mode, label), (recall, _, qps, _) in built["search"].items():
            if (mode, label) in vector["search"]:
                against.append([storage, rows, label, mode, f"{recall:.3f}",
                                f"{vector['search'][(mode, label)][0]:.3f}",
                                f"{built['index bytes'] / vector['index bytes']:.2f}x",
                                f"{qps / vector['search'][(mode, label)][2]:.2f}x"])  # fmt: skip
    if against:
        print("\nagainst the vector table of the same size, same filter and mode\n")
        print(format_table(["storage", "rows", "filter", "mode", "recall@10", "vector's recall", "index size",
                            "QPS"], against))  # fmt: skip
    growth = []
    series: dict[str, dict[str, list[tuple[float, float]]]] = {"build s": {}, "index MB": {}, "QPS (no filter)": {}}
    for storage in args.storages:
        points = {
            "build s": [(n, results[(storage, n)]["build s"]) for n in args.sizes],
            "index MB": [(n, results[(storage, n)]["index bytes"] / 2**20) for n in args.sizes],
            "QPS (no filter)": [(n, results[(storage, n)]["search"][("pgsim", "none")][2]) for n in args.sizes],
        }
        growth.append([storage, *(f"{exponent(p):.2f}" for p in points.values())])
        for name, values in points.items():
            series[name][storage] = values
    print("\ngrowth: exponent b of y ~ N^b (least squares over the sizes)\n")
    print(format_table(["storage", "build time", "index size", "QPS, no filter"], growth))
    if args.chart:
        args.chart.mkdir(parents=True, exist_ok=True)
        for name, lines in series.items():
            path = args.chart / f"scale-{name.split()[0].lower()}.svg"
            path.write_text(line_chart(f"{name} against rows", lines, log_y=True, x_title="rows",
                                       x_label="{:,.0f}"))  # fmt: skip
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
