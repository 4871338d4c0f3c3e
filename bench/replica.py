"""Read replicas (issue 20, item 3): search throughput on the primary alone against the primary and a hot
standby together, and the standby's replay lag while the primary's worker backfills.

    python bench/replica.py [--rows 5000] [--more 3000] [--seconds 20] [--clients 2]

The primary is the embedded server; the standby is a second embedded server made from it with
``pg_basebackup -R`` through a replication slot (pgsim.db.server.EmbeddedServer.make_standby), on the same
machine. A table of ``--rows`` Debian packages (their synopses) is registered and embedded on the primary,
then replayed. Searches (``pgsim.search``, k = 10, random synopses of other packages as queries, encoded
before timing) run for ``--seconds`` from ``--clients`` threads, each with its own connection: all on the
primary, all on the standby, then half on each. Then ``--more`` rows are inserted and ``pgsim.sync`` embeds them
on the primary while a thread polls the standby every 0.1 s: bytes of WAL received but not replayed, and how
far its replay position is behind the primary's current one.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_cache import debian_packages  # noqa: E402

import pgsim  # noqa: E402
from pgsim.cli.common import format_table  # noqa: E402
from pgsim.db.connection import resolve_dsn  # noqa: E402
from pgsim.db.server import PORT, EmbeddedServer  # noqa: E402
from pgsim.encoding.encoder import encoder_for  # noqa: E402

TABLE = "bench_replica_pkgs"


def fill(conn: psycopg.Connection[Any], packages: list[Any]) -> None:
    with conn.cursor() as cur, cur.copy(f"COPY {TABLE} (package, section, synopsis) FROM STDIN") as copy:
        for p in packages:
            copy.write_row((p.package, p.section, p.synopsis))


def wait_for_replay(primary: str, standby: str) -> float:
    """Seconds until the standby has replayed what the primary has written so far."""
    started = time.perf_counter()
    with psycopg.connect(primary, autocommit=True) as conn:
        target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
    with psycopg.connect(standby, autocommit=True) as conn:
        while not conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [target]).fetchone()[0]:  # type: ignore[index]
            time.sleep(0.01)
    return time.perf_counter() - started


def searches(dsns: list[str], queries: list[Any], seconds: float) -> tuple[int, list[float], list[int]]:
    """Searches from one thread per DSN for ``seconds``: (count, latencies in ms, count per thread)."""
    latencies: list[list[float]] = [[] for _ in dsns]
    stop = time.perf_counter() + seconds

    def run(number: int, dsn: str) -> None:
        chooser = random.Random(number)
        with pgsim.connect(dsn, autocommit=True) as conn:
            while time.perf_counter() < stop:
                vector = chooser.choice(queries)
                started = time.perf_counter()
                hits = pgsim.search(conn, TABLE, "embedding", vector, k=10)
                latencies[number].append((time.perf_counter() - started) * 1000)
                assert len(hits) == 10

    threads = [threading.Thread(target=run, args=(n, dsn)) for n, dsn in enumerate(dsns)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(map(len, latencies)), [x for each in latencies for x in each], [len(each) for each in latencies]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--more", type=int, default=3000, help="rows the worker backfills while lag is watched")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()

    primary = resolve_dsn(None)
    every = [p for p in debian_packages() if p.synopsis]
    chosen = random.Random(11).sample(every, args.rows + args.more + 200)
    rows, more, held_out = chosen[: args.rows], chosen[args.rows : args.rows + args.more], chosen[-200:]
    encoder = encoder_for("all-MiniLM-L6-v2")
    queries = encoder.encode([p.synopsis for p in held_out], kind="query")
    with pgsim.connect(primary, autocommit=True) as conn:
        pgsim.install(conn)
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(f"CREATE TABLE {TABLE} (package text PRIMARY KEY, section text, synopsis text)")
        fill(conn, rows)
        pgsim.add_embedding(conn, TABLE, "embedding", source="synopsis")
        print(f"embedding {len(rows)} rows on the primary ...", file=sys.stderr, flush=True)
        pgsim.sync(conn, table=TABLE, allow_superuser=True)
        conn.execute(f"ANALYZE {TABLE}")
    slot = f"pgsim_bench_{uuid.uuid4().hex[:8]}"
    directory = Path(tempfile.mkdtemp(prefix="pgsim-bench-standby-"))
    server = EmbeddedServer(directory)
    try:
        print("making the standby (pg_basebackup -R) ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        server.make_standby(primary, slot=slot, durable=False)
        running = server.start()
        standby = make_conninfo(primary, host=str(running.socket_dir), port=str(PORT))
        made = time.perf_counter() - started
        wait_for_replay(primary, standby)
        table = []
        for label, dsns in (
            ("primary alone", [primary] * args.clients),
            ("standby alone", [standby] * args.clients),
            ("primary + standby", [primary if n % 2 == 0 else standby for n in range(args.clients)]),
        ):
            searches(dsns, queries, 2.0)  # warm both servers' caches and plans
            count, latencies, each = searches(dsns, queries, args.seconds)
            cuts = statistics.quantiles(latencies, n=100)
            table.append([label, args.clients, count, f"{count / args.seconds:.0f}", f"{cuts[49]:.1f}",
                          f"{cuts[94]:.1f}", " / ".join(map(str, each))])  # fmt: skip
        for row in table:
            row.insert(4, f"{float(row[3]) / float(table[0][3]):.2f}x")
        print(f"\nstandby made in {made:.1f}s; {len(rows)} rows; pgsim.search k = 10, {args.seconds:.0f}s each\n")
        print(format_table(["servers", "clients", "searches", "QPS", "vs primary", "p50 ms", "p95 ms",
                            "per client"], table))  # fmt: skip
        lag = watch_lag(primary, standby, more)
        print(f"\nreplay lag while pgsim.sync embeds {len(more)} more rows on the primary\n")
        print(format_table(["", "bytes received, not replayed", "bytes behind the primary"], lag))
    finally:
        server.stop()
        with psycopg.connect(primary, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
            pgsim.remove_embedding(conn, TABLE, "embedding")
            conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        shutil.rmtree(directory, ignore_errors=True)


def watch_lag(primary: str, standby: str, more: list[Any]) -> list[list[object]]:
    samples: list[tuple[int, int]] = []
    done = threading.Event()

    def poll() -> None:
        with psycopg.connect(primary, autocommit=True) as p, psycopg.connect(standby, autocommit=True) as s:
            while not done.is_set():
                current = p.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
                row = s.execute(
                    "SELECT pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), "
                    "pg_wal_lsn_diff(%s::pg_lsn, pg_last_wal_replay_lsn())",
                    [current],
                ).fetchone()
                assert row is not None
                samples.append((int(row[0]), max(int(row[1]), 0)))
                time.sleep(0.1)

    with pgsim.connect(primary, autocommit=True) as conn:
        fill(conn, more)
        watcher = threading.Thread(target=poll)
        watcher.start()
        started = time.perf_counter()
        report = pgsim.sync(conn, table=TABLE, allow_superuser=True)
        seconds = time.perf_counter() - started
    caught_up = wait_for_replay(primary, standby)
    done.set()
    watcher.join()
    print(f"(sync: {report.embedded} rows in {seconds:.1f}s; the standby caught up {caught_up:.2f}s after it; "
          f"{len(samples)} samples)", file=sys.stderr)  # fmt: skip
    rows: list[list[object]] = []
    for label, pick in (("median", statistics.median), ("max", max)):
        rows.append([label, f"{pick(s[0] for s in samples):.0f}", f"{pick(s[1] for s in samples):.0f}"])
    return rows


if __name__ == "__main__":
    main()
