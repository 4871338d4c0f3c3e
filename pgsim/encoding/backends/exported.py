"""Backends that run an exported copy of the model's transformer outside torch.

- ``onnx``: exported with ``torch.onnx`` and run by ONNX Runtime (``pip install 'pgsim[onnx]'``), in float32.
- ``openvino``: converted by OpenVINO's PyTorch frontend (no ``onnx`` package needed) and run by its CPU
  plugin in bfloat16 where the CPU computes in it (AVX-512 BF16, AMX), else float32. The Encoder's lanes
  run side by side on a compiled model with one stream per lane.

Both tokenise with the model's own tokenizer, truncate at its ``max_seq_length``, and pool and normalise in
numpy, for models of a Transformer, a Pooling layer (mean, CLS or max) and optionally Normalize only. Each
keeps its export in pgsim's cache directory (per model revision) and checks it against torch on loading:
a missing, corrupted or stale export (an older pgsim's or runtime's) is built again.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from pgsim.encoding.backends.base import (
    CACHE_ENV,
    MIN_COSINE,
    TOKENIZER_LOCK,
    BackendUnavailable,
    Matrix,
    TorchBackend,
    cache_dir,
    default_prompt,
    normalised,
    read_json,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # bump when an export changes, so cached exports are rebuilt
PROBE_TEXTS = ["pgsim checks an exported model against torch", "a short one", "three texts, three lengths"]


class ExportedBackend:
    """What the exported backends share: the model's tokenizer and truncation, pooling in numpy."""

    name = ""
    reason = "requested"
    parallel = False

    def __init__(self, model: SentenceTransformer) -> None:
        self.pooling = pooling_mode(model, self.name)
        self.tokenizer = model.tokenizer
        self.max_tokens = int(model.max_seq_length or 512)
        self.prompt = default_prompt(model) or ""  # prepended as sentence-transformers does
        with TOKENIZER_LOCK:
            self.input_names = sorted(model.tokenizer(["probe"], return_tensors="np").keys())

    def directory(self, model_name: str, revision: str) -> Path:
        return cache_dir() / self.name / f"{_safe(model_name)}-{revision}"

    def tokenised(self, texts: list[str]) -> tuple[dict[str, Any], Any]:
        """The model's inputs by name, and the attention mask."""
        if self.prompt:
            texts = [self.prompt + text for text in texts]
        with TOKENIZER_LOCK:
            batch = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="np"
            )
        return {name: np.asarray(batch[name], dtype=np.int64) for name in self.input_names}, batch["attention_mask"]

    def pooled(self, hidden: Any, mask: Any) -> Matrix:
        return normalised(pool(hidden, np.asarray(mask), self.pooling))


class OnnxBackend(ExportedBackend):
    """The model's transformer under ONNX Runtime."""

    name = "onnx"
    parallel = False  # ONNX Runtime's session has its own thread pool, sized at creation

    def __init__(self, model: SentenceTransformer, model_name: str, revision: str) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise BackendUnavailable(
                "The onnx backend needs ONNX Runtime: pip install 'pgsim[onnx]' (onnxruntime and onnx)."
            ) from None
        super().__init__(model)
        self.session = load_or_export(
            model,
            self.directory(model_name, revision) / "model.onnx",
            {"format": EXPORT_FORMAT, "inputs": self.input_names, "onnxruntime": onnxruntime.__version__},
            export=lambda path: _onnx_export(model, path, self.input_names),
            load=lambda path: onnx_session(onnxruntime, path),
            run=self.run,
        )

    def embed(self, texts: list[str]) -> Matrix:
        return self.run(self.session, texts)

    def run(self, session: Any, texts: list[str]) -> Matrix:
        feeds, mask = self.tokenised(texts)
        return self.pooled(session.run(None, feeds)[0], mask)


