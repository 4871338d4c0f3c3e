"""Why pgsim offers no int8 backend: ONNX Runtime's dynamic int8 quantisation in several forms, against
float32, on Debian long descriptions.

    python bench/int8.py [--texts 1200] [--queries 200]

Each variant quantises pgsim's cached ONNX export (see pgsim/backends.py) with
``onnxruntime.quantization.quantize_dynamic`` and encodes the same texts through pgsim's ONNX backend;
texts/s against sentence-transformers' default ``model.encode(texts)`` and top-10 neighbour agreement
with float32 (texts as queries over all texts) decide. pgsim's bar is agreement >= 0.99.

Finer schemes than ONNX Runtime's (int8 activations scaled per token, or per group of 32 channels, with
per-channel int8 weights) are simulated in float32 on every Linear layer: their agreement is what an int8
kernel would reach at best, so they have no speed of their own; the int8 matrix product they would use
(``torch._int_mm``) is timed against bfloat16's on the model's shapes.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_cache import debian_packages  # noqa: E402
from encode import agreement, top10  # noqa: E402

from pgsim.backends import OnnxBackend, TorchBackend, _session, cache_dir  # noqa: E402
from pgsim.cli import format_table  # noqa: E402
from pgsim.encode import Encoder, load_model, model_revision  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=1200)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    described = [p for p in debian_packages() if p.description]
    texts = [p.text for p in random.Random(11).sample(described, args.texts)]
    model = load_model("all-MiniLM-L6-v2")
    model.encode(texts[:32])
    started = time.perf_counter()
    model.encode(texts, normalize_embeddings=True)
    raw_rate = len(texts) / (time.perf_counter() - started)
    reference = np.stack(Encoder(backend="torch", warn_truncation=False).encode(texts))  # type: ignore[arg-type]
    truth = top10(reference[: args.queries], reference)

    onnx = OnnxBackend(model, "all-MiniLM-L6-v2", model_revision("all-MiniLM-L6-v2"))
    (exported,) = cache_dir().glob("onnx/all-MiniLM-L6-v2-*/model.onnx")
    import onnx as onnx_package

    matmuls = [n.name for n in onnx_package.load(str(exported)).graph.node if n.op_type == "MatMul"]
    qkv = [n for n in matmuls if any(part in n for part in ("/query/", "/key/", "/value/"))]
    ffn_out = [n for n in matmuls if "/output/dense/" in n and "/attention/" not in n]
    variants = {
        "float32 (no quantisation)": None,
        "int8, per tensor": {},
        "int8, per channel": {"per_channel": True},
        "int8, per channel, MatMul only": {"per_channel": True, "op_types_to_quantize": ["MatMul"]},
        "int8, feed-forward outputs kept float32": {
            "per_channel": True, "op_types_to_quantize": ["MatMul"], "nodes_to_exclude": ffn_out,
        },
        "int8, only Q/K/V quantised": {
            "per_channel": True, "op_types_to_quantize": ["MatMul"],
            "nodes_to_exclude": [n for n in matmuls if n not in qkv],
        },
    }  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for label, options in variants.items():
            path = exported
            if options is not None:
                path = Path(scratch) / "int8.onnx"
                quantize_dynamic(str(exported), str(path), weight_type=QuantType.QInt8, **options)
            session = _session(onnxruntime, path)
            encoder = with_backend(Fixed(session, onnx.run, "int8"))
            encoder.encode(texts[:32])
            started = time.perf_counter()
            vectors = np.stack(encoder.encode(texts))  # type: ignore[arg-type]
            rate = len(texts) / (time.perf_counter() - started)
            found = top10(vectors[: args.queries], vectors)
            cosine = float(np.min(np.sum(vectors * reference, axis=1)))
            rows.append([label, f"{rate:.1f}", f"{rate / raw_rate:.2f}x", agreement(truth, found), f"{cosine:.4f}"])
    for label, group in (
        ("int8 per token, weights per channel (simulated)", 0),
        ("int8 per 32 channels (simulated)", 32),
    ):
        simulated = np.stack(simulated_int8(texts, group))  # type: ignore[arg-type]
        cosine = float(np.min(np.sum(simulated * reference, axis=1)))
        found = top10(simulated[: args.queries], simulated)
        rows.append([label, "-", "-", agreement(truth, found), f"{cosine:.4f}"])
    print(f"{len(texts)} texts; sentence-transformers' default: {raw_rate:.1f} texts/s")
    print(format_table(["variant", "texts/s", "vs raw", "top-10 agreement", "min cosine"], rows))
    print("\nmatrix products on the model's shapes (tokens x in x out), GFLOP/s")
    print(format_table(["shape", "float32", "bfloat16", "int8 (torch._int_mm)"], matmul_rates()))


def simulated_int8(texts: list[str], group: int) -> list[object]:
    """float32 encoding with every Linear layer's input and weight rounded to int8 levels: per token (group 0)
    or per ``group`` input channels for the input, per output channel (and group) for the weight."""
    import torch

    def levels(x: torch.Tensor) -> torch.Tensor:
        size = group or x.shape[-1]
        parts = x.reshape(*x.shape[:-1], x.shape[-1] // size, size)
        scale = parts.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
        return (torch.round(parts / scale).clamp(-127, 127) * scale).reshape(x.shape)

    class Int8Linear(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.weight = levels(linear.weight.detach().float())
            self.bias = linear.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(levels(x.float()), self.weight, self.bias)

    model = copy.deepcopy(load_model("all-MiniLM-L6-v2"))  # the loaded model is shared by every Encoder
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, Int8Linear(child))
    return with_backend(TorchBackend(model, "int8, simulated")).encode(texts)


class Fixed:
    """An ONNX Runtime session as a backend, one batch at a time."""

    parallel = False
    reason = "bench"

    def __init__(self, session: object, run: object, name: str) -> None:
        self.session, self.run, self.name = session, run, name

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.run(self.session, texts)  # type: ignore[operator, no-any-return]


def with_backend(backend: object) -> Encoder:
    """An Encoder that runs ``backend`` instead of the one pgsim would choose."""

    class Bench(Encoder):
        @property
        def backend(self) -> object:  # type: ignore[override]
            return backend

    return Bench(warn_truncation=False)


def matmul_rates(tokens: int = 1536, repeats: int = 50) -> list[list[str]]:
    import torch

    rows = []
    for inner, outer in ((384, 1536), (1536, 384), (384, 384)):
        x, w = torch.randn(tokens, inner), torch.randn(outer, inner)
        xb, wb = x.bfloat16(), w.bfloat16()
        xi = torch.randint(-127, 127, (tokens, inner), dtype=torch.int8)
        wi = torch.randint(-127, 127, (inner, outer), dtype=torch.int8)
        calls = {
            "float32": lambda x=x, w=w: torch.nn.functional.linear(x, w),
            "bfloat16": lambda xb=xb, wb=wb: torch.nn.functional.linear(xb, wb),
            "int8": lambda xi=xi, wi=wi: torch._int_mm(xi, wi),
        }
        rates = []
        for call in calls.values():
            for _ in range(5):
                call()
            started = time.perf_counter()
            for _ in range(repeats):
                call()
            rates.append(f"{2 * tokens * inner * outer * repeats / (time.perf_counter() - started) / 1e9:.0f}")
        rows.append([f"{tokens} x {inner} x {outer}", *rates])
    return rows


if __name__ == "__main__":
    main()
