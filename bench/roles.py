"""What least privilege costs the worker: its claim statement run by pgsim's owner (row-level security on
pgsim.queue does not apply) and by a worker role (the policy's predicate per row), same queue, same run.

    python bench/roles.py [--dsn DSN] [--queued 20000] [--rounds 200]

The DSN must be a superuser's (it makes a scratch database and a role, and drops both). Each round claims
one batch with pgsim's own statement (FOR UPDATE SKIP LOCKED) in a transaction and commits without
deleting, so every round sees the same queue. No model is loaded: encoding is not what is measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pgsim  # noqa: E402
from pgsim.cli.common import format_table  # noqa: E402
from pgsim.columns.batches import CLAIM  # noqa: E402
from pgsim.columns.worker import DEFAULT_BATCH_SIZE  # noqa: E402


def claim_ms(conn: psycopg.Connection[Any], registration: int, rounds: int) -> tuple[float, float]:
    """Median and 95th percentile of one claim, in milliseconds, after a few unmeasured rounds."""
    times = []
    for round_ in range(rounds + 20):
        with conn.transaction():
            started = time.perf_counter()
            conn.execute(CLAIM, {"registration": registration, "retried": False, "limit": DEFAULT_BATCH_SIZE})
            if round_ >= 20:
                times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.95)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", help="a superuser's DSN (default: the embedded server)")
    parser.add_argument("--queued", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    admin = pgsim.connect(args.dsn)
    name, role = f"pgsim_bench_roles_{uuid.uuid4().hex[:8]}", f"pgsim_bench_worker_{uuid.uuid4().hex[:8]}"
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    params = conninfo_to_dict(admin.info.dsn)
    try:
        with pgsim.connect(make_conninfo(**{**params, "dbname": name})) as owner:
            owner.execute("CREATE EXTENSION IF NOT EXISTS vector")
            pgsim.install(owner)
            owner.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
            owner.execute("INSERT INTO docs SELECT g, 'text ' || g FROM generate_series(1, %s) g", [args.queued])
            registration = pgsim.add_embedding(owner, "docs", "embedding", source="body", index=None)
            pgsim.grant(owner, "worker", role)
            with psycopg.connect(make_conninfo(**{**params, "dbname": name, "user": role}), autocommit=True) as worker:
                rows = [
                    (who, *claim_ms(conn, registration.id, args.rounds))
                    for who, conn in (("pgsim's owner (no row-level security)", owner), ("worker role", worker))
                ]
        base = rows[0][1]
        print(f"claim of {DEFAULT_BATCH_SIZE} entries, {args.queued} queued, {args.rounds} rounds")
        print(format_table(["who claims", "median ms", "p95 ms", "median / owner's"],
                           [(*row, row[1] / base) for row in rows]))  # fmt: skip
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


if __name__ == "__main__":
    sys.exit(main())
