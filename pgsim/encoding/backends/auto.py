"""``auto``: each candidate backend encodes the same calibration texts; the fastest whose vectors keep a
cosine of at least ``MIN_COSINE`` with float32's wins, timed so that other processes' load does not decide
(:mod:`.measure`). The choice is remembered per model revision and machine in the cache directory, with its
rates, and logged; :func:`measure_again` measures anew on demand. The first run says on stderr what it
does (converting the model, measuring); later runs say nothing. :func:`build` makes a backend by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pgsim.encoding.backends import measure
from pgsim.encoding.backends.base import (
    BACKENDS,
    MIN_COSINE,
    TOKENIZER_LOCK,
    Backend,
    BackendUnavailable,
    cache_dir,
    read_json,
)
from pgsim.encoding.backends.exported import export_path, pooling_mode
from pgsim.encoding.backends.lanes import embed_batches
from pgsim.encoding.backends.torch import TorchBackend, bfloat16_copy
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.errors import InvalidInput

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

# What converting the model takes on 2 cores, said before it starts (all-MiniLM-L6-v2; larger models longer).
EXPORT_SECONDS = {"onnx": "5-15 s", "openvino": "5-15 s"}
CHOICE_FORMAT = "lanes"  # change when backends run differently, so remembered choices are measured again


def build(requested: str, model: SentenceTransformer, model_name: str, revision: str) -> Backend:
    """The backend named ``requested`` (one of BACKENDS) for ``model``."""
    if requested == "torch":
        return TorchBackend(model, "torch")
    if requested == "torch-bf16":
        return TorchBackend(bfloat16_copy(model), "torch-bf16")
    if requested in ("onnx", "openvino"):
        first = _not_a_transformer(model)
        if first is not None:
            raise BackendUnavailable(
                f"The {requested} backend runs an exported copy of a model's transformer; {model_name} has none "
                f"(its first module is {first}), and torch runs it without one: use backend 'torch' or 'auto'."
            )
        from pgsim.encoding.backends.onnx import OnnxBackend
        from pgsim.encoding.backends.openvino import OpenVinoBackend

        exported = (export_path(requested, model_name, revision) / "export.json").is_file()
        if _exportable(model, requested) and not exported:
            say(f"converting {model_name} for the {requested} backend, once (usually {EXPORT_SECONDS[requested]})")
        return (OnnxBackend if requested == "onnx" else OpenVinoBackend).for_model(model, model_name, revision)
    raise InvalidInput(f"Unknown encoder backend {requested!r}; choose auto, {', '.join(BACKENDS)}.")


_choices_lock = threading.Lock()


def choose(
    model: SentenceTransformer, model_name: str, revision: str, calibration: list[str], *, again: bool = False
) -> Backend:
    """``auto``: the fastest backend whose vectors keep MIN_COSINE with float32's on ``calibration``; the
    measurement (:mod:`.measure`) is remembered in the cache directory (per model revision, machine and
    versions). ``again``: measure even if a choice is remembered (``pgsim encoder --measure``)."""
    first = _not_a_transformer(model)
    if first is not None:  # a lookup per token (StaticEmbedding): nothing to export, nothing worth measuring
        backend = build("torch", model, model_name, revision)
        kind = "static embedding" if first == "StaticEmbedding" else first
        backend.reason = f"auto: {kind} model: nothing to export"
        log.info("encoder backend %s (%s)", backend.name, backend.reason)
        return backend
    choices_path = cache_dir() / "backend-choices.json"
    key = _choice_key(revision)
    with _choices_lock:
        known = read_json(choices_path) or {}
        remembered = None if again else remembered_choice(revision, known)
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
        say(
            f"measuring encoder backends for {model_name} on this machine, once "
            f"(usually 20-60 s, longer while other work runs)"
        )
        backend, record = _measure(model, model_name, revision, calibration)
        backend.reason = f"auto: {record['why']}"
        known[key] = record
        try:
            choices_path.parent.mkdir(parents=True, exist_ok=True)
            partial = choices_path.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(known, indent=1))
            partial.replace(choices_path)  # whole or not at all, for another process reading it
        except OSError as exc:  # a read-only home: measure again next time
            log.info("cannot remember the backend choice in %s: %s", choices_path, exc)
        log.info("encoder backend %s (%s)", backend.name, backend.reason)
        return backend


def remembered_choice(revision: str, known: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The choice remembered for the model at ``revision`` on this machine (``backend``, ``why``), unless
    there is none or it is to be measured again; reads the cache directory's file unless given ``known``."""
    if known is None:
        known = read_json(cache_dir() / "backend-choices.json") or {}
    remembered = known.get(_choice_key(revision))
    if not isinstance(remembered, dict) or _recheck(remembered):
        return None
    return remembered


def measure_again(model_name: str = DEFAULT_MODEL) -> Backend:
    """Measure the backends for ``model_name`` now and remember the new choice (what ``pgsim encoder
    --measure`` runs); its ``reason`` says what was measured."""
    from pgsim.encoding.models import _calibration_texts, load_model, model_revision

    return choose(load_model(model_name), model_name, model_revision(model_name), _calibration_texts(), again=True)


