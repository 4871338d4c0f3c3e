"""How ``auto`` times its candidates so that other processes' load does not decide the choice.

- **Interleaved rounds.** After a warm-up pass each, the candidates are timed in ``ROUNDS`` rounds, each
  round one pass of every candidate in a rotated order, and each keeps its best round: load that comes and
  goes (another process starting, a test suite finishing) slows one round, not one candidate.
- **Corrected for the rest of the machine.** A pass's wall time, less the CPU time every other process
  took meanwhile (``/proc/stat`` against this process's ``time.process_time``) shared over the cores,
  estimates how long it takes on a quiet machine; never less than this process's own CPU time spread over
  its torch threads (a pass cannot be faster than all its threads busy). Steady load (two busy processes
  on two cores) halves every wall rate but leaves the estimates where a quiet machine puts them. Where
  ``/proc/stat`` is missing, the wall time stands.
- **A prior from the instruction set.** On a CPU that computes in bfloat16 natively (AVX-512 BF16, AMX),
  a float32 backend beating every bfloat16 one is implausible: the candidates are measured once more and
  the better of both measurements decides (:func:`implausible`). A remembered choice from an older,
  wall-clock measurement that the prior finds implausible is measured again.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from pgsim.encoding.backends.base import Backend
from pgsim.encoding.backends.lanes import embed_batches

ROUNDS = 3
METHOD = "rounds-corrected"  # recorded with a choice; choices without it were timed by wall clock alone
# Two candidates within this fraction of each other are a tie: either is a good choice. One backend's
# best-of-rounds rate moves by up to about this much between runs on one machine, quiet or busy.
TIE_MARGIN = 0.15
FLOAT32_ONLY = ("torch", "onnx")  # backends that never compute in bfloat16


@dataclass
class Timing:
    wall: float  # seconds
    ours: float  # CPU seconds of this process
    others: float  # CPU seconds of every other process (and the hypervisor's steal) meanwhile

    def quiet_seconds(self, threads: int, cores: int) -> float:
        """The pass's duration on a quiet machine, estimated."""
        return max(self.wall - self.others / cores, self.ours / max(1, min(threads, cores)), 1e-6)


def rates(
    candidates: dict[str, Backend], batches: list[list[str]], rounds: int = ROUNDS
) -> tuple[dict[str, float], float]:
    """Each candidate's best estimated quiet-machine rate (texts/s) over ``rounds`` interleaved rounds, and
    the largest share of the machine other processes took during a pass (0: quiet, 1: every core)."""
    import torch

    texts = sum(len(batch) for batch in batches)
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    best = dict.fromkeys(candidates, 0.0)
    load = 0.0
    names = list(candidates)
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            timing = timed_pass(candidates[name], batches)
            best[name] = max(best[name], texts / timing.quiet_seconds(threads, cores))
            load = max(load, min(1.0, timing.others / (cores * timing.wall)))
    return best, load


def timed_pass(backend: Backend, batches: list[list[str]]) -> Timing:
    """One pass over ``batches`` as the Encoder runs them, timed."""
    busy_before = machine_busy_seconds()
    ours_before, started = time.process_time(), time.perf_counter()
    for _batch in embed_batches(backend, batches):
        pass
    wall, ours = time.perf_counter() - started, time.process_time() - ours_before
    busy_after = machine_busy_seconds()
    others = 0.0 if busy_before is None or busy_after is None else max(0.0, busy_after - busy_before - ours)
    return Timing(wall, ours, others)


def machine_busy_seconds() -> float | None:
    """CPU seconds every CPU of the machine spent on anything but idling since boot (Linux), else None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is counted in user already)
    ticks = [int(value) for value in fields[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / (os.sysconf("SC_CLK_TCK") or 100)


def native_bfloat16() -> bool:
    """Whether the CPU computes in bfloat16 natively (Linux's flags; elsewhere: not known, so no)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f" {flag}" in text for flag in ("avx512_bf16", "amx_bf16"))


def implausible(winner: str, candidates: list[str]) -> bool:
    """Whether a float32 backend winning against bfloat16 ones (among ``candidates``, those whose vectors
    passed) contradicts what the CPU's instructions predict."""
    return native_bfloat16() and winner in FLOAT32_ONLY and any(name not in FLOAT32_ONLY for name in candidates)


def ties(measured: dict[str, float], margin: float = TIE_MARGIN) -> set[str]:
    """The candidates within ``margin`` of the best rate: the ones a choice may fairly fall on."""
    top = max(measured.values())
    return {name for name, rate in measured.items() if rate >= top * (1 - margin)}