class OpenVinoBackend(ExportedBackend):
    """The model's transformer under OpenVINO's CPU plugin. Passes run side by side on a compiled model with
    one stream per lane (:meth:`for_lanes`); a pass alone runs on one stream with all the caller's threads."""

    name = "openvino"
    parallel = True

    def __init__(self, model: SentenceTransformer, model_name: str, revision: str) -> None:
        try:
            openvino = import_openvino()
        except ImportError:
            raise BackendUnavailable("The openvino backend needs OpenVINO: pip install openvino.") from None
        super().__init__(model)
        self.core = openvino.Core()
        # Read the weights, not map them: a mapped .bin cut short later (a cache cleaned while this process
        # runs) would kill the process with SIGBUS; the CPU plugin repacks the weights anyway.
        self.core.set_property({"ENABLE_MMAP": False})
        self.capabilities = self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        self.streams: dict[tuple[int, int], OpenVinoStreams] = {}  # by (lanes, threads)
        self.streams_lock = threading.Lock()
        self.model = load_or_export(
            model,
            self.directory(model_name, revision) / "model.xml",
            {"format": EXPORT_FORMAT, "inputs": self.input_names, "openvino": openvino.__version__},
            export=lambda path: _openvino_export(model, path, self.input_names),
            load=self.core.read_model,
            run=lambda read, texts: self.run(self.compile(read, 1, 1).create_infer_request(), texts),
        )
        self.precision = self.for_lanes(1).compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        log.info("openvino computes in %s here", self.precision)  # bf16 where the CPU has it, else f32

    def compile(self, model: Any, lanes: int, threads: int) -> Any:
        options = {
            "NUM_STREAMS": str(lanes),
            "INFERENCE_NUM_THREADS": str(threads),
            # No pinning: OpenVINO pins each process's threads from core 0 on, so `--processes 2` ran both
            # workers on one core (38 + 38 texts/s against 81 + 79 unpinned; one process: 155 vs 167).
            "ENABLE_CPU_PINNING": False,
            # Said, not left to the plugin: on ARM its default is float16, which nobody measured here.
            "INFERENCE_PRECISION_HINT": "bf16" if "BF16" in self.capabilities else "f32",
        }
        return self.core.compile_model(model, "CPU", options)

    def for_lanes(self, lanes: int) -> OpenVinoStreams:
        """The model compiled for ``lanes`` passes side by side on the calling thread's torch threads (lanes
        rounded up to a power of two, at most one per thread, so a process keeps a few compiled copies, not
        one per count, and never runs more threads than it has)."""
        import torch

        threads = torch.get_num_threads()
        key = (min(1 << (lanes - 1).bit_length(), threads), threads)
        with self.streams_lock:
            found = self.streams.get(key)
        if found is None:  # compiled outside the lock: other callers keep encoding meanwhile
            compiled = OpenVinoStreams(self, self.compile(self.model, *key))
            with self.streams_lock:
                found = self.streams.setdefault(key, compiled)
        return found

    def embed(self, texts: list[str]) -> Matrix:
        return self.for_lanes(1).embed(texts)

    def run(self, request: Any, texts: list[str]) -> Matrix:
        feeds, mask = self.tokenised(texts)
        # infer releases the GIL and returns a copy of the output, so the request can serve the next pass
        return self.pooled(request.infer([feeds[name] for name in self.input_names])[0], mask)


class OpenVinoStreams:
    """A compiled model and its idle infer requests: one request per pass in flight, reused."""

    def __init__(self, backend: OpenVinoBackend, compiled: Any) -> None:
        self.backend, self.compiled = backend, compiled
        self.idle: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def embed(self, texts: list[str]) -> Matrix:
        try:
            request = self.idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            return self.backend.run(request, texts)
        finally:
            self.idle.put(request)


def import_openvino() -> Any:
    """``import openvino``, without the usage report it sends on import when the user never chose.

    Importing openvino reports the import to Intel's analytics (and writes a client id under ~/intel) unless
    a consent file says no or a CI variable is set: openvino-telemetry counts a missing consent file as
    consent. pgsim picks this backend for the user, so the import must not report for them: while pgsim
    imports it, "no consent file" counts as declined. A user's own recorded choice (``opt_in_out``) stands,
    and a process that imported openvino before pgsim keeps whatever it did."""
    import sys

    if "openvino" in sys.modules:  # imported already (or blocked: None, and the import raises)
        import openvino

        return openvino
    try:
        from openvino_telemetry.main import OptInChecker
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult
    except ImportError:  # no telemetry package: nothing is reported
        import openvino

        return openvino
    asked = OptInChecker.check

    def check(self: Any, *args: Any, **kwargs: Any) -> Any:
        answer = asked(self, *args, **kwargs)
        return ConsentCheckResult.DECLINED if answer == ConsentCheckResult.NO_FILE else answer

    OptInChecker.check = check
    try:
        import openvino
    finally:
        OptInChecker.check = asked
    return openvino


def pooling_mode(model: SentenceTransformer, backend: str) -> str:
    """``mean``, ``cls`` or ``max`` for a Transformer + Pooling (+ Normalize) model; else the backend cannot
    reproduce the model outside torch."""
    kinds = [type(module).__name__ for module in model]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise BackendUnavailable(
            f"The {backend} backend runs Transformer + Pooling (+ Normalize) models; this one is {' + '.join(kinds)}."
        )
    config = cast(Any, model)[1].get_config_dict()
    named = config.get("pooling_mode")  # sentence-transformers 6; older versions set one flag per mode
    modes = (
        [named]
        if isinstance(named, str)
        else [m for m in ("mean", "cls", "max") if config.get(f"pooling_mode_{m}_tokens")]
    )
    if len(modes) != 1 or modes[0] not in ("mean", "cls", "max"):
        raise BackendUnavailable(f"The {backend} backend pools by mean, CLS or max alone; this model's is {config}.")
    if config.get("include_prompt") is False and default_prompt(model):
        raise BackendUnavailable(f"The {backend} backend pools over every token; this model leaves its prompt out.")
    return str(modes[0])


def pool(hidden: Any, mask: Any, mode: str) -> Matrix:
    hidden = np.asarray(hidden, dtype=np.float32)
    weights = mask[..., None].astype(np.float32)
    if mode == "cls":
        return np.asarray(hidden[:, 0], dtype=np.float32)
    if mode == "max":
        return np.asarray(np.where(weights > 0, hidden, -1e9).max(axis=1), dtype=np.float32)
    return np.asarray((hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9), dtype=np.float32)


