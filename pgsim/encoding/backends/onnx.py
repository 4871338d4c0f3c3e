"""``onnx``: the model's transformer exported with ``torch.onnx`` and run by ONNX Runtime in float32
(``pip install 'pgsim[onnx]'``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgsim.encoding.backends.base import BackendUnavailable, Matrix, torch_threads
from pgsim.encoding.backends.exported import ExportedBackend, last_hidden_state

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


class OnnxBackend(ExportedBackend):
    """The model's transformer under ONNX Runtime."""

    name = "onnx"
    runtime = "onnxruntime"
    file = "model.onnx"
    parallel = False  # ONNX Runtime's session has its own thread pool, sized at creation

    def start(self) -> str:
        try:
            import onnxruntime
        except ImportError:
            raise BackendUnavailable(
                "The onnx backend needs ONNX Runtime: pip install 'pgsim[onnx]' (onnxruntime and onnx)."
            ) from None
        self.onnxruntime = onnxruntime
        return str(onnxruntime.__version__)

    def open(self, path: Path) -> Any:
        return onnx_session(self.onnxruntime, path)

    def export(self, model: SentenceTransformer, path: Path) -> None:
        _onnx_export(model, path, self.spec.inputs)

    def run(self, session: Any, texts: list[str]) -> Matrix:
        feeds, mask = self.tokenised(texts)
        return self.pooled(session.run(None, feeds)[0], mask)


def onnx_session(onnxruntime: Any, path: Path) -> Any:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch_threads()  # as many as torch: OMP_NUM_THREADS when a pool set it
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_export(model: SentenceTransformer, path: Path, inputs: list[str]) -> None:
    """torch.onnx export with dynamic batch and sequence axes, written to a temporary file and renamed, so a
    crash never leaves half a file behind."""
    import torch

    try:
        import onnx  # noqa: F401 - torch.onnx needs it
    except ImportError:
        raise BackendUnavailable("Exporting to ONNX needs the onnx package: pip install 'pgsim[onnx]'.") from None
    module, sample = last_hidden_state(model, inputs)
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
