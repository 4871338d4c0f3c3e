"""``auto``: each candidate backend encodes the same calibration texts; the fastest whose vectors keep a
cosine of at least ``MIN_COSINE`` with float32's wins. The choice is remembered per model revision and
machine in the cache directory, and logged. :func:`build` makes a backend by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pgsim.encoding.backends.base import (
    BACKENDS,
    MIN_COSINE,
    TOKENIZER_LOCK,
    Backend,
    BackendUnavailable,
    Matrix,
    cache_dir,
    read_json,
)
from pgsim.encoding.backends.lanes import embed_batches
from pgsim.encoding.backends.torch import TorchBackend, bfloat16_copy
from pgsim.errors import InvalidInput

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

CHOICE_FORMAT = "lanes"  # change when backends run differently, so remembered choices are measured again


def build(requested: str, model: SentenceTransformer, model_name: str, revision: str) -> Backend:
    """The backend named ``requested`` (one of BACKENDS) for ``model``."""
    if requested == "torch":
        return TorchBackend(model, "torch")
    if requested == "torch-bf16":
        return TorchBackend(bfloat16_copy(model), "torch-bf16")
    if requested in ("onnx", "openvino"):
        from pgsim.encoding.backends.onnx import OnnxBackend
        from pgsim.encoding.backends.openvino import OpenVinoBackend

        return (OnnxBackend if requested == "onnx" else OpenVinoBackend)(model, model_name, revision)
    raise InvalidInput(f"Unknown encoder backend {requested!r}; choose auto, {', '.join(BACKENDS)}.")


_choices_lock = threading.Lock()


def choose(model: SentenceTransformer, model_name: str, revision: str, calibration: list[str]) -> Backend:
    """``auto``: the fastest backend whose vectors keep MIN_COSINE with float32's on ``calibration``; the
    measurement is remembered in the cache directory (per model revision, machine and versions)."""
    import torch

    key = "|".join(
        [revision, platform.machine(), platform.processor() or "", torch.__version__, _cpu_flags(), CHOICE_FORMAT]
        + list(BACKENDS)  # a new candidate backend, or a runtime installed or upgraded, means measuring again
        + [_installed("onnxruntime"), _installed("openvino")]
    )
    choices_path = cache_dir() / "backend-choices.json"
    with _choices_lock:
        known = read_json(choices_path) or {}
        remembered = known.get(hashlib.sha256(key.encode()).hexdigest()[:16])
        if remembered:
            try:
                backend = build(remembered["backend"], model, model_name, revision)
                backend.reason = f"auto, chosen earlier: {remembered['why']}"
                log.info("encoder backend %s (%s)", backend.name, backend.reason)
                return backend
            except BackendUnavailable as exc:
                warnings.warn(
                    f"Backend {remembered['backend']} chosen earlier is unavailable ({exc}); choosing again.",
                    stacklevel=3,
                )
        backend, why = _measure(model, model_name, revision, calibration)
        backend.reason = f"auto: {why}"
        known[hashlib.sha256(key.encode()).hexdigest()[:16]] = {"backend": backend.name, "why": why}
        try:
            choices_path.parent.mkdir(parents=True, exist_ok=True)
            partial = choices_path.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(known, indent=1))
            partial.replace(choices_path)  # whole or not at all, for another process reading it
        except OSError as exc:  # a read-only home: measure again next time
            log.info("cannot remember the backend choice in %s: %s", choices_path, exc)
        log.info("encoder backend %s (%s)", backend.name, backend.reason)
        return backend


def _measure(model: SentenceTransformer, model_name: str, revision: str, texts: list[str]) -> tuple[Backend, str]:
    """Each backend encodes ``texts`` (in batches of similar length, as the Encoder sends them); the fastest
    whose vectors keep MIN_COSINE with float32's wins."""
    batches = _length_sorted_batches(model, texts)
    reference = TorchBackend(model, "torch")
    expected, rates = _timed(reference, batches)
    best: Backend = reference
    best_rate = rates
    notes = []
    measured = {"torch": rates}
    for name in BACKENDS[1:]:
        try:
            candidate = build(name, model, model_name, revision)
        except BackendUnavailable as exc:
            log.warning("encoder backend %s is not a candidate here: %s", name, exc)
            notes.append(f"{name} unavailable: {exc}")
            continue
        vectors, rate = _timed(candidate, batches)
        measured[name] = rate
        cosine = float(np.min(np.sum(vectors * expected, axis=1)))
        if cosine < MIN_COSINE:
            notes.append(f"{name} min cosine {cosine:.5f} < {MIN_COSINE}")
        elif rate > best_rate:
            best, best_rate = candidate, rate
    rates_text = ", ".join(f"{name} {rate:.0f} texts/s" for name, rate in measured.items())
    return best, "; ".join([f"measured {rates_text} on {len(texts)} texts", *notes])


def _length_sorted_batches(model: SentenceTransformer, texts: list[str], size: int = 16) -> list[list[str]]:
    with TOKENIZER_LOCK:
        lengths = [len(ids) for ids in model.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
    ordered = [text for _, text in sorted(zip(lengths, texts, strict=True), key=lambda pair: -pair[0])]
    return [ordered[start : start + size] for start in range(0, len(ordered), size)]


def _timed(backend: Backend, batches: list[list[str]]) -> tuple[Matrix, float]:
    """The vectors, and the better rate of two passes over ``batches`` run as the Encoder runs them, after a
    first pass that pays for lazy initialisation (OpenVINO's per-shape kernels among it): a single timed
    pass could pick the slower of two close backends."""
    vectors = np.concatenate(list(embed_batches(backend, batches)))
    best = 0.0
    for _ in range(2):
        started = time.perf_counter()
        for _batch in embed_batches(backend, batches):
            pass
        best = max(best, len(vectors) / (time.perf_counter() - started))
    return vectors, best


def _installed(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{package} {version(package)}"
    except PackageNotFoundError:
        return f"no {package}"


def _cpu_flags() -> str:
    """The CPU features that decide which backend is fast (Linux; elsewhere the processor name decides)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    wanted = ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx512f", "avx2")
    return ",".join(flag for flag in wanted if f" {flag}" in text)
