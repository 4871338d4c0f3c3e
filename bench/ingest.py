"""Write paths on the Debian corpus: naive row-by-row vs pgsim.ingest vs trigger + worker, sync lag, HNSW builds.

    python bench/ingest.py [--dsn DSN] [--rows 2000] [--lag-seconds 60] [--overload-seconds 20]

1. Throughput, on ROWS packages (long descriptions), each mode into a fresh table with an HNSW index:
   - encoder alone: ``pgsim.Encoder().encode(all texts)``, the reference (1.00x);
   - naive: what a user writes by hand: ``model.encode(text)``, one INSERT, one commit, per row;
   - ``pgsim.ingest(conn, table, rows)``;
   - the same with ``cache=True``: once with an empty content-hash cache, once more with the same texts;
   - trigger + worker: plain COPY into a registered table (the triggers queue the rows), then the worker
     drains the queue (``pgsim.sync``, the loop ``pgsim worker`` runs): on one connection, and with a
     second one (``overlap_with``: one batch written while the next encodes, as ``pgsim worker`` does).
   Each is split into encode time and write time (everything else: reading, COPY, UPDATE, index inserts).
2. Sync lag with one worker (``pgsim.Worker`` in a thread, woken by NOTIFY): one row committed every 1/R
   seconds at R = half the encoder's measured throughput; lag = commit -> embedding visible (polled every
   20 ms). Then R = 1.5x the throughput for a while: lag grows; the queue drains after; nothing is lost.
3. ``--parts processes``: ``pgsim backfill --processes 1`` and ``2`` on ROWS rows queued by COPY.
   ``--parts hosts``: ``pgsim worker --once`` processes with their own DSNs (``--worker-dsns``, as workers
   on other hosts run), started together on ROWS queued rows: each one's share, rows embedded twice.
   ``--parts overlap``: pgsim.sync on one connection vs two, with the local server sharing the model's
   cores and pinned to a core of its own (a database elsewhere); needs a local server.
4. HNSW build on all ~63k rows (cached embeddings): PostgreSQL's defaults, hand-tuned settings, and
   pgsim's sized build (``pgsim.db.hnsw.create_hnsw_index``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_cache import debian_packages, embeddings  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pgsim.cli.common import format_table  # noqa: E402
from pgsim.columns.adding import add_embedding
from pgsim.columns.bulk_load import ingest  # noqa: E402
from pgsim.columns.registry import registrations, remove_embedding
from pgsim.columns.worker import Worker, sync  # noqa: E402
from pgsim.db.connection import connect, resolve_dsn  # noqa: E402
from pgsim.db.hnsw import HNSW, create_hnsw_index  # noqa: E402
from pgsim.db.schema import install  # noqa: E402
from pgsim.demo.corpus import Package  # noqa: E402
from pgsim.encoding.encoder import (
    Encoder,  # noqa: E402
    encoder_for,
)
from pgsim.psycopg import register

SCHEMA = "bench_ingest"
SOURCE = "concat_ws(E'\\n\\n', synopsis, nullif(description, ''))"  # = Package.text
COLUMNS = ("package", "section", "priority", "installed_size", "source", "synopsis", "description")


def fresh_table(conn: psycopg.Connection[Any], name: str, *, registered: bool) -> str:
    """bench_ingest.<name>: the corpus columns; registered (column, triggers, HNSW index) or with a plain
    vector column and the same HNSW index."""
    table = f"{SCHEMA}.{name}"
    for registration in registrations(conn):
        if registration.table == table:
            remove_embedding(conn, table, registration.column)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(SCHEMA, name)))
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (package text PRIMARY KEY, section text, priority text, installed_size int, "
            "source text, synopsis text, description text)"
        ).format(sql.Identifier(SCHEMA, name))
    )
    if registered:
        add_embedding(conn, table, "embedding", source=SOURCE, index=HNSW())
    else:
        conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN embedding vector(384)").format(sql.Identifier(SCHEMA, name)))
        conn.execute(
            sql.SQL("CREATE INDEX ON {} USING hnsw (embedding vector_cosine_ops)").format(sql.Identifier(SCHEMA, name))
        )
    return table


def row_of(p: Package) -> dict[str, Any]:
    return {name: getattr(p, name) for name in COLUMNS}


def measure_encoder(packages: list[Package]) -> dict[str, Any]:
    encoder = Encoder(warn_truncation=False)
    encoder.encode(["loads the model and its backend, once per process: not throughput"])
    bar = tqdm(total=len(packages), desc="encoder alone", unit="row", file=sys.stderr)
    started = time.perf_counter()
    encoder.encode([p.text for p in packages], progress=lambda done: bar.update(done - bar.n))
    seconds = time.perf_counter() - started
    bar.close()
    return {
        "mode": "encoder alone (reference)",
        "rows": len(packages),
        "seconds": seconds,
        "encode": seconds,
        "write": 0.0,
    }


def measure_naive(conn: psycopg.Connection[Any], packages: list[Package]) -> dict[str, Any]:
    table = fresh_table(conn, "naive", registered=False)
    model = encoder_for("all-MiniLM-L6-v2").model  # the sentence-transformers model, as a user holds it
    insert = sql.SQL("INSERT INTO {} ({}, embedding) VALUES ({}, %s)").format(
        sql.Identifier(*table.split(".")),
        sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
        sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)),
    )
    encode = write = 0.0
    started = time.perf_counter()
    for p in tqdm(packages, desc="naive row by row", unit="row", file=sys.stderr):
        t0 = time.perf_counter()
        vector = model.encode(p.text, normalize_embeddings=True)
        t1 = time.perf_counter()
        conn.execute(insert, [*(getattr(p, name) for name in COLUMNS), np.asarray(vector, dtype=np.float32)])
        write += time.perf_counter() - t1  # autocommit: one commit per row
        encode += t1 - t0
    return {"mode": "naive: encode, INSERT, commit per row", "rows": len(packages),
            "seconds": time.perf_counter() - started, "encode": encode, "write": write}  # fmt: skip


def measure_ingest(conn: psycopg.Connection[Any], packages: list[Package]) -> dict[str, Any]:
    table = fresh_table(conn, "ingested", registered=True)
    bar = tqdm(total=len(packages), desc="pgsim.ingest", unit="row", file=sys.stderr)
    report = ingest(conn, table, [row_of(p) for p in packages], progress=lambda r: bar.update(r.rows - bar.n))
    bar.close()
    assert report.rows == len(packages)
    return {"mode": "pgsim.ingest", "rows": report.rows, "seconds": report.seconds,
            "encode": report.encode_seconds, "write": report.seconds - report.encode_seconds}  # fmt: skip


def measure_cached(conn: psycopg.Connection[Any], packages: list[Package]) -> list[dict[str, Any]]:
    """pgsim.ingest with the content-hash cache: an empty cache (encode, then store), then the same rows
    into a fresh table again (every text found: nothing to encode)."""
    conn.execute("TRUNCATE pgsim.embedding_cache")  # the bench database's cache: start cold
    measured = []
    for phase in ("empty cache: encode + store", "same texts again: all from the cache"):
        table = fresh_table(conn, "cached", registered=True)
        bar = tqdm(total=len(packages), desc=f"pgsim.ingest cache=True, {phase}", unit="row", file=sys.stderr)
        rows = [row_of(p) for p in packages]
        report = ingest(conn, table, rows, progress=lambda r, bar=bar: bar.update(r.rows - bar.n), cache=True)
        bar.close()
        measured.append({"mode": f"pgsim.ingest cache=True, {phase} ({report.cached} cached)", "rows": report.rows,
                         "seconds": report.seconds, "encode": report.encode_seconds,
                         "write": report.seconds - report.encode_seconds})  # fmt: skip
    return measured


def copy_packages(conn: psycopg.Connection[Any], table: str, packages: list[Package]) -> None:
    with (
        conn.cursor() as cur,
        cur.copy(
            sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier(*table.split(".")), sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
            )
        ) as copy,
    ):
        for p in packages:
            copy.write_row([getattr(p, name) for name in COLUMNS])


def measure_worker(
    conn: psycopg.Connection[Any], packages: list[Package], second: psycopg.Connection[Any] | None = None
) -> dict[str, Any]:
    """COPY into a registered table, then drain the queue with pgsim.sync: on one connection (each batch
    encoded, then written), or with ``second`` (one batch written while the next encodes; the worker's way)."""
    table = fresh_table(conn, "synced", registered=True)
    started = time.perf_counter()
    copy_packages(conn, table, packages)
    bar = tqdm(total=len(packages), desc="trigger + worker", unit="row", file=sys.stderr)
    report = sync(conn, table=table, column="embedding", progress=lambda r, _: bar.update(r.done - bar.n),
                  overlap_with=second)  # fmt: skip
    bar.close()
    seconds = time.perf_counter() - started
    assert report.embedded == len(packages), report
    how = "one connection" if second is None else "two connections, overlapped"
    return {"mode": f"COPY, then trigger + worker ({how})", "rows": report.embedded, "seconds": seconds,
            "encode": report.encode_seconds, "write": seconds - report.encode_seconds}  # fmt: skip


def measure_overlap(
    dsn: str, conn: psycopg.Connection[Any], packages: list[Package], rounds: int = 3
) -> list[list[Any]]:
    """pgsim.sync on one connection vs two (``overlap_with``), alternating, ``rounds`` times each; once with the
    model and a local server sharing every core, once with the server pinned to a core of its own (what a
    database on another machine looks like to the worker: its work no longer takes the model's cores)."""
    import torch

    cores = sorted(os.sched_getaffinity(0))
    placements: list[tuple[str, int | None]] = [("model and database share all cores", None)]
    if len(cores) > 1:
        placements.append((f"database pinned to core {cores[-1]}, model on the other {len(cores) - 1}", cores[-1]))
    threads = torch.get_num_threads()
    rows = []
    with psycopg.connect(dsn, autocommit=True) as second:
        for label, database_core in placements:
            server = server_processes(conn)
            if database_core is not None:
                for pid in server:
                    os.sched_setaffinity(pid, {database_core})
                os.sched_setaffinity(0, set(cores) - {database_core})
                torch.set_num_threads(len(cores) - 1)
            rates: dict[str, list[float]] = {"one": [], "two": []}
            for _ in range(rounds):
                for name, other in (("one", None), ("two", second)):
                    result = measure_worker(conn, packages, other)
                    rates[name].append(result["rows"] / result["seconds"])
            for pid in server:
                os.sched_setaffinity(pid, set(cores))
            os.sched_setaffinity(0, set(cores))
            torch.set_num_threads(threads)
            one, two = statistics.mean(rates["one"]), statistics.mean(rates["two"])
            spread = " / ".join(f"{a:.0f}, {b:.0f}" for a, b in zip(rates["one"], rates["two"], strict=True))
            rows.append([label, f"{one:.1f}", f"{two:.1f}", f"{two / one:.2f}x", spread])
    return rows


def server_processes(conn: psycopg.Connection[Any]) -> list[int]:
    """The local server's postmaster and its children (every backend forks from it), by /proc."""
    (directory,) = conn.execute("SHOW data_directory").fetchone()  # type: ignore[misc]
    postmaster = int((Path(directory) / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                children.append(int(entry.name))
    return [postmaster, *children]


def measure_processes(dsn: str, conn: psycopg.Connection[Any], packages: list[Package]) -> list[list[object]]:
    """`pgsim backfill --processes P` (a subprocess, as a user runs it) on rows queued by COPY; the steady rate
    runs from the first embedded row to the last, so model loading is left out of it."""
    import subprocess

    rows: list[list[object]] = []
    for processes in (1, 2):
        table = fresh_table(conn, f"pooled{processes}", registered=True)
        copy_packages(conn, table, packages)
        command = [sys.executable, "-m", "pgsim.cli", "--dsn", dsn, "backfill", table, "embedding"]
        started = time.perf_counter()
        child = subprocess.Popen([*command, "--processes", str(processes)], stdout=subprocess.DEVNULL)
        total, steady = drained(conn, table, len(packages), [child], started)
        rows.append([processes, len(packages), f"{total:.1f}", f"{len(packages) / total:.1f}", f"{steady:.1f}"])
    for row in rows:
        row.append(f"{float(row[4]) / float(rows[0][4]):.2f}x")
    return rows


def drained(
    conn: psycopg.Connection[Any], table: str, total_rows: int, children: list[Any], started: float
) -> tuple[float, float]:
    """Wait for ``children`` to embed all ``total_rows`` rows of ``table``: (seconds since ``started``, steady
    rows/s from the first embedded row to the last)."""
    first = last = None
    count = sql.SQL("SELECT count(embedding) FROM {}").format(sql.Identifier(*table.split(".")))
    while any(child.poll() is None for child in children) or last is None:
        done = conn.execute(count).fetchone()[0]  # type: ignore[index]
        now = time.perf_counter()
        if done and first is None:
            first = (now, done)
        if done == total_rows:
            last = now
            break
        if all(child.poll() is not None for child in children):
            raise RuntimeError(f"the workers exited with {done} of {total_rows} rows embedded")
        time.sleep(0.05)
    for child in children:
        child.wait()
    assert first is not None and last is not None
    return time.perf_counter() - started, (total_rows - first[1]) / max(last - first[0], 1e-9)


def measure_hosts(dsns: list[str], conn: psycopg.Connection[Any], packages: list[Package]) -> list[list[object]]:
    """`pgsim worker --once` processes, one per DSN in ``dsns`` (as workers on other hosts run, each with its
    own), started together on rows queued by COPY; first the first DSN's alone. Each process's share of the
    rows (from its summary line), and whether any row was embedded twice (the shares add up to more)."""
    import subprocess

    rows: list[list[object]] = []
    for group in ([dsns[0]], dsns):
        table = fresh_table(conn, f"hosts{len(group)}", registered=True)
        copy_packages(conn, table, packages)
        started = time.perf_counter()
        children = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pgsim.cli",
                    "--dsn",
                    dsn,
                    "worker",
                    table,
                    "embedding",
                    "--once",
                    "--batch-size",
                    "32",
                ],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(group)))},
            )  # fmt: skip
            for dsn in group
        ]
        total, steady = drained(conn, table, len(packages), children, started)
        shares = [int(child.communicate()[0].strip().splitlines()[-1].split(" rows embedded")[0]) for child in children]
        rows.append([len(group), len(packages), " / ".join(map(str, shares)), sum(shares) - len(packages),
                     f"{total:.1f}", f"{steady:.1f}"])  # fmt: skip
    for row in rows:
        row.append(f"{float(row[5]) / float(rows[0][5]):.2f}x")
    return rows