def say(message: str) -> None:
    """One line on stderr about slow one-time work (converting, measuring), so a first run that pauses says
    why; later runs, which reuse what it left, say nothing."""
    print(f"pgsim: {message}", file=sys.stderr, flush=True)


def _choice_key(revision: str) -> str:
    # torch's version as its package metadata says it (torch.__version__ without importing torch)
    torch_version = _installed("torch").removeprefix("torch ")
    key = "|".join(
        [revision, platform.machine(), platform.processor() or "", torch_version, _cpu_flags(), CHOICE_FORMAT]
        + list(BACKENDS)  # a new candidate backend, or a runtime installed or upgraded, means measuring again
        + [_installed("onnxruntime"), _installed("openvino")]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _recheck(remembered: dict[str, Any]) -> bool:
    """A remembered choice to measure again: one an older pgsim timed by wall clock alone (load from other
    processes could decide it) whose winner the CPU's instructions call implausible."""
    if remembered.get("method") == measure.METHOD:
        return False  # measured as now, and re-measured then if implausible
    if measure.implausible(str(remembered.get("backend")), list(BACKENDS)):
        log.info("the remembered backend choice (%s) is implausible for this CPU; measuring again", remembered)
        return True
    return False


# backends that compute in bfloat16 whatever the CPU: on one without bfloat16 instructions they emulate them
EMULATED_WITHOUT_BFLOAT16 = ("torch-bf16",)


def _measure(
    model: SentenceTransformer, model_name: str, revision: str, texts: list[str]
) -> tuple[Backend, dict[str, Any]]:
    """Each backend encodes ``texts`` (in batches of similar length, as the Encoder sends them); the fastest
    whose vectors keep MIN_COSINE with float32's wins, timed as :mod:`.measure` says. The record to remember."""
    batches = _length_sorted_batches(model, texts)
    reference = TorchBackend(model, "torch")
    expected = np.concatenate(list(embed_batches(reference, batches)))  # also the warm-up pass
    candidates: dict[str, Backend] = {"torch": reference}
    notes = []
    for name in BACKENDS[1:]:
        if name in EMULATED_WITHOUT_BFLOAT16 and not measure.native_bfloat16():
            notes.append(f"{name} no candidate: this CPU has no bfloat16 instructions, which torch then emulates")
            continue  # the slowest candidate by far there in auto's own timings, which it took most of
        try:
            candidate = build(name, model, model_name, revision)
        except BackendUnavailable as exc:
            log.warning("encoder backend %s is not a candidate here: %s", name, exc)
            notes.append(f"{name} unavailable: {exc}")
            continue
        vectors = np.concatenate(list(embed_batches(candidate, batches)))  # the warm-up pass
        cosine = float(np.min(np.sum(vectors * expected, axis=1)))
        if cosine < MIN_COSINE:
            notes.append(f"{name} min cosine {cosine:.5f} < {MIN_COSINE}")
        else:
            candidates[name] = candidate
    rates, load = measure.rates(candidates, batches)
    rounds = measure.ROUNDS
    if measure.implausible(max(rates, key=rates.__getitem__), list(candidates)):
        log.info("float32 won on a CPU with bfloat16 instructions (%s); measuring again", rates)
        more, more_load = measure.rates(candidates, batches)
        rates = {name: max(rate, more[name]) for name, rate in rates.items()}
        load, rounds = max(load, more_load), 2 * rounds
    winner = max(rates, key=rates.__getitem__)
    rates_text = ", ".join(f"{name} {rate:.0f}" for name, rate in sorted(rates.items(), key=lambda kv: -kv[1]))
    measured = (
        f"measured {rates_text} texts/s on {len(texts)} texts (best of {rounds} interleaved rounds, "
        f"corrected for other processes, which took up to {load:.0%} of the CPUs)"
    )
    why = "; ".join([measured, *notes])
    record = {
        "backend": winner,
        "why": why,
        "method": measure.METHOD,
        "rates": {k: round(v, 1) for k, v in rates.items()},
    }
    return candidates[winner], record


def _length_sorted_batches(model: SentenceTransformer, texts: list[str], size: int = 16) -> list[list[str]]:
    with TOKENIZER_LOCK:
        lengths = [len(ids) for ids in model.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
    ordered = [text for _, text in sorted(zip(lengths, texts, strict=True), key=lambda pair: -pair[0])]
    return [ordered[start : start + size] for start in range(0, len(ordered), size)]


def _not_a_transformer(model: SentenceTransformer) -> str | None:
    """The kind of ``model``'s first module when it is not a Transformer (a StaticEmbedding, say), which the
    exported backends cannot convert; None for a transformer model."""
    first = type(next(iter(model))).__name__
    return None if first == "Transformer" else first


def _exportable(model: SentenceTransformer, backend: str) -> bool:
    """Whether ``backend``'s runtime is installed and it can run ``model`` (so converting is what comes)."""
    import importlib.util

    package = "onnxruntime" if backend == "onnx" else "openvino"
    try:
        pooling_mode(model, backend)
        return sys.modules.get(package, True) is not None and importlib.util.find_spec(package) is not None
    except (ImportError, ValueError, BackendUnavailable):
        return False


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
