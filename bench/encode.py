"""Encoder throughput on Debian long descriptions: pgsim's Encoder and its backends vs the ways a user would
call the model.

    python bench/encode.py [--texts 5000] [--naive-texts 1000] [--queries 200]

Same run, same texts, same model (all-MiniLM-L6-v2 from its wheel):
- naive:  model.encode(text) once per text (the row-by-row baseline), timed on the first --naive-texts texts;
- raw:    one model.encode(all_texts) call with sentence-transformers' defaults (the 1.00x reference);
- pgsim:  pgsim.Encoder(backend=...).encode(all_texts) for each backend, and for "auto" (what it chose);
          torch-bf16 once more with lanes=1 (one forward pass at a time on all threads) to show what the
          lanes (one pass per thread side by side, the default) add.
Quality against float32: top-10 neighbour agreement of --queries texts used as queries over all texts, and
the minimum cosine between a backend's vector and float32's for the same text. GFLOP/s counts 2 FLOP per
weight per real (not padding) token, plus attention; the peak assumes two 512-bit FMA units per core.
The corpus comes from this machine's apt lists (see pgsim/demo/corpus.py) and is cached in bench/.cache/.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_cache import debian_packages  # noqa: E402

from pgsim.cli.common import format_table  # noqa: E402
from pgsim.encoding.backends.base import BACKENDS  # noqa: E402
from pgsim.encoding.encoder import Encoder
from pgsim.encoding.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=5000)
    parser.add_argument("--naive-texts", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    import torch
    from tqdm import tqdm

    described = [p for p in debian_packages() if p.description]
    texts = [p.text for p in random.Random(11).sample(described, args.texts)]
    model = load_model("all-MiniLM-L6-v2")
    model.encode(texts[:64])  # warm-up: first calls pay for lazy initialisation
    token_ids = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]
    tokens = sum(len(ids) for ids in token_ids)
    flop = flop_per_text_set(model, token_ids)
    peak = peak_gflops()
    print(
        f"{len(texts)} texts, {tokens} tokens (mean {tokens / len(texts):.0f} after truncation to "
        f"{model.max_seq_length}), torch threads {torch.get_num_threads()}, est. {flop / 1e9:.0f} GFLOP in all; "
        f"peak {peak:.0f} GFLOP/s fp32, {2 * peak:.0f} bf16",
        flush=True,
    )

    started = time.perf_counter()
    naive = [model.encode(t) for t in tqdm(texts[: args.naive_texts], desc="naive", unit="text", file=sys.stderr)]
    naive_rate = args.naive_texts / (time.perf_counter() - started)

    started = time.perf_counter()
    raw = model.encode(texts, normalize_embeddings=True, show_progress_bar=True)
    raw_seconds = time.perf_counter() - started

    results: dict[str, tuple[float, np.ndarray]] = {}
    chosen = ""
    with tempfile.TemporaryDirectory() as cache:  # "auto" measures afresh; exports land here
        os.environ["PGSIM_CACHE_DIR"] = cache
        for backend, lanes in [*((b, None) for b in BACKENDS), ("torch-bf16", 1), ("auto", None)]:
            label = backend if lanes is None else f"{backend}, lanes={lanes}"
            encoder = Encoder(backend=backend, warn_truncation=False, lanes=lanes)
            encoder.encode(texts[:64])  # loads, exports or chooses; not timed
            if backend == "auto":
                chosen = encoder.backend.name
            bar = tqdm(total=len(texts), desc=f"pgsim {label}", unit="text", file=sys.stderr)
            started = time.perf_counter()
            vectors = encoder.encode(texts, progress=lambda done, bar=bar: bar.update(done - bar.n))
            results[label] = (time.perf_counter() - started, np.stack(vectors))  # type: ignore[arg-type]
            bar.close()

    reference = results["torch"][1]
    queries = reference[: args.queries]
    truth = top10(queries, reference)
    naive_matrix = np.stack(naive) / np.linalg.norm(np.stack(naive), axis=1, keepdims=True)
    rows: list[list[object]] = [
        [
            "naive: model.encode(text) per text",
            f"{naive_rate:.1f}",
            "-",
            f"{naive_rate * raw_seconds / len(texts):.2f}x",
            "-",
            f"{float(np.min(np.sum(naive_matrix * reference[: len(naive)], axis=1))):.5f}",
            "-",
        ],  # fmt: skip
        [
            "raw: model.encode(all texts)",
            f"{len(texts) / raw_seconds:.1f}",
            f"{tokens / raw_seconds:.0f}",
            "1.00x",
            agreement(truth, top10(raw[: args.queries], raw)),
            f"{float(np.min(np.sum(raw * reference, axis=1))):.5f}",
            f"{flop / raw_seconds / 1e9:.0f}",
        ],  # fmt: skip
    ]
    for backend, (seconds, vectors) in results.items():
        label = f"pgsim backend={backend}" + (f" (chose {chosen})" if backend == "auto" else "")
        rows.append(
            [
                label,
                f"{len(texts) / seconds:.1f}",
                f"{tokens / seconds:.0f}",
                f"{raw_seconds / seconds:.2f}x",
                agreement(truth, top10(vectors[: args.queries], vectors)),
                f"{float(np.min(np.sum(vectors * reference, axis=1))):.5f}",
                f"{flop / seconds / 1e9:.0f}",
            ]
        )
    print(format_table(["mode", "texts/s", "tokens/s", "vs raw", "top-10 agreement", "min cosine", "GFLOP/s"], rows))
    print("agreement and cosine are against pgsim backend=torch (float32) on the same texts")


def top10(queries: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    scores = queries @ corpus.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


def agreement(truth: np.ndarray, found: np.ndarray) -> str:
    return f"{np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)]):.3f}"


def flop_per_text_set(model: object, token_ids: list[list[int]]) -> float:
    """2 FLOP per weight per token in the encoder layers, plus QK^T and AV (2 x 2 x n^2 x hidden per layer)."""
    transformer = model[0].auto_model  # type: ignore[index]
    config = transformer.config
    weights = sum(p.numel() for name, p in transformer.named_parameters() if "embeddings" not in name)
    per_token = 2 * weights
    attention = sum(4 * len(ids) ** 2 * config.hidden_size * config.num_hidden_layers for ids in token_ids)
    return float(per_token * sum(len(ids) for ids in token_ids) + attention)


def peak_gflops() -> float:
    """cores x clock x 64 FLOP/cycle (two 512-bit FMA units, fp32); an estimate, not a measurement."""
    mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines() if "cpu MHz" in line]
    return len(mhz) * (max(mhz) / 1000 if mhz else 2.0) * 64


if __name__ == "__main__":
    main()
