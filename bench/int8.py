"""Why pgsim offers no int8 backend: ONNX Runtime's dynamic int8 quantisation in several forms, against
float32, on Debian long descriptions.

    python bench/int8.py [--texts 1200] [--queries 200]

Each variant quantises pgsim's cached ONNX export (see pgsim/encoding/backends/onnx.py) with
``onnxruntime.quantization.quantize_dynamic`` and encodes the same texts through pgsim's ONNX backend;
texts/s against sentence-transformers' default ``model.encode(texts)`` and top-10 neighbour agreement
with float32 (texts as queries over all texts) decide. pgsim's bar is agreement >= 0.99.

Finer schemes than ONNX Runtime's (see SIMULATED: activations per token or per group of channels,
SmoothQuant-style smoothing, the widest input channels kept unquantised, asymmetric levels) are simulated in
float32 on every Linear layer: their agreement is what an int8 kernel would reach at best, so they have no
speed of their own. Their speed is timed per layer instead: a bfloat16 Linear against the int8 forms built
from ``torch._int_mm`` and compiled with torch.compile, on one thread as pgsim's lanes run them.
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
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus_cache import debian_packages  # noqa: E402
from encode import agreement, top10  # noqa: E402

from pgsim.cli.common import format_table  # noqa: E402
from pgsim.encoding.backends.base import cache_dir
from pgsim.encoding.backends.onnx import OnnxBackend, onnx_session
from pgsim.encoding.backends.torch import TorchBackend
from pgsim.encoding.encoder import Encoder
from pgsim.encoding.models import load_model, model_revision


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

    onnx = OnnxBackend.for_model(model, "all-MiniLM-L6-v2", model_revision("all-MiniLM-L6-v2"))
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
            session = onnx_session(onnxruntime, path)
            encoder = with_backend(Fixed(session, onnx.run, "int8"))
            encoder.encode(texts[:32])
            started = time.perf_counter()
            vectors = np.stack(encoder.encode(texts))  # type: ignore[arg-type]
            rate = len(texts) / (time.perf_counter() - started)
            found = top10(vectors[: args.queries], vectors)
            cosine = float(np.min(np.sum(vectors * reference, axis=1)))
            rows.append([label, f"{rate:.1f}", f"{rate / raw_rate:.2f}x", agreement(truth, found), f"{cosine:.4f}"])
    calibration = [p.text for p in random.Random(99).sample(described, 256)]
    for label, scheme in SIMULATED.items():
        simulated = np.stack(simulated_int8(texts, calibration, **scheme))  # type: ignore[arg-type]
        cosine = float(np.min(np.sum(simulated * reference, axis=1)))
        found = top10(simulated[: args.queries], simulated)
        rows.append([label + " (simulated)", "-", "-", agreement(truth, found), f"{cosine:.4f}"])
    print(f"{len(texts)} texts; sentence-transformers' default: {raw_rate:.1f} texts/s")
    print(format_table(["variant", "texts/s", "vs raw", "top-10 agreement", "min cosine"], rows))
    print("\none Linear layer on the model's shapes (tokens x in x out), one thread, GFLOP/s")
    print(format_table(["shape", *LAYER_FORMS], layer_rates()))


# Finer schemes than ONNX Runtime's, each on every Linear layer: weights int8 per output channel; activations
# int8 per token (group 0) or per group of input channels; "alpha" moves that power of each input channel's
# range into the weights (SmoothQuant, ranges from 256 calibration texts); "keep" leaves the input channels
# with the largest ranges unquantised; "asymmetric" spends all 256 levels on each token's own [min, max].
SIMULATED: dict[str, dict[str, Any]] = {
    "int8 per token, weights per channel": {},
    "int8 per 32 channels": {"group": 32},
    "int8 per token, smoothed (alpha 0.5)": {"alpha": 0.5},
    "smoothed, 24 widest kept, asymmetric per token": {"alpha": 0.5, "keep": 24, "asymmetric": True},
}


def simulated_int8(
    texts: list[str],
    calibration: list[str],
    group: int = 0,
    alpha: float | None = None,
    keep: int = 0,
    asymmetric: bool = False,
) -> list[object]:
    """float32 encoding with every Linear layer's input and weight rounded to int8 levels as SIMULATED says."""
    import torch

    def levels(x: torch.Tensor, size: int = 0, asymmetric: bool = False) -> torch.Tensor:
        size = size or x.shape[-1]
        parts = x.reshape(*x.shape[:-1], x.shape[-1] // size, size)
        if asymmetric:
            low = parts.amin(dim=-1, keepdim=True)
            step = (parts.amax(dim=-1, keepdim=True) - low).clamp(min=1e-8) / 255
            return (torch.round((parts - low) / step) * step + low).reshape(x.shape)
        scale = parts.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
        return (torch.round(parts / scale).clamp(-127, 127) * scale).reshape(x.shape)

    class Int8Linear(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear, ranges: torch.Tensor) -> None:
            super().__init__()
            weight = linear.weight.detach().float()
            widest = torch.argsort(-ranges)[:keep]
            self.quantised = torch.ones(weight.shape[1], dtype=torch.bool)
            self.quantised[widest] = False
            smooth = torch.ones_like(ranges)
            if alpha is not None:
                weight_ranges = weight.abs().amax(dim=0).clamp(min=1e-5)
                smooth = ranges.clamp(min=1e-5) ** alpha / weight_ranges ** (1 - alpha)
            self.smooth = smooth[self.quantised]
            self.weight = levels(weight[:, self.quantised] * self.smooth, group)  # per output channel (and group)
            self.kept_weight = weight[:, ~self.quantised]
            self.bias = linear.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.float()
            rounded = levels(x[..., self.quantised] / self.smooth, group, asymmetric)
            return torch.nn.functional.linear(rounded, self.weight, self.bias) + x[..., ~self.quantised] @ (
                self.kept_weight.T
            )

    model = copy.deepcopy(load_model("all-MiniLM-L6-v2"))  # the loaded model is shared by every Encoder
    ranges: dict[torch.nn.Module, torch.Tensor] = {}

    def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _: object) -> None:
        seen = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0).float()
        ranges[module] = torch.maximum(ranges[module], seen) if module in ranges else seen

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_hook(record) for m in linears]
    model.encode(calibration, batch_size=32)
    for hook in hooks:
        hook.remove()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, Int8Linear(child, ranges[child]))
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


