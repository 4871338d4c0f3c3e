"""``openvino``: the model's transformer converted by OpenVINO's PyTorch frontend (no ``onnx`` package
needed) and run by its CPU plugin in bfloat16 where the CPU computes in it (AVX-512 BF16, AMX), else
float32. The Encoder's lanes run side by side on a compiled model with one stream per lane; compiled models
are cached beside the export, so a later process's first query or first batches do not compile them."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import shutil
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgsim.encoding.backends.base import BackendUnavailable, Matrix, read_json, torch_threads
from pgsim.encoding.backends.exported import ExportedBackend, last_hidden_state

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)


class OpenVinoBackend(ExportedBackend):
    """The model's transformer under OpenVINO's CPU plugin. Passes run side by side on a model compiled with
    one stream per lane (:meth:`for_lanes`); a pass alone runs on one stream with all the caller's threads.
    What it compiles is cached beside the export, so a later process loads it instead."""

    name = "openvino"
    runtime = "openvino"
    file = "model.xml"
    parallel = True

    def start(self) -> str:
        try:
            openvino = import_openvino()
        except ImportError:
            raise BackendUnavailable("The openvino backend needs OpenVINO: pip install openvino.") from None
        self.core = openvino.Core()
        # Read the weights, not map them: a mapped .bin cut short later (a cache cleaned while this process
        # runs) would kill the process with SIGBUS; the CPU plugin repacks the weights anyway.
        self.core.set_property({"ENABLE_MMAP": False})
        self.capabilities = self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        self.streams: dict[tuple[int, int], OpenVinoStreams] = {}  # by (lanes, threads)
        self.streams_lock = threading.Lock()
        return str(openvino.__version__)

    def open(self, path: Path) -> Any:
        """The export's path (OpenVINO compiles from it); the precision the CPU plugin computes in here."""
        with self.streams_lock:
            self.streams.clear()  # compiled from another export
        self.handle = path
        self.precision = self.for_lanes(1).compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        log.info("openvino computes in %s here", self.precision)  # bf16 where the CPU has it, else f32
        return path

    def export(self, model: SentenceTransformer, path: Path) -> None:
        _openvino_export(model, path, self.spec.inputs)

    def compile(self, path: Path, lanes: int, threads: int) -> Any:
        options: dict[str, Any] = {
            "NUM_STREAMS": str(lanes),
            "INFERENCE_NUM_THREADS": str(threads),
            # No pinning: OpenVINO pins each process's threads from core 0 on, so `--processes 2` ran both
            # workers on one core (bench/ingest.py --parts processes shows it).
            "ENABLE_CPU_PINNING": False,
            # Said, not left to the plugin: on ARM its default is float16, which nobody measured here.
            "INFERENCE_PRECISION_HINT": "bf16" if "BF16" in self.capabilities else "f32",
        }
        compiled = compiled_cache(path)
        if compiled is not None:
            try:
                return self.core.compile_model(str(path), "CPU", {**options, "CACHE_DIR": str(compiled)})
            except RuntimeError as exc:  # an unwritable or damaged cache: compile as if there were none
                log.info("compiling %s without its cache (%s)", path, " ".join(str(exc).split()))
        return self.core.compile_model(str(path), "CPU", options)

    def for_lanes(self, lanes: int) -> OpenVinoStreams:
        """The model compiled for ``lanes`` passes side by side on the calling thread's torch threads (lanes
        rounded up to a power of two, at most one per thread, so a process keeps a few compiled copies, not
        one per count, and never runs more threads than it has)."""
        threads = torch_threads()
        key = (min(1 << (lanes - 1).bit_length(), threads), threads)
        with self.streams_lock:
            found = self.streams.get(key)
        if found is None:  # compiled outside the lock: other callers keep encoding meanwhile
            compiled = OpenVinoStreams(self, self.compile(self.handle, *key))
            with self.streams_lock:
                found = self.streams.setdefault(key, compiled)
        return found

    def embed(self, texts: list[str]) -> Matrix:
        return self.for_lanes(1).embed(texts)

    def run(self, handle: Any, texts: list[str]) -> Matrix:
        return self.for_lanes(1).embed(texts)

    def infer(self, request: Any, texts: list[str]) -> Matrix:
        feeds, mask = self.tokenised(texts)
        # infer releases the GIL and returns a copy of the output, so the request can serve the next pass
        return self.pooled(request.infer([feeds[name] for name in self.spec.inputs])[0], mask)


def compiled_cache(path: Path) -> Path | None:
    """Where OpenVINO caches what it compiles from the export at ``path``: a directory named after the
    export's files (OpenVINO's own cache key does not cover the weights' contents, so a rebuilt export
    must not meet an older compilation), older ones removed. None when the export's files are missing."""
    try:
        stats = [(item.stat().st_size, item.stat().st_mtime_ns) for item in (path, path.with_suffix(".bin"))]
    except OSError:
        return None
    digest = hashlib.sha256(f"{stats}|{read_json(path.parent / 'export.json')}".encode()).hexdigest()[:16]
    directory = path.parent / "compiled" / digest
    with contextlib.suppress(OSError):
        for old in (path.parent / "compiled").iterdir():
            if old.name != digest:
                shutil.rmtree(old, ignore_errors=True)
    return directory


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
            return self.backend.infer(request, texts)
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


def _openvino_export(model: SentenceTransformer, path: Path, inputs: list[str]) -> None:
    """The traced transformer converted by OpenVINO's PyTorch frontend (every input dimension dynamic), saved
    with float32 weights as ``path`` (.xml) and its .bin, each under a temporary name and renamed (the .bin
    first: a crash between the two leaves a pair the check against torch rejects).

    Not ``openvino.convert_model``: that tool sends usage telemetry to Intel unless the user opted out
    beforehand (openvino-telemetry treats a missing consent file as consent); the frontend sends nothing."""
    openvino = import_openvino()
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    module, sample = last_hidden_state(model, inputs)
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
