"""bench/long_documents.py's scoring in numpy: multi-vector aggregates over a document's chunk similarities,
MUVERA's fixed-dimensional encodings (Dhulipala et al., 2024), reciprocal rank fusion, and the metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Matrix = np.ndarray[Any, np.dtype[np.float32]]
Aggregate = Callable[[Matrix], float]  # a document's chunk similarities to the query -> its score


def top_mean(m: int, weight: float) -> Aggregate:
    """max + weight * mean of the top-m similarities (of all, when the document has fewer chunks)."""

    def score(sims: Matrix) -> float:
        top = np.sort(sims)[::-1][:m]
        return float(top[0] + weight * top.mean())

    return score


def top_sum(m: int) -> Aggregate:
    """Sum of the top-m similarities (a document with fewer chunks sums fewer)."""

    def score(sims: Matrix) -> float:
        return float(np.sort(sims)[::-1][:m].sum())

    return score


def log_sum_exp(temperature: float, *, mean: bool = False) -> Aggregate:
    """temperature * log(sum (or mean) of exp(sim / temperature)): a soft maximum that rewards more near chunks."""

    def score(sims: Matrix) -> float:
        top = float(sims.max())
        total = np.exp((sims - top) / temperature).sum()
        if mean:
            total /= len(sims)
        return float(top + temperature * np.log(total))

    return score


AGGREGATES: dict[str, Aggregate] = {
    "max (= best chunk)": lambda sims: float(sims.max()),
    "max + 0.1 mean top-3": top_mean(3, 0.1),
    "max + 0.3 mean top-3": top_mean(3, 0.3),
    "sum top-2": top_sum(2),
    "sum top-3": top_sum(3),
    "log-sum-exp t=0.02": log_sum_exp(0.02),
    "log-sum-exp t=0.05": log_sum_exp(0.05),
    "log-mean-exp t=0.05": log_sum_exp(0.05, mean=True),
}


def rerank(
    query: Matrix, candidates: Sequence[int], chunks: dict[int, Matrix], aggregate: Aggregate, k: int
) -> list[int]:
    scores = [aggregate(chunks[doc] @ query) for doc in candidates]
    order = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))
    return [candidates[i] for i in order[:k]]


@dataclass(frozen=True)
class Muvera:
    """FDE settings: ``repetitions`` independent SimHash partitions of ``bits`` hyperplanes (2**bits parts
    each), each part's block projected to ``projection`` dimensions by a random +-1 matrix (0: none)."""

    repetitions: int
    bits: int
    projection: int
    seed: int = 11

    @property
    def dimension(self) -> int:
        return self.repetitions * 2**self.bits * self.projection

    def label(self) -> str:
        return f"R={self.repetitions} bits={self.bits} proj={self.projection} ({self.dimension} dims)"

    def _draws(self, d: int) -> tuple[list[Matrix], list[Matrix]]:
        rng = np.random.default_rng(self.seed)
        planes = [rng.standard_normal((self.bits, d)).astype(np.float32) for _ in range(self.repetitions)]
        signs = [
            (rng.integers(0, 2, (self.projection, d)) * 2 - 1).astype(np.float32) / np.sqrt(self.projection)
            for _ in range(self.repetitions)
        ]
        return planes, signs

    def documents(self, chunks: dict[int, Matrix], ids: Sequence[int]) -> Matrix:
        """One FDE per document: per repetition and part, the mean of its chunks in that part, or where none
        falls there, the chunk whose SimHash is nearest in Hamming distance (the paper's fill_empty); projected."""
        d = next(iter(chunks.values())).shape[1]
        planes, signs = self._draws(d)
        parts = 2**self.bits
        powers = 1 << np.arange(self.bits)
        out = np.zeros((len(ids), self.dimension), dtype=np.float32)
        width = parts * self.projection
        for row, doc in enumerate(ids):
            matrix = chunks[doc]
            for r in range(self.repetitions):
                codes = ((matrix @ planes[r].T) > 0).astype(np.int64) @ powers
                blocks = np.zeros((parts, d), dtype=np.float32)
                for part in range(parts):
                    members = codes == part
                    if members.any():
                        blocks[part] = matrix[members].mean(axis=0)
                    else:
                        hamming = [bin(int(code) ^ part).count("1") for code in codes]
                        blocks[part] = matrix[int(np.argmin(hamming))]
                out[row, r * width : (r + 1) * width] = (blocks @ signs[r].T).ravel()
        return out

    def query(self, vector: Matrix) -> Matrix:
        """The query's FDE: in each repetition, its own vector (projected) in the block of its part."""
        planes, signs = self._draws(len(vector))
        powers = 1 << np.arange(self.bits)
        out = np.zeros(self.dimension, dtype=np.float32)
        width = 2**self.bits * self.projection
        for r in range(self.repetitions):
            part = int(((planes[r] @ vector) > 0).astype(np.int64) @ powers)
            start = r * width + part * self.projection
            out[start : start + self.projection] = signs[r] @ vector
        return out


MUVERAS = (Muvera(5, 3, 48), Muvera(10, 2, 48), Muvera(20, 1, 48), Muvera(2, 1, 384))


def rrf(lists: Sequence[Sequence[int]], k: int, constant: int = 60) -> list[int]:
    scores: dict[int, float] = {}
    for ranked in lists:
        for rank, doc in enumerate(ranked, 1):
            scores[doc] = scores.get(doc, 0.0) + 1 / (constant + rank)
    return sorted(scores, key=lambda doc: (-scores[doc], doc))[:k]


def reciprocal_rank(found: Sequence[int], relevant: frozenset[int], k: int = 10) -> float:
    for rank, doc in enumerate(found[:k], 1):
        if doc in relevant:
            return 1 / rank
    return 0.0


def recall(found: Sequence[int], relevant: frozenset[int], k: int = 10) -> float:
    """Share of the relevant documents in the first k (of at most k of them)."""
    return len(relevant & set(found[:k])) / min(len(relevant), k)


def paired_bootstrap(
    ours: Sequence[float], theirs: Sequence[float], rounds: int = 2000, seed: int = 23
) -> tuple[float, float, float]:
    """The mean of ours - theirs over the same queries and a 95 % interval of it (paired bootstrap: the
    queries resampled with replacement ``rounds`` times, fixed seed)."""
    difference = np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = difference[rng.integers(0, len(difference), (rounds, len(difference)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(difference.mean()), float(low), float(high)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0
