"""Forward passes for :class:`~pgsim.encode.Encoder`: torch in float32 or bfloat16, or ONNX Runtime, and
the choice among them.

- ``torch``: sentence-transformers as loaded (float32), the reference.
- ``torch-bf16``: a bfloat16 copy of the model; pooling and normalisation in float32. Fast where the CPU
  has bfloat16 instructions (AVX-512 BF16, AMX), slow where it emulates them.
- ``onnx``: the transformer exported once with ``torch.onnx`` into pgsim's cache directory, run by ONNX
  Runtime (``pip install 'pgsim[onnx]'``); pooling and normalisation in numpy. Models of a Transformer,
  a Pooling layer (mean, CLS or max) and optionally Normalize only.
- ``auto``: each candidate encodes the same calibration texts (the packaged Debian sample); the fastest
  whose vectors keep a cosine of at least ``MIN_COSINE`` with float32's wins. The choice is remembered per
  model revision and machine in the cache directory, and logged.
Every backend tokenises with the model's own tokenizer and truncates at its ``max_seq_length``.

The torch backends run side by side: :func:`embed_batches` gives a call's batches to as many threads
("lanes") as the caller has torch threads, each running its forward passes with its share of them. On 2
cores one single-threaded pass per core encodes 8-21 % more than one pass on two threads, since small
matrices and the attention's softmax split badly across threads (``python bench/encode.py``, its
``lanes=1`` row).
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
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from pgsim.errors import InvalidInput

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

BACKENDS = ("torch", "torch-bf16", "onnx")
BACKEND_ENV = "PGSIM_BACKEND"  # the default backend when Encoder(backend=None); else "auto"
CACHE_ENV = "PGSIM_CACHE_DIR"
MIN_COSINE = 0.999  # a backend's vectors against float32's, worst text of the calibration set
CALIBRATION_TEXTS = 64
EXPORT_FORMAT = 1  # bump when the export changes, so cached exports are rebuilt
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
        default_prompt = getattr(model, "default_prompt_name", None)  # what model.encode would prepend
        self.prompt = model.prompts.get(default_prompt) if default_prompt else None

    def embed(self, texts: list[str]) -> Matrix:
        import torch
        from sentence_transformers.util import batch_to_device

        with TOKENIZER_LOCK:
            features = self.model.preprocess(texts, prompt=self.prompt)
        with torch.inference_mode():
            rows = self.model(batch_to_device(features, self.model.device))["sentence_embedding"]
        return normalised(rows.float().cpu().numpy())


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
    if lanes == 1:
        yield from map(backend.embed, batches)
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
        for future in [pool.submit(backend.embed, batch) for batch in batches]:
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


class OnnxBackend:
    """The model's transformer under ONNX Runtime; its pooling and normalisation in numpy."""

    name = "onnx"
    reason = "requested"
    parallel = False  # ONNX Runtime's session has its own thread pool, sized at creation

    def __init__(self, model: SentenceTransformer, model_name: str, revision: str) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise BackendUnavailable(
                "The onnx backend needs ONNX Runtime: pip install 'pgsim[onnx]' (onnxruntime and onnx)."
            ) from None
        self.pooling = pooling_mode(model)
        self.tokenizer = model.tokenizer
        self.max_tokens = int(model.max_seq_length or 512)
        with TOKENIZER_LOCK:
            self.input_names = sorted(model.tokenizer(["probe"], return_tensors="np").keys())
        directory = cache_dir() / "onnx" / f"{_safe(model_name)}-{revision}"
        self.session = _load_or_export(onnxruntime, model, directory, self.input_names, self.run)

    def embed(self, texts: list[str]) -> Matrix:
        return self.run(self.session, texts)

    def run(self, session: Any, texts: list[str]) -> Matrix:
        with TOKENIZER_LOCK:
            batch = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="np"
            )
        feeds = {name: np.asarray(batch[name], dtype=np.int64) for name in self.input_names}
        hidden = session.run(None, feeds)[0]
        return normalised(pool(hidden, np.asarray(batch["attention_mask"]), self.pooling))


def pooling_mode(model: SentenceTransformer) -> str:
    """``mean``, ``cls`` or ``max`` for a Transformer + Pooling (+ Normalize) model; else the backend cannot
    reproduce the model outside torch."""
    kinds = [type(module).__name__ for module in model]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise BackendUnavailable(
            f"The onnx backend runs Transformer + Pooling (+ Normalize) models; this one is {' + '.join(kinds)}."
        )
    config = cast(Any, model)[1].get_config_dict()
    named = config.get("pooling_mode")  # sentence-transformers 6; older versions set one flag per mode
    modes = (
        [named]
        if isinstance(named, str)
        else [m for m in ("mean", "cls", "max") if config.get(f"pooling_mode_{m}_tokens")]
    )
    if len(modes) != 1 or modes[0] not in ("mean", "cls", "max"):
        raise BackendUnavailable(f"The onnx backend pools by mean, CLS or max alone; this model's pooling is {config}.")
    return str(modes[0])


def pool(hidden: Any, mask: Any, mode: str) -> Matrix:
    hidden = np.asarray(hidden, dtype=np.float32)
    weights = mask[..., None].astype(np.float32)
    if mode == "cls":
        return np.asarray(hidden[:, 0], dtype=np.float32)
    if mode == "max":
        return np.asarray(np.where(weights > 0, hidden, -1e9).max(axis=1), dtype=np.float32)
    return np.asarray((hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9), dtype=np.float32)


