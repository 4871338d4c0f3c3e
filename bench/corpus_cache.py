"""The full Debian corpus for benchmarks, built once from apt's lists, and its embeddings, encoded once;
both cached in bench/.cache/ (encoding 63k descriptions takes a quarter of an hour on 2 cores)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pgsim.demo.corpus import Package, read_apt, read_jsonl, write_jsonl

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
CORPUS = CACHE_DIR / "debian-packages.jsonl.gz"


def debian_packages() -> list[Package]:
    if not CORPUS.exists():
        CACHE_DIR.mkdir(exist_ok=True)
        print(f"building the Debian corpus from apt's lists into {CORPUS} ...", flush=True)
        write_jsonl(read_apt(), CORPUS)
    return read_jsonl(CORPUS)


def embeddings(texts: list[str], model: str = "all-MiniLM-L6-v2") -> np.ndarray[Any, np.dtype[np.float32]]:
    """float32 embeddings of ``texts`` (blank text gives a zero row), cached by the texts' hash and the model."""
    from tqdm import tqdm

    from pgsim.encoding.encoder import Encoder

    digest = hashlib.sha256("\x00".join([model, *texts]).encode()).hexdigest()[:16]
    path = CACHE_DIR / f"embeddings-{model.replace('/', '_')}-{digest}.npy"
    if path.exists():
        return np.load(path)
    encoder = Encoder(model, warn_truncation=False)
    bar = tqdm(total=len(texts), desc=f"encoding {len(texts)} texts (cached after)", unit="text", file=sys.stderr)
    vectors = encoder.encode(texts, progress=lambda done: bar.update(done - bar.n))
    bar.close()
    matrix = np.zeros((len(texts), encoder.dimension), dtype=np.float32)
    for row, vector in enumerate(vectors):
        if vector is not None:
            matrix[row] = vector
    CACHE_DIR.mkdir(exist_ok=True)
    np.save(path, matrix)
    return matrix
