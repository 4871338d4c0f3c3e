"""Backends that run an exported copy of the model's transformer outside torch.

- ``onnx``: exported with ``torch.onnx`` and run by ONNX Runtime (``pip install 'pgsim[onnx]'``), in float32.
- ``openvino``: converted by OpenVINO's PyTorch frontend (no ``onnx`` package needed) and run by its CPU
  plugin in bfloat16 where the CPU computes in it (AVX-512 BF16, AMX), else float32. The Encoder's lanes
  run side by side on a compiled model with one stream per lane.

Both tokenise as the model does (its tokenizer.json under the ``tokenizers`` package where that was checked
to give the same inputs, see :mod:`.tokens`), truncate at its ``max_seq_length``, and pool and normalise in
numpy, for models of a Transformer, a Pooling layer (mean, CLS or max) and optionally Normalize only. Each
keeps its export in pgsim's cache directory (per model revision) and checks it against torch on loading:
a missing, corrupted or stale export (an older pgsim's or runtime's) is built again. What a later process
needs to run a checked export without importing torch is recorded beside it (:mod:`.standalone`).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from pgsim.encoding.backends.base import (
    CACHE_ENV,
    MIN_COSINE,
    TOKENIZER_LOCK,
    BackendUnavailable,
    Matrix,
    Pass,
    cache_dir,
    default_prompt,
    normalised,
    read_json,
)
from pgsim.encoding.backends.tokens import ModelTokens, Tokens, from_model_files, same_as_model
from pgsim.encoding.backends.torch import TorchBackend

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # bump when an export changes, so cached exports are rebuilt
PROBE_TEXTS = ["pgsim checks an exported model against torch", "a short one", "three texts, three lengths"]


@dataclass
class Spec:
    """How an exported backend feeds the transformer and reads it: its inputs, the tokeniser that makes
    them, the default prompt, the pooling, and the vectors' dimension."""

    pooling: str
    prompt: str
    inputs: list[str]
    tokens: Tokens
    dimension: int


def model_spec(model: SentenceTransformer, backend: str, directory: Path | None) -> Spec:
    """``model``'s :class:`Spec`: its tokenizer.json under the tokenizers package where that tokenises as
    sentence-transformers does (checked on the calibration texts), else the model's own tokenizer."""
    from pgsim.encoding.models import _calibration_texts

    pooling = pooling_mode(model, backend)
    with TOKENIZER_LOCK:
        inputs = sorted(model.tokenizer(["probe"], return_tensors="np").keys())
    tokens: Tokens | None = from_model_files(model, directory)
    if tokens is not None and not same_as_model(tokens, model, inputs, PROBE_TEXTS + _calibration_texts()[:16]):
        log.info("%s does not tokenise as the model does; %s uses the model's tokenizer", directory, backend)
        tokens = None
    dimension = model.get_embedding_dimension()
    assert dimension is not None
    return Spec(pooling, default_prompt(model) or "", inputs, tokens or ModelTokens(model), int(dimension))


class ExportedBackend:
    """What the exported backends share: the export's path and runtime, tokenising, pooling in numpy.

    A subclass says which runtime package its export records (``runtime``, ``start`` imports it), how an
    export is opened and run, and how one is made from the model."""

    name = ""
    runtime = ""  # the package whose version an export records
    file = ""  # the export's file name in its directory
    reason = "requested"
    parallel = False
    precision: str | None = None  # float32, unless the runtime says otherwise

    def __init__(self, spec: Spec, path: Path, model: SentenceTransformer | None = None) -> None:
        """The export at ``path``. With ``model``: checked against torch, and made again when missing, stale
        or unusable; without: opened as it is (:mod:`.standalone` checks it against recorded vectors)."""
        self.spec, self.path, self.tokens = spec, path, spec.tokens
        self.expected: dict[str, Any] = {"format": EXPORT_FORMAT, "inputs": spec.inputs, self.runtime: self.start()}
        if model is None:
            self.handle = self.open(path)
        else:
            self.handle = load_or_export(
                model, path, self.expected, export=lambda path: self.export(model, path), load=self.open, run=self.run
            )

    @classmethod
    def for_model(cls, model: SentenceTransformer, model_name: str, revision: str) -> ExportedBackend:
        """The backend for ``model``, its export made or checked against torch; what a later process needs
        to run it without torch is recorded beside the export (:func:`.standalone.remember`)."""
        from pgsim.encoding.backends import standalone
        from pgsim.encoding.models import model_directory

        spec = model_spec(model, cls.name, model_directory(model_name))
        backend = cls(spec, export_path(cls.name, model_name, revision) / cls.file, model)
        standalone.remember(backend, model)
        return backend

    def start(self) -> str:
        """Imports the runtime (BackendUnavailable when missing); its version."""
        raise NotImplementedError

    def open(self, path: Path) -> Any:
        raise NotImplementedError

    def run(self, handle: Any, texts: list[str]) -> Matrix:
        raise NotImplementedError

    def export(self, model: SentenceTransformer, path: Path) -> None:
        raise NotImplementedError

    def for_lanes(self, lanes: int) -> Pass:
        return self

    def embed(self, texts: list[str]) -> Matrix:
        return self.run(self.handle, texts)

    def tokenised(self, texts: list[str]) -> tuple[dict[str, Any], Any]:
        """The model's inputs by name, and the attention mask."""
        if self.spec.prompt:
            texts = [self.spec.prompt + text for text in texts]
        batch = self.tokens.batch(texts)
        return {name: batch[name] for name in self.spec.inputs}, batch["attention_mask"]

    def pooled(self, hidden: Any, mask: Any) -> Matrix:
        return normalised(pool(hidden, np.asarray(mask), self.spec.pooling))


def export_path(backend: str, model_name: str, revision: str) -> Path:
    """The directory ``backend`` keeps its export of ``model_name`` at ``revision`` in."""
    return cache_dir() / backend / f"{_safe(model_name)}-{revision}"


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


def last_hidden_state(model: SentenceTransformer, inputs: list[str]) -> tuple[Any, tuple[Any, ...]]:
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


def _safe(name: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in name)[-80:]
