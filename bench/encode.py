"""Encoder throughput on Debian long descriptions and on one-line synopses: pgsim's Encoder and its backends vs
the ways a user would call the model; and the time a new process takes to its first query.

    python bench/encode.py [--texts 5000] [--short-texts 3000] [--naive-texts 1000] [--queries 200]
                           [--runs 5] [--before REV] [--sections long,short,first-query]

Throughput (sections long and short), same run, same texts, same model (all-MiniLM-L6-v2 from its wheel):
- naive:  model.encode(text) once per text (the row-by-row baseline), timed on the first --naive-texts texts;
- raw:    one model.encode(all_texts) call with sentence-transformers' defaults (the 1.00x reference);
- pgsim:  pgsim.Encoder(backend=...).encode(all_texts) for each backend, and for "auto" (what it chose);
          torch-bf16 once more with lanes=1 (one forward pass at a time on all threads) to show what the
          lanes (one pass per thread side by side, the default) add. Each encoder first encodes 256 of the
          texts untimed (loading, exporting, choosing, and starting its lanes).
Quality against float32: top-10 neighbour agreement of --queries texts used as queries over all texts, and
the minimum cosine between a backend's vector and float32's for the same text. GFLOP/s counts 2 FLOP per
weight per real (not padding) token, plus attention; the peak assumes two 512-bit FMA units per core.

First query (section first-query): wall time of new processes, --runs of each, interleaved, against an
embedded PostgreSQL of the bench's own holding 2,000 synopses in a registered column: the library
(`import pgsim; pgsim.Encoder().encode_query(...)`), the CLI (`pgsim search ...`), the same with
PGSIM_BACKEND=onnx and =torch, `import pgsim` alone, and with --before REV the library and the CLI of that
git revision's pgsim (extracted with git archive). The user's cache directory is used as it is (a machine
that has run pgsim before), after one untimed run of each. Then 2,000 synopses encoded by a new process
against the same backend built through torch in this process, and against float32.
The corpus comes from this machine's apt lists (see pgsim/demo/corpus.py) and is cached in bench/.cache/.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    parser.add_argument("--short-texts", type=int, default=3000)
    parser.add_argument("--naive-texts", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5, help="new processes per first-query row")
    parser.add_argument("--before", default="", help="a git revision whose pgsim is the first query's 'before'")
    parser.add_argument("--sections", default="long,short,first-query")
    args = parser.parse_args()
    sections = set(args.sections.split(","))

    described = [p for p in debian_packages() if p.description]
    sample = random.Random(11).sample(described, max(args.texts, args.short_texts))
    if "long" in sections:
        print("\n## long texts: Debian descriptions (synopsis and long description)")
        throughput([p.text for p in sample[: args.texts]], args)
    if "short" in sections:
        print("\n## short texts: Debian synopses (one line)")
        throughput(list(dict.fromkeys(p.synopsis for p in sample))[: args.short_texts], args)
    if "first-query" in sections:
        print("\n## first query in a new process")
        first_query([p.synopsis for p in sample[:2000]], args.runs, args.before)


def throughput(texts: list[str], args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

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

    naive_texts = texts[: args.naive_texts]
    started = time.perf_counter()
    naive = [model.encode(t) for t in tqdm(naive_texts, desc="naive", unit="text", file=sys.stderr)]
    naive_rate = len(naive_texts) / (time.perf_counter() - started)

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
            # not timed: loading, exporting or choosing, and enough batches that the lanes start (OpenVINO
            # compiles a model per lane count) also on short texts, where 64 texts make a single batch
            encoder.encode(texts[:256])
            if backend == "auto":
                chosen = encoder.backend.name
            bar = tqdm(total=len(texts), desc=f"pgsim {label}", unit="text", file=sys.stderr)
            started = time.perf_counter()
            vectors = encoder.encode(texts, progress=lambda done, bar=bar: bar.update(done - bar.n))
            results[label] = (time.perf_counter() - started, np.stack(vectors))  # type: ignore[arg-type]
            bar.close()
        del os.environ["PGSIM_CACHE_DIR"]

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
    print("agreement and cosine are against pgsim backend=torch (float32) on the same texts", flush=True)


FIRST_TABLE = "pgsim_bench_encode.first_query"
QUERY = "resize images from the command line"
LIBRARY = f"import pgsim; pgsim.Encoder().encode_query({QUERY!r})"
CLI = f"from pgsim.cli.main import main; main(['search', {QUERY!r}, '--table', {FIRST_TABLE!r}])"
HEAVY = "[m for m in ('torch', 'sentence_transformers') if m in sys.modules]"
REPORT = f"; import sys; print('heavy:', {HEAVY}, file=sys.stderr)"
ENCODE = """
import json, sys, numpy as np, pgsim
encoder = pgsim.Encoder(warn_truncation=False)
np.save(sys.argv[2], np.stack(encoder.encode(json.load(open(sys.argv[1])))))
print(encoder.backend.name, [m for m in ('torch', 'sentence_transformers') if m in sys.modules])
"""


def first_query(synopses: list[str], runs: int, before: str) -> None:
    """Wall time of a new process's first query, library and CLI, this tree against ``before``'s (the path
    through torch), interleaved runs; then the vectors a new process computes against the path through torch."""

    with first_query_server(synopses) as dsn:
        env = {key: value for key, value in os.environ.items() if key not in ("PGSIM_BACKEND", "PYTHONPATH")}
        first_query_times(runs, before, {**env, "PGSIM_DSN": dsn})
    first_query_vectors(synopses, env)


def first_query_times(runs: int, before: str, env: dict[str, str]) -> None:
    import subprocess

    python, cli = sys.executable, str(Path(sys.executable).with_name("pgsim"))
    modes: list[tuple[str, list[str], dict[str, str]]] = [
        ("library: import pgsim; Encoder().encode_query(...)", [python, "-c", LIBRARY], env),
        (f"CLI: pgsim search ... --table {FIRST_TABLE}", [cli, "search", QUERY, "--table", FIRST_TABLE], env),
        ("library, PGSIM_BACKEND=onnx", [python, "-c", LIBRARY], {**env, "PGSIM_BACKEND": "onnx"}),
        ("library, PGSIM_BACKEND=torch", [python, "-c", LIBRARY], {**env, "PGSIM_BACKEND": "torch"}),
        ("python -c 'import pgsim' alone", [python, "-c", "import pgsim"], env),
    ]
    with tempfile.TemporaryDirectory() as tree:
        if before:
            archive = subprocess.run(["git", "archive", before, "pgsim"], check=True, capture_output=True).stdout
            Path(tree, "before").mkdir()
            subprocess.run(["tar", "-x", "-C", str(Path(tree, "before"))], input=archive, check=True)
            old = {**env, "PYTHONPATH": str(Path(tree, "before"))}
            modes += [
                (f"before ({before}): library", [python, "-c", LIBRARY], old),
                (f"before ({before}): CLI", [python, "-c", CLI], old),
            ]
        # cwd: not this checkout, whose pgsim would come first on sys.path for `python -c` whatever PYTHONPATH says
        for _label, command, environment in modes:  # once each, untimed: exports, choices, file caches
            subprocess.run(command, env=environment, check=True, capture_output=True, cwd=tree)
        seconds: dict[str, list[float]] = {label: [] for label, _, _ in modes}
        for _ in range(runs):  # interleaved, so load that comes and goes spreads over every mode
            for label, command, environment in modes:
                started = time.perf_counter()
                subprocess.run(command, env=environment, check=True, capture_output=True, cwd=tree)
                seconds[label].append(time.perf_counter() - started)
        heavy = {}
        for label, _command, environment in modes:
            code = (LIBRARY if "library" in label else CLI) + REPORT
            done = subprocess.run(
                [python, "-c", code], env=environment, check=True, capture_output=True, text=True, cwd=tree
            )
            heavy[label] = done.stderr.rsplit("heavy:", 1)[-1].strip()
    rows = [
        [
            label,
            f"{np.median(times):.2f}",
            f"{min(times):.2f}-{max(times):.2f}",
            heavy[label] if "alone" not in label else "-",
        ]
        for label, times in seconds.items()
    ]
    print(format_table(["new process", "median s", "min-max s", "imported"], rows, max_width=80))
    print(f"{runs} runs each, interleaved; wall time of the whole process, search included", flush=True)


@contextmanager
def first_query_server(synopses: list[str]) -> Iterator[str]:
    """A DSN of an embedded PostgreSQL of the bench's own holding FIRST_TABLE with ``synopses`` embedded (a
    registered column, HNSW index), as a machine that has run pgsim before has; stopped after."""
    import pgsim
    from pgsim.db.server import EmbeddedServer

    with tempfile.TemporaryDirectory(prefix="pgsim-bench-encode-") as directory:
        server = EmbeddedServer(directory)
        dsn = server.start().dsn()
        try:
            conn = pgsim.connect(dsn)
            pgsim.install(conn)
            conn.execute("CREATE SCHEMA pgsim_bench_encode")
            conn.execute(f"CREATE TABLE {FIRST_TABLE} (id int PRIMARY KEY, synopsis text)")
            insert = f"INSERT INTO {FIRST_TABLE} VALUES (%s, %s)"  # noqa: S608 - a constant
            conn.cursor().executemany(insert, list(enumerate(synopses)))
            pgsim.add_embedding(conn, FIRST_TABLE, "embedding", source="synopsis")
            pgsim.backfill(conn, FIRST_TABLE, "embedding")
            conn.close()
            yield dsn
        finally:
            server.stop()


def first_query_vectors(synopses: list[str], env: dict[str, str]) -> None:
    """``synopses`` encoded by a new process (the cached export, no torch) against the same backend built
    through torch in this process, and against float32 torch."""
    import json
    import subprocess

    from pgsim.encoding.backends.auto import build
    from pgsim.encoding.models import model_revision

    with tempfile.TemporaryDirectory() as work:
        texts, out = Path(work) / "texts.json", Path(work) / "vectors.npy"
        texts.write_text(json.dumps(synopses))
        done = subprocess.run([sys.executable, "-c", ENCODE, str(texts), str(out)], env=env, check=True,
                              capture_output=True, text=True)  # fmt: skip
        fresh = np.load(out)
    name, heavy = done.stdout.split(" ", 1)
    built = build(name, load_model("all-MiniLM-L6-v2"), "all-MiniLM-L6-v2", model_revision("all-MiniLM-L6-v2"))

    class ThroughTorch(Encoder):
        @property
        def backend(self):  # type: ignore[no-untyped-def]
            return built

    through_torch = np.stack(ThroughTorch(warn_truncation=False).encode(synopses))  # type: ignore[arg-type]
    float32 = np.stack(Encoder(backend="torch", warn_truncation=False).encode(synopses))  # type: ignore[arg-type]
    truth, found = top10(through_torch[:200], through_torch), top10(fresh[:200], fresh)
    rows = [
        [f"new process ({name}, imported {heavy.strip()}) vs {name} through torch",
         f"{float(np.max(np.abs(fresh - through_torch))):.2e}",
         f"{float(np.min(np.sum(fresh * through_torch, axis=1))):.6f}", agreement(truth, found)],
        [f"new process ({name}) vs float32 torch", f"{float(np.max(np.abs(fresh - float32))):.2e}",
         f"{float(np.min(np.sum(fresh * float32, axis=1))):.6f}", agreement(top10(float32[:200], float32), found)],
    ]  # fmt: skip
    print(format_table(["vectors of the first query path", "max |diff|", "min cosine", "top-10 agreement"], rows))
    print(f"{len(synopses)} synopses; top-10 of the first 200 among all", flush=True)


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