LAYER_FORMS = ("bfloat16", "int8 product alone", "int8 per token (inductor)", "kept + asymmetric (inductor)")


def layer_rates(tokens: int = 1536, keep: int = 24) -> list[list[str]]:
    """One thread (as in pgsim's lanes): a bfloat16 Linear layer against int8 forms of it. "int8 product alone"
    is torch._int_mm on int8 inputs; the other two quantise each token of the bfloat16 input, multiply and
    scale back, compiled by torch.compile (inductor fuses the elementwise work): symmetric over all channels,
    and the form that passes the 0.99 bar in the simulation (``keep`` channels in bfloat16, the rest
    asymmetric)."""
    import torch

    def per_token(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor) -> Any:
        wide = x.float()
        scale = wide.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
        product = torch._int_mm(torch.round(wide / scale).to(torch.int8), weight)
        return (product.float() * scale * weight_scale + bias).bfloat16()

    def kept_asymmetric(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor,
                        column_sums: torch.Tensor, kept_weight: torch.Tensor) -> Any:  # fmt: skip
        rest = x[:, keep:].float()
        low = rest.amin(-1, keepdim=True)
        step = (rest.amax(-1, keepdim=True) - low).clamp(min=1e-8) / 255
        product = torch._int_mm((torch.round((rest - low) / step) - 128).to(torch.int8), weight)
        scaled = (product.float() * step + (128 * step + low) * column_sums) * weight_scale + bias
        return (scaled + (x[:, :keep] @ kept_weight).float()).bfloat16()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    compiled_per_token = torch.compile(per_token, dynamic=True)
    compiled_kept = torch.compile(kept_asymmetric, dynamic=True)
    rows = []
    try:
        for inner, outer in ((384, 1536), (1536, 384), (384, 384)):
            x = torch.randn(tokens, inner).bfloat16()
            weight, bias = torch.randn(outer, inner), torch.randn(outer)
            weight_scale = weight.abs().amax(1) / 127
            int8_weight = torch.round(weight / weight_scale[:, None]).to(torch.int8).T.contiguous()
            rest_scale = weight[:, keep:].abs().amax(1) / 127
            rest_weight = torch.round(weight[:, keep:] / rest_scale[:, None]).to(torch.int8).T.contiguous()
            column_sums = rest_weight.sum(0, dtype=torch.int32).float()
            kept_weight = weight[:, :keep].T.contiguous().bfloat16()
            int8_x = torch.randint(-127, 127, (tokens, inner), dtype=torch.int8)
            bf16_weight, bf16_bias = weight.bfloat16(), bias.bfloat16()
            calls = [
                lambda x=x, w=bf16_weight, b=bf16_bias: torch.nn.functional.linear(x, w, b),
                lambda xi=int8_x, wi=int8_weight: torch._int_mm(xi, wi),
                lambda x=x, wi=int8_weight, s=weight_scale, b=bias: compiled_per_token(x, wi, s, b),
                lambda x=x, wi=rest_weight, s=rest_scale, b=bias, c=column_sums, k=kept_weight: compiled_kept(
                    x, wi, s, b, c, k
                ),
            ]
            rates = []
            for call in calls:
                for _ in range(5):
                    call()
                best = min(_seconds(call, 30) for _ in range(3))
                rates.append(f"{2 * tokens * inner * outer / best / 1e9:.0f}")
            rows.append([f"{tokens} x {inner} x {outer}", *rates])
    finally:
        torch.set_num_threads(threads)
    return rows


def _seconds(call: Any, repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats


if __name__ == "__main__":
    main()