PROBE_TEXTS = ["pgsim checks an exported model against torch", "a short one"]


def _load_or_export(
    onnxruntime: Any,
    model: SentenceTransformer,
    directory: Path,
    inputs: list[str],
    run: Callable[[Any, list[str]], Matrix],
) -> Any:
    """The cached export's session, after checking that ``run`` with it answers like torch; a missing,
    corrupted or stale export is (re)built first."""
    path, meta_path = directory / "model.onnx", directory / "export.json"
    expected = {"format": EXPORT_FORMAT, "inputs": inputs, "onnxruntime": onnxruntime.__version__}
    for attempt in ("cached", "rebuilt"):
        if attempt == "rebuilt" or not path.is_file() or _read_json(meta_path) != expected:
            _export(model, directory, inputs, expected)
        try:
            session = _session(onnxruntime, path)
            reference = TorchBackend(model, "torch").embed(PROBE_TEXTS)
            if float(np.min(np.sum(run(session, PROBE_TEXTS) * reference, axis=1))) >= 1 - 1e-4:
                return session
            problem = "its vectors differ from torch's"
        except Exception as exc:  # ONNX Runtime's own errors for a truncated or foreign file
            problem = f"{type(exc).__name__}: {exc}"
        if attempt == "cached":
            warnings.warn(
                f"The cached ONNX export in {directory} is unusable ({problem}); exporting again.", stacklevel=4
            )
    raise BackendUnavailable(f"The ONNX export in {directory} does not reproduce the model: {problem}")


def _session(onnxruntime: Any, path: Path) -> Any:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    import torch

    options.intra_op_num_threads = torch.get_num_threads()  # as many as torch: OMP_NUM_THREADS when a pool set it
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export(model: SentenceTransformer, directory: Path, inputs: list[str], meta: dict[str, Any]) -> None:
    """torch.onnx export of the transformer with dynamic batch and sequence axes, written to a temporary
    file and renamed, so a crash never leaves half a file behind."""
    import torch

    try:
        import onnx  # noqa: F401 - torch.onnx needs it
    except ImportError:
        raise BackendUnavailable("Exporting to ONNX needs the onnx package: pip install 'pgsim[onnx]'.") from None
    transformer = cast(Any, model)[0].auto_model.eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, *args: Any) -> Any:
            return self.transformer(**dict(zip(inputs, args, strict=True))).last_hidden_state

    with TOKENIZER_LOCK:
        sample = model.tokenizer(["an example", "a longer example text"], padding=True, return_tensors="pt")
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f"model.onnx.{os.getpid()}.partial"
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python control flow in the model
            torch.onnx.export(
                LastHiddenState(),
                tuple(sample[name] for name in inputs),
                str(partial),
                input_names=inputs,
                output_names=["last_hidden_state"],
                dynamic_axes={name: {0: "batch", 1: "tokens"} for name in [*inputs, "last_hidden_state"]},
                opset_version=17,
                dynamo=False,
            )
    except Exception as exc:
        partial.unlink(missing_ok=True)
        raise BackendUnavailable(f"Exporting the model to ONNX failed: {type(exc).__name__}: {exc}") from None
    partial.replace(directory / "model.onnx")
    (directory / "export.json").write_text(json.dumps(meta))
    log.info("exported the model to %s in %.1fs", directory, time.perf_counter() - started)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _safe(name: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in name)[-80:]


def build(requested: str, model: SentenceTransformer, model_name: str, revision: str) -> Backend:
    """The backend named ``requested`` (one of BACKENDS) for ``model``."""
    if requested == "torch":
        return TorchBackend(model, "torch")
    if requested == "torch-bf16":
        return TorchBackend(bfloat16_copy(model), "torch-bf16")
    if requested == "onnx":
        return OnnxBackend(model, model_name, revision)
    raise InvalidInput(f"Unknown encoder backend {requested!r}; choose auto, {', '.join(BACKENDS)}.")


_choices_lock = threading.Lock()


def choose(model: SentenceTransformer, model_name: str, revision: str, calibration: list[str]) -> Backend:
    """``auto``: the fastest backend whose vectors keep MIN_COSINE with float32's on ``calibration``; the
    measurement is remembered in the cache directory (per model revision, machine and versions)."""
    import torch

    key = "|".join(
        [revision, platform.machine(), platform.processor() or "", torch.__version__, _cpu_flags(), CHOICE_FORMAT]
    )
    choices_path = cache_dir() / "backend-choices.json"
    with _choices_lock:
        known = _read_json(choices_path) or {}
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
    for name in ("torch-bf16", "onnx"):
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
    backend.embed(batches[-1])  # warm-up: the first call pays for lazy initialisation
    started = time.perf_counter()
    vectors = np.concatenate(list(embed_batches(backend, batches)))  # as the Encoder runs them
    return vectors, len(vectors) / (time.perf_counter() - started)


def _cpu_flags() -> str:
    """The CPU features that decide which backend is fast (Linux; elsewhere the processor name decides)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    wanted = ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx512f", "avx2")
    return ",".join(flag for flag in wanted if f" {flag}" in text)
