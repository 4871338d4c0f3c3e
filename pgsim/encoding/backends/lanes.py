"""Forward passes side by side: :func:`embed_batches` gives a call's batches to as many threads ("lanes")
as the caller has torch threads, each running its passes with its share of them (OpenVINO on a model
compiled with one stream per lane). On small CPUs one single-threaded torch pass per core encodes more than
one pass on every thread, since small matrices and the attention's softmax split badly across threads
(``python bench/encode.py`` measures it: its ``lanes=1`` row).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor

from pgsim.encoding.backends.base import Backend, Matrix, torch_threads


def embed_batches(
    backend: Backend, batches: list[list[str]], lanes: int | None = None
) -> Generator[Matrix, None, None]:
    """``backend.embed`` of each batch, in order. A parallel backend runs ``lanes`` batches at a time (default:
    one per torch thread of the calling thread, at most one per batch) on threads of their own, each with
    ``threads // lanes`` torch threads; the calling thread and every other thread keep theirs. Stopping early
    cancels the batches not yet started. A process that never imported torch (a backend loaded from its
    cached export) has no torch threads to share out, and keeps it so."""
    threads = torch_threads()
    lanes = lane_count(backend, lanes, len(batches))
    embed = backend.for_lanes(lanes).embed
    if lanes == 1:
        yield from map(embed, batches)
        return
    torch = sys.modules.get("torch")
    if torch is None:
        pool = ThreadPoolExecutor(lanes, thread_name_prefix="pgsim-encode")
    else:
        pool = ThreadPoolExecutor(lanes, thread_name_prefix="pgsim-encode", initializer=_lane_threads,
                                  initargs=(max(1, threads // lanes),))  # fmt: skip
    try:
        if torch is not None:
            # torch.set_num_threads sets the calling thread's count and the one threads started later begin
            # with: once every lane has set its own, the count new threads begin with goes back to the caller's.
            ready = threading.Barrier(lanes, timeout=60)
            for started in [pool.submit(ready.wait) for _ in range(lanes)]:
                started.result()
            torch.set_num_threads(threads)
        for future in [pool.submit(embed, batch) for batch in batches]:
            yield future.result()
    finally:
        if torch is not None:
            torch.set_num_threads(threads)
        pool.shutdown(wait=True, cancel_futures=True)


def lane_count(backend: Backend, lanes: int | None, batches: int) -> int:
    """How many lanes :func:`embed_batches` runs ``batches`` batches in: 1 for a backend that is not parallel,
    else ``lanes`` (None: the calling thread's torch threads), at most one per batch."""
    if not backend.parallel:
        return 1
    return max(1, min(torch_threads() if lanes is None else lanes, batches))


def _lane_threads(count: int) -> None:
    import torch

    torch.get_num_threads()  # torch's per-thread set-up, which would later reset the count to the process's
    torch.set_num_threads(count)
