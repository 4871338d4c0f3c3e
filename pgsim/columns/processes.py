"""Several worker processes on one queue: ``pgsim worker --processes N`` and ``pgsim backfill --processes N``.

Workers already share pgsim.queue safely (FOR UPDATE SKIP LOCKED, one batch per transaction), so more
encoding capacity is more ``pgsim worker`` processes. Each child gets ``cores // N`` math threads
(OMP_NUM_THREADS, MKL_NUM_THREADS), so N processes do not oversubscribe the cores; one process per core
also overlaps one worker's database writes with another's encoding.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


def threads_per_process(processes: int) -> int:
    return max(1, (os.cpu_count() or 1) // processes)


def worker_command(
    dsn: str,
    table: str | None,
    column: str | None,
    batch_size: int,
    *,
    once: bool,
    poll_interval: float,
    cache: bool = False,
    allow_superuser: bool = False,
    owners: Sequence[str] | None = None,
) -> list[str]:
    command = [sys.executable, "-m", "pgsim.cli", "--dsn", dsn, "worker"]
    command += [name for name in (table, column) if name]
    command += ["--batch-size", str(batch_size), "--poll-interval", str(poll_interval)]
    command += ["--once"] if once else []
    command += ["--cache"] if cache else []
    command += ["--allow-superuser"] if allow_superuser else []
    return command + [argument for owner in owners or () for argument in ("--owner", owner)]


def run_processes(
    command: Sequence[str], processes: int, *, tick: Callable[[], None] | None = None, interval: float = 0.5
) -> int:
    """Run ``processes`` copies of ``command`` with their share of the cores; SIGINT/SIGTERM reach them all.
    ``tick()`` runs every ``interval`` seconds while they run (a progress bar). Returns the worst exit code."""
    threads = str(threads_per_process(processes))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    children = [subprocess.Popen(list(command), env=env) for _ in range(processes)]

    def forward(signum: int, frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while any(child.poll() is None for child in children):
            if tick is not None:
                tick()
            time.sleep(interval)
        if tick is not None:
            tick()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in children:
            if child.poll() is None:
                child.kill()
    return max(child.wait() for child in children)
