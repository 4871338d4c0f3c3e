"""Running a cached export without torch, sentence-transformers or transformers: a new process's first
query would otherwise wait seconds for their imports and for loading the model, while the exported
backends need none of it.

When an exported backend has been built and checked against torch (:meth:`.ExportedBackend.for_model`),
:func:`remember` writes beside the export what it took: the inputs, pooling, prompt and dimension, the
tokenizer's settings and its file's digest (only when tokenizer.json under the ``tokenizers`` package was
found to tokenise as the model does), and torch's vectors for the probe texts. :func:`load` opens the export
from that record and checks it against those vectors instead of against torch; anything that does not
match (another runtime version, another tokenizer file, other vectors, no record) sends the caller back
to the path through torch, which checks, rebuilds and records again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pgsim.encoding.backends.base import MIN_COSINE, read_json
from pgsim.encoding.backends.exported import PROBE_TEXTS, ExportedBackend, Spec, export_path
from pgsim.encoding.backends.tokens import FileTokens, file_digest
from pgsim.encoding.backends.torch import TorchBackend

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

RECORD = "standalone.json"
RECORD_FORMAT = 1  # bump when what is recorded changes, so older records are not used


def remember(backend: ExportedBackend, model: SentenceTransformer) -> None:
    """Record beside ``backend``'s export what :func:`load` needs; nothing when its tokeniser is the model's
    own (the export then needs transformers to run). A cache that cannot be written is left as it is."""
    tokens = backend.spec.tokens
    if not isinstance(tokens, FileTokens):
        return
    record = {
        "format": RECORD_FORMAT,
        "export": backend.expected,
        "pooling": backend.spec.pooling,
        "prompt": backend.spec.prompt,
        "inputs": backend.spec.inputs,
        "dimension": backend.spec.dimension,
        "tokenizer": {"digest": file_digest(tokens.path), **tokens.settings},
        "probe": TorchBackend(model, "torch").embed(PROBE_TEXTS).tolist(),
    }
    path = backend.path.parent / RECORD
    if read_json(path) == json.loads(json.dumps(record)):
        return
    try:
        partial = path.with_name(f"{RECORD}.{os.getpid()}.partial")
        partial.write_text(json.dumps(record))
        partial.replace(path)  # whole or not at all, for another process reading it
    except OSError as exc:
        log.info("cannot record %s: %s", path, exc)


def load(backend: str, model_name: str, revision: str, model_directory: Path) -> ExportedBackend | None:
    """The ``backend`` ("onnx" or "openvino") for ``model_name`` at ``revision`` from its cached export and
    record, without importing torch; None when there is none or it does not match (see the module's notes)."""
    from pgsim.encoding.backends.onnx import OnnxBackend
    from pgsim.encoding.backends.openvino import OpenVinoBackend

    kind = OnnxBackend if backend == "onnx" else OpenVinoBackend
    directory = export_path(backend, model_name, revision)
    record: Any = read_json(directory / RECORD)
    tokenizer_file = model_directory / "tokenizer.json"
    try:
        if (
            not isinstance(record, dict)
            or record.get("format") != RECORD_FORMAT
            or record["export"] != read_json(directory / "export.json")
            or not tokenizer_file.is_file()
            or file_digest(tokenizer_file) != record["tokenizer"]["digest"]
        ):
            return None
        settings = {key: value for key, value in record["tokenizer"].items() if key != "digest"}
        tokens = FileTokens(tokenizer_file, **settings)
        spec = Spec(record["pooling"], record["prompt"], record["inputs"], tokens, record["dimension"])
        loaded = kind(spec, directory / kind.file)
        if loaded.expected != record["export"]:  # the runtime was upgraded since: rebuilt through torch
            return None
        cosine = float(np.min(np.sum(loaded.embed(PROBE_TEXTS) * np.asarray(record["probe"]), axis=1)))
        if cosine < MIN_COSINE:
            log.info("the cached %s export of %s gives other vectors (cosine %.5f)", backend, model_name, cosine)
            return None
    except Exception as exc:  # a damaged record or export, a missing runtime: the path through torch says why
        log.info("cannot run the cached %s export of %s without torch: %r", backend, model_name, exc)
        return None
    return loaded
