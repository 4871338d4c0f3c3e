"""What every encoder backend shares: the protocol callers use, the cache directory, normalisation, and
the lock every use of a model's tokenizer holds. The backends themselves: :mod:`.torch` (float32, the
reference, and bfloat16), :mod:`.onnx` and :mod:`.openvino` (exported copies, see :mod:`.exported`),
and :mod:`.auto`, which measures them and picks one. :mod:`.lanes` runs a call's batches side by side.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from pgsim.errors import InvalidInput

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

BACKENDS = ("torch", "torch-bf16", "onnx", "openvino")
BACKEND_ENV = "PGSIM_BACKEND"  # the default backend when Encoder(backend=None); else "auto"
CACHE_ENV = "PGSIM_CACHE_DIR"
MIN_COSINE = 0.999  # a backend's vectors against float32's, worst text of the calibration set

Matrix = npt.NDArray[np.float32]

# A fast tokenizer raises "Already borrowed" when one thread changes its truncation (token counting turns it
# off, encoding on) while another encodes with it (huggingface/tokenizers#537, transformers#47085); every use
# of a model's tokenizer in pgsim holds this.
TOKENIZER_LOCK = threading.Lock()


class BackendUnavailable(InvalidInput):
    """A backend cannot run here (a missing package, a model it cannot export); the message says why."""


class Pass(Protocol):
    def embed(self, texts: list[str]) -> Matrix:
        """L2-normalised float32 rows, one per text."""
        ...


class Backend(Pass, Protocol):
    name: str
    reason: str  # why this backend: "requested", or what "auto" measured
    parallel: bool  # embed may run on several threads at once, each with a share of torch's threads
    precision: str | None  # what the forward pass computes in ("bf16"), where the name does not say it

    def for_lanes(self, lanes: int) -> Pass:
        """What runs one of ``lanes`` passes side by side (most backends: themselves)."""
        ...


def cache_dir() -> Path:
    """Where exports and choices are kept: ``$PGSIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/pgsim``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pgsim"


def torch_threads() -> int:
    """torch's thread count for the calling thread; where nothing imported torch, the count it would start
    with (``OMP_NUM_THREADS``, else the physical cores), so a backend that does not run on torch sizes its
    threads as a torch one would without importing torch."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    try:
        blocks = [
            {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in chunk.splitlines())}
            for chunk in Path("/proc/cpuinfo").read_text().split("\n\n")
        ]
        cores = {(block.get("physical id"), block["core id"]) for block in blocks if "core id" in block}
    except OSError:
        cores = set()
    return len(cores) or os.cpu_count() or 1


def normalised(rows: Any) -> Matrix:
    matrix = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.asarray(matrix / np.maximum(norms, 1e-12), dtype=np.float32)


def default_prompt(model: SentenceTransformer) -> str | None:
    """The prompt ``model.encode`` prepends to every text when given none (a model's ``default_prompt_name``)."""
    name = getattr(model, "default_prompt_name", None)
    return model.prompts.get(name) if name else None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