def load_or_export(
    model: SentenceTransformer,
    path: Path,
    expected: dict[str, Any],
    export: Callable[[Path], None],
    load: Callable[[Path], Any],
    run: Callable[[Any, list[str]], Matrix],
) -> Any:
    """``load(path)``, after checking that ``run`` with it answers like torch; a missing, corrupted or stale
    export (its ``export.json`` differs from ``expected``) is built first with ``export(path)``, and once more
    when the cached one fails the check."""
    meta_path = path.parent / "export.json"
    for attempt in ("cached", "rebuilt"):
        if attempt == "rebuilt" or not path.is_file() or read_json(meta_path) != expected:
            started = time.perf_counter()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                export(path)
                meta_path.write_text(json.dumps(expected))
            except OSError as exc:  # a read-only or full disk: this backend cannot run, the others can
                raise BackendUnavailable(
                    f"Cannot write the export to {path.parent} ({exc}); set {CACHE_ENV} to a writable directory."
                ) from None
            log.info("exported the model to %s in %.1fs", path, time.perf_counter() - started)
        try:
            loaded = load(path)
            reference = TorchBackend(model, "torch").embed(PROBE_TEXTS)
            if float(np.min(np.sum(run(loaded, PROBE_TEXTS) * reference, axis=1))) >= MIN_COSINE:
                return loaded
            problem = "its vectors differ from torch's"
        except Exception as exc:  # the runtime's own errors for a truncated or foreign file
            problem = f"{type(exc).__name__}: {' '.join(str(exc).split())}"  # OpenVINO's span lines
        if attempt == "cached":
            warnings.warn(f"The cached export {path} is unusable ({problem}); exporting again.", stacklevel=4)
    raise BackendUnavailable(f"The export {path} does not reproduce the model: {problem}")


def onnx_session(onnxruntime: Any, path: Path) -> Any:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    import torch

    options.intra_op_num_threads = torch.get_num_threads()  # as many as torch: OMP_NUM_THREADS when a pool set it
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _last_hidden_state(model: SentenceTransformer, inputs: list[str]) -> tuple[Any, tuple[Any, ...]]:
    """The transformer as a module taking ``inputs`` in order and giving its last hidden state, and a sample
    of those inputs to trace it with."""
    import torch

    transformer = cast(Any, model)[0].auto_model.eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, *args: Any) -> Any:
            return self.transformer(**dict(zip(inputs, args, strict=True))).last_hidden_state

    with TOKENIZER_LOCK:
        sample = model.tokenizer(["an example", "a longer example text"], padding=True, return_tensors="pt")
    return LastHiddenState(), tuple(sample[name] for name in inputs)


def _onnx_export(model: SentenceTransformer, path: Path, inputs: list[str]) -> None:
    """torch.onnx export with dynamic batch and sequence axes, written to a temporary file and renamed, so a
    crash never leaves half a file behind."""
    import torch

    try:
        import onnx  # noqa: F401 - torch.onnx needs it
    except ImportError:
        raise BackendUnavailable("Exporting to ONNX needs the onnx package: pip install 'pgsim[onnx]'.") from None
    module, sample = _last_hidden_state(model, inputs)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python control flow in the model
            torch.onnx.export(
                module,
                sample,
                str(partial),
                input_names=inputs,
                output_names=["last_hidden_state"],
                dynamic_axes={name: {0: "batch", 1: "tokens"} for name in [*inputs, "last_hidden_state"]},
                opset_version=17,
                dynamo=False,
            )
        partial.replace(path)
    except Exception as exc:
        raise BackendUnavailable(f"Exporting the model to ONNX failed: {type(exc).__name__}: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)  # left only by a failure or an interrupt


def _openvino_export(model: SentenceTransformer, path: Path, inputs: list[str]) -> None:
    """The traced transformer converted by OpenVINO's PyTorch frontend (every input dimension dynamic), saved
    with float32 weights as ``path`` (.xml) and its .bin, each under a temporary name and renamed (the .bin
    first: a crash between the two leaves a pair the check against torch rejects).

    Not ``openvino.convert_model``: that tool sends usage telemetry to Intel unless the user opted out
    beforehand (openvino-telemetry treats a missing consent file as consent); the frontend sends nothing."""
    openvino = import_openvino()
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    module, sample = _last_hidden_state(model, inputs)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.xml")
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes on Python control flow in the model
                # the decoder must outlive the conversion: the frontend calls back into it
                decoder = TorchScriptPythonDecoder(module, example_input=sample)
                frontend = FrontEndManager().load_by_framework("pytorch")
                converted = frontend.convert(frontend.load(decoder))
            openvino.save_model(converted, str(partial), compress_to_fp16=False)  # the default halves the weights
        except Exception as exc:
            raise BackendUnavailable(f"Converting the model to OpenVINO failed: {type(exc).__name__}: {exc}") from None
        partial.with_suffix(".bin").replace(path.with_suffix(".bin"))
        partial.replace(path)
    finally:
        for leftover in (partial, partial.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)  # left only by a failure or an interrupt


def _safe(name: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in name)[-80:]