def measure_lag(
    dsn: str, conn: psycopg.Connection[Any], packages: list[Package], rate: float, seconds: float, label: str
) -> dict[str, Any]:
    """Insert at ``rate`` rows/s for ``seconds`` with one worker running; lag of every row."""
    table = f"{SCHEMA}.lagged"
    worker = Worker(dsn, table=table, column="embedding", poll_interval=5.0)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    committed: dict[str, float] = {}
    seen: dict[str, float] = {}
    insert = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        sql.Identifier(*table.split(".")),
        sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
        sql.SQL(", ").join(sql.Placeholder() * len(COLUMNS)),
    )
    stop_polling = threading.Event()

    def poll() -> None:
        with psycopg.connect(dsn, autocommit=True) as poller:
            while not stop_polling.is_set() or len(seen) < len(committed):
                pending = [key for key in committed if key not in seen]
                if pending:
                    rows = poller.execute(
                        sql.SQL("SELECT package FROM {} WHERE package = ANY(%s) AND embedding IS NOT NULL").format(
                            sql.Identifier(*table.split("."))
                        ),
                        [pending],
                    ).fetchall()
                    now = time.monotonic()
                    for (key,) in rows:
                        seen[key] = now
                time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    started = time.monotonic()
    count = int(rate * seconds)
    for i, p in enumerate(tqdm(packages[:count], desc=f"lag at {rate:.0f} rows/s", unit="row", file=sys.stderr)):
        due = started + i / rate
        if due > time.monotonic():
            time.sleep(due - time.monotonic())
        conn.execute(insert, [getattr(p, name) for name in COLUMNS])
        committed[p.package] = time.monotonic()
    inserted_for = time.monotonic() - started
    stop_polling.set()
    poller.join(timeout=600)
    drained = time.monotonic() - started - inserted_for
    worker.stop.set()
    thread.join(timeout=60)
    lags = sorted(seen[key] - committed[key] for key in committed)
    window = 5.0  # mean lag of the rows committed in each 5-second window: how lag grows over time
    buckets: dict[int, list[float]] = {}
    for key, at in committed.items():
        buckets.setdefault(int((at - started) // window), []).append(seen[key] - at)
    lost = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE embedding IS NULL").format(sql.Identifier(*table.split(".")))
    ).fetchone()
    return {
        "phase": label,
        "rate": f"{count / inserted_for:.1f}",
        "rows": count,
        "p50": statistics.median(lags),
        "p95": lags[int(0.95 * (len(lags) - 1))],
        "max": lags[-1],
        "drain after": drained,
        "unembedded": lost[0] if lost else None,
        "reconnects": worker.reconnects,
        "over time": " ".join(f"{statistics.mean(buckets[b]):.1f}" for b in sorted(buckets)),
    }


def measure_builds(
    conn: psycopg.Connection[Any], packages: list[Package], vectors: np.ndarray[Any, Any]
) -> list[list[Any]]:
    conn.execute(f"DROP TABLE IF EXISTS {SCHEMA}.full_corpus")
    conn.execute(f"CREATE TABLE {SCHEMA}.full_corpus (package text PRIMARY KEY, embedding vector(384))")
    with (
        conn.cursor() as cur,
        cur.copy(
            f"COPY {SCHEMA}.full_corpus FROM STDIN WITH (FORMAT BINARY)"  # noqa: S608 - constant names
        ) as copy,
    ):
        copy.set_types(["text", "vector"])
        for p, vector in zip(packages, vectors, strict=True):
            copy.write_row((p.package, vector))
    conn.execute(f"VACUUM ANALYZE {SCHEMA}.full_corpus")
    create = f"CREATE INDEX build_test ON {SCHEMA}.full_corpus USING hnsw (embedding vector_cosine_ops)"
    results = []
    for label, memory, workers in (
        ("PostgreSQL defaults", None, None),
        ("hand-tuned: 1 GB, 0 workers", "1GB", 0),
        ("hand-tuned: 1 GB, 1 worker", "1GB", 1),
        ("hand-tuned: 1 GB, 2 workers", "1GB", 2),
        ("pgsim (sized)", "pgsim", None),
    ):
        conn.execute(f"DROP INDEX IF EXISTS {SCHEMA}.build_test")
        conn.execute("RESET maintenance_work_mem")
        conn.execute("RESET max_parallel_maintenance_workers")
        started = time.perf_counter()
        if memory == "pgsim":
            report = create_hnsw_index(conn, f"{SCHEMA}.full_corpus", "embedding", "build_test", HNSW())
            setting = f"{report.settings.maintenance_work_mem_mb} MB, {report.settings.parallel_workers} workers"
        else:
            if memory:
                conn.execute(f"SET maintenance_work_mem = '{memory}'")
                conn.execute(f"SET max_parallel_maintenance_workers = {workers}")
            conn.execute(create)
            setting = conn.execute(
                "SELECT current_setting('maintenance_work_mem') || ', ' || "
                "current_setting('max_parallel_maintenance_workers') || ' workers'"
            ).fetchone()[0]  # type: ignore[index]
        seconds = time.perf_counter() - started
        print(f"  {label}: {seconds:.1f}s ({setting})", file=sys.stderr, flush=True)
        results.append([label, setting, seconds])
    conn.execute("RESET maintenance_work_mem")
    conn.execute("RESET max_parallel_maintenance_workers")
    best = min(seconds for label, _, seconds in results if label.startswith("hand-tuned"))
    return [[label, setting, f"{seconds:.1f}", f"{seconds / best:.2f}x"] for label, setting, seconds in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="default: $PGSIM_DSN, else the embedded server")
    parser.add_argument("--rows", type=int, default=2000, help="packages per throughput mode")
    parser.add_argument("--lag-seconds", type=float, default=60.0)
    parser.add_argument("--overload-seconds", type=float, default=20.0)
    parser.add_argument(
        "--parts",
        default="throughput,lag,builds",
        help="comma-separated subset of throughput, lag, builds, processes, overlap, hosts",
    )
    parser.add_argument(
        "--worker-dsns",
        nargs="+",
        help="for --parts hosts: one pgsim worker process per DSN (default: --dsn twice)",
    )
    args = parser.parse_args()

    packages = [p for p in debian_packages() if p.description]
    dsn = resolve_dsn(args.dsn)
    conn = connect(dsn)
    install(conn)
    register(conn)
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    chosen = packages[: args.rows]
    encoder_for("all-MiniLM-L6-v2").encode(["warm up"])
    parts = set(args.parts.split(","))
    if "throughput" in parts or "lag" in parts:
        measure_write_paths(dsn, conn, packages, chosen, args, parts)
    if "processes" in parts:
        pooled = measure_processes(dsn, conn, chosen)
        print(f"\npgsim backfill --processes P on {len(chosen)} queued rows ({os.cpu_count()} cores)\n")
        print(format_table(["processes", "rows", "seconds", "rows/s", "steady rows/s", "vs 1 process"], pooled))
    if "hosts" in parts:
        hosts = measure_hosts(args.worker_dsns or [dsn, dsn], conn, chosen)
        print(f"\npgsim worker --once, one process per DSN, on {len(chosen)} queued rows ({os.cpu_count()} cores)\n")
        print(format_table(["processes", "rows", "rows each", "twice", "seconds", "steady rows/s", "vs 1"], hosts))
    if "overlap" in parts:
        overlapped = measure_overlap(dsn, conn, chosen)
        print(f"\npgsim.sync on one connection vs two (overlap_with), {len(chosen)} rows, rows/s (mean of 3)\n")
        print(format_table(["placement", "one connection", "two connections", "ratio", "each round"], overlapped))
    if "builds" in parts:
        print("\nHNSW build (m=16, ef_construction=64) on the whole corpus; building ...", file=sys.stderr)
        every = debian_packages()
        vectors = embeddings([p.text for p in every])
        builds = measure_builds(conn, every, vectors)
        print(f"\nHNSW build on {len(every)} x 384 (vs the best hand-tuned)\n")
        print(format_table(["settings", "as set", "seconds", "vs best hand-tuned"], builds))


def measure_write_paths(
    dsn: str,
    conn: psycopg.Connection[Any],
    packages: list[Package],
    chosen: list[Package],
    args: argparse.Namespace,
    parts: set[str],
) -> None:
    if "throughput" not in parts:  # the lag phase still needs the encoder's rate
        reference = len(chosen) / measure_encoder(chosen)["seconds"]
        measure_lags(dsn, conn, packages, reference, args)
        return
    throughput = [
        measure_encoder(chosen),
        measure_naive(conn, chosen),
        measure_ingest(conn, chosen),
        *measure_cached(conn, chosen),
        measure_worker(conn, chosen),
    ]
    with psycopg.connect(dsn, autocommit=True) as second:
        throughput.append(measure_worker(conn, chosen, second))
    reference = throughput[0]["rows"] / throughput[0]["seconds"]
    print(f"\nThroughput: {args.rows} Debian packages (synopsis + long description), HNSW index present\n")
    print(
        format_table(
            ["mode", "rows", "seconds", "rows/s", "vs encoder", "encode s", "write s", "write share"],
            [
                [
                    t["mode"],
                    t["rows"],
                    f"{t['seconds']:.1f}",
                    f"{t['rows'] / t['seconds']:.1f}",
                    f"{t['rows'] / t['seconds'] / reference:.2f}x",
                    f"{t['encode']:.1f}",
                    f"{t['write']:.2f}",
                    f"{t['write'] / t['seconds']:.1%}",
                ]
                for t in throughput
            ],  # fmt: skip
            max_width=40,
        )
    )

    if "lag" in parts:
        measure_lags(dsn, conn, packages, reference, args)


def measure_lags(
    dsn: str, conn: psycopg.Connection[Any], packages: list[Package], reference: float, args: argparse.Namespace
) -> None:
    lag_rows = packages[args.rows :]
    fresh_table(conn, "lagged", registered=True)
    half = measure_lag(dsn, conn, lag_rows, reference / 2, args.lag_seconds, "0.5x encoder throughput")
    over = measure_lag(
        dsn, conn, lag_rows[int(reference / 2 * args.lag_seconds) :], reference * 1.5, args.overload_seconds,
        "1.5x encoder throughput",
    )  # fmt: skip
    print("\nSync lag, one worker (commit -> embedding visible, seconds)\n")
    lag_table = [
        [r["phase"], r["rate"], r["rows"], f"{r['p50']:.2f}", f"{r['p95']:.2f}", f"{r['max']:.2f}",
         f"{r['drain after']:.1f}", r["unembedded"]]
        for r in (half, over)
    ]  # fmt: skip
    print(
        format_table(
            ["insert rate", "rows/s", "rows", "p50", "p95", "max", "drained after s", "left unembedded"], lag_table
        )
    )
    for r in (half, over):
        print(f"mean lag of the rows committed in each 5 s, at {r['phase']}: {r['over time']}")


if __name__ == "__main__":
    main()
