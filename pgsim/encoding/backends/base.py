"""Forward passes for :class:`~pgsim.encode.Encoder`: torch in float32 or bfloat16, ONNX Runtime or OpenVINO,
and the choice among them.

- ``torch``: sentence-transformers as loaded (float32), the reference.
- ``torch-bf16``: a bfloat16 copy of the model; pooling and normalisation in float32. Fast where the CPU
  has bfloat16 instructions (AVX-512 BF16, AMX), slow where it emulates them.
- ``onnx`` and ``openvino``: an exported copy of the transformer run by ONNX Runtime (float32; ``pip install
  'pgsim[onnx]'``) or by OpenVINO (bfloat16 where the CPU computes in it, else float32); see
  :mod:`pgsim.exported`.
- ``auto``: each candidate encodes the same calibration texts (the packaged Debian sample); the fastest
  whose vectors keep a cosine of at least ``MIN_COSINE`` with float32's wins. The choice is remembered per
  model revision and machine in the cache directory, and logged.
Every backend tokenises with the model's own tokenizer and truncates at its ``max_seq_length``.

The torch and OpenVINO backends run side by side: :func:`embed_batches` gives a call's batches to as many
threads ("lanes") as the caller has torch threads, each running its forward passes with its share of them
(OpenVINO on a model compiled with one stream per lane). On 2 cores one single-threaded torch pass per core
encodes 1-36 % more than one pass on two threads, since small matrices and the attention's softmax split
badly across threads (``python bench/encode.py``, its ``lanes=1`` row).
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
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from pgsim.errors import InvalidInput

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

BACKENDS = ("torch", "torch-bf16", "onnx", "openvino")
BACKEND_ENV = "PGSIM_BACKEND"  # the default backend when Encoder(backend=None); else "auto"
CACHE_ENV = "PGSIM_CACHE_DIR"
MIN_COSINE = 0.999  # a backend's vectors against float32's, worst text of the calibration set
CHOICE_FORMAT = "lanes"  # change when backends run differently, so remembered choices are measured again

Matrix = npt.NDArray[np.float32]

# A fast tokenizer raises "Already borrowed" when one thread changes its truncation (token counting turns it
# off, encoding on) while another encodes with it (huggingface/tokenizers#537, transformers#47085); every use
# of a model's tokenizer in pgsim holds this.
TOKENIZER_LOCK = threading.Lock()


class BackendUnavailable(InvalidInput):
    """A backend cannot run here (a missing package, a model it cannot export); the message says why."""


class Backend(Protocol):
    name: str
    reason: str  # why this backend: "requested", or what "auto" measured
    parallel: bool  # embed may run on several threads at once, each with a share of torch's threads

    def embed(self, texts: list[str]) -> Matrix:
        """L2-normalised float32 rows, one per text."""
        ...


def cache_dir() -> Path:
    """Where exports and choices are kept: ``$PGSIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/pgsim``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pgsim"


def normalised(rows: Any) -> Matrix:
    matrix = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.asarray(matrix / np.maximum(norms, 1e-12), dtype=np.float32)


class TorchBackend:
    """sentence-transformers' forward pass in the model's dtype (what ``model.encode`` runs for one batch);
    pooled rows normalised in float32."""

    def __init__(self, model: SentenceTransformer, name: str) -> None:
        self.model = model.eval()
        self.name = name
        self.reason = "requested"
        self.parallel = model.device.type == "cpu"
        self.prompt = default_prompt(model)

    def embed(self, texts: list[str]) -> Matrix:
        import torch
        from sentence_transformers.util import batch_to_device

        with TOKENIZER_LOCK:
            features = self.model.preprocess(texts, prompt=self.prompt)
        with torch.inference_mode():
            rows = self.model(batch_to_device(features, self.model.device))["sentence_embedding"]
        return normalised(rows.float().cpu().numpy())


def default_prompt(model: SentenceTransformer) -> str | None:
    """The prompt ``model.encode`` prepends to every text when given none (a model's ``default_prompt_name``)."""
    name = getattr(model, "default_prompt_name", None)
    return model.prompts.get(name) if name else None


def embed_batches(
    backend: Backend, batches: list[list[str]], lanes: int | None = None
) -> Generator[Matrix, None, None]:
    """``backend.embed`` of each batch, in order. A parallel backend runs ``lanes`` batches at a time (default:
    one per torch thread of the calling thread, at most one per batch) on threads of their own, each with
    ``threads // lanes`` torch threads; the calling thread and every other thread keep theirs. Stopping early
    cancels the batches not yet started."""
    import torch

    threads = torch.get_num_threads()
    lanes = lane_count(backend, lanes, len(batches))
    for_lanes = getattr(backend, "for_lanes", None)  # a backend that runs passes side by side its own way
    embed = for_lanes(lanes).embed if for_lanes else backend.embed
    if lanes == 1:
        yield from map(embed, batches)
        return
    pool = ThreadPoolExecutor(lanes, thread_name_prefix="pgsim-encode", initializer=_lane_threads,
                              initargs=(max(1, threads // lanes),))  # fmt: skip
    try:
        # torch.set_num_threads sets the calling thread's count and the one threads started later begin with:
        # once every lane has set its own, the count new threads begin with goes back to the caller's.
        ready = threading.Barrier(lanes, timeout=60)
        for started in [pool.submit(ready.wait) for _ in range(lanes)]:
            started.result()
        torch.set_num_threads(threads)
        for future in [pool.submit(embed, batch) for batch in batches]:
            yield future.result()
    finally:
        torch.set_num_threads(threads)
        pool.shutdown(wait=True, cancel_futures=True)


def lane_count(backend: Backend, lanes: int | None, batches: int) -> int:
    """How many lanes :func:`embed_batches` runs ``batches`` batches in: 1 for a backend that is not parallel,
    else ``lanes`` (None: the calling thread's torch threads), at most one per batch."""
    import torch

    if not getattr(backend, "parallel", False):
        return 1
    return max(1, min(torch.get_num_threads() if lanes is None else lanes, batches))


def _lane_threads(count: int) -> None:
    import torch

    torch.get_num_threads()  # torch's per-thread set-up, which would later reset the count to the process's
    torch.set_num_threads(count)


def bfloat16_copy(model: SentenceTransformer) -> SentenceTransformer:
    import copy

    import torch

    return copy.deepcopy(model).to(torch.bfloat16)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build(requested: str, model: SentenceTransformer, model_name: str, revision: str) -> Backend:
    """The backend named ``requested`` (one of BACKENDS) for ``model``."""
    if requested == "torch":
        return TorchBackend(model, "torch")
    if requested == "torch-bf16":
        return TorchBackend(bfloat16_copy(model), "torch-bf16")
    if requested in ("onnx", "openvino"):
        from pgsim.encoding.backends.exported import OnnxBackend, OpenVinoBackend  # they build on this module

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
    first pass that pays for lazy initialisation (OpenVINO's per-shape kernels among it). One timed pass
    of 64 texts picked the slower of torch-bf16 and openvino in one run of three here."""
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
