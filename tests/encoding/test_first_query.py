"""Issue 23, item 5: once an exported backend's export is cached (and checked against torch, which records
what a later process needs), a new process encodes with it without importing torch, sentence-transformers
or transformers, and its vectors are the ones the process with torch computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pgsim.encoding.backends import auto, measure
from pgsim.encoding.backends.auto import build
from pgsim.encoding.backends.standalone import RECORD
from pgsim.encoding.backends.tokens import FileTokens, ModelTokens, same_as_model
from pgsim.encoding.encoder import Encoder
from pgsim.encoding.models import load_model, model_directory, model_revision

MODEL = "all-MiniLM-L6-v2"
QUERY = "resize images from the command line"
HEAVY = ("torch", "sentence_transformers", "transformers")

CODE = """
import json, sys
import pgsim
encoder = pgsim.Encoder({model!r}, backend={backend!r})
vector = encoder.encode_query({query!r})
documents = encoder.encode({documents!r})
print(json.dumps({{
    "vector": vector.tolist(),
    "documents": [v.tolist() for v in documents],
    "heavy": [name for name in {heavy!r} if name in sys.modules],
    "backend": encoder.backend.name,
    "reason": encoder.backend.reason,
    "dimension": encoder.dimension,
    "max_tokens": encoder.max_tokens,
    "truncated": encoder.stats.truncated,
}}))
"""


def fresh_process(cache: Path, backend: str, documents: list[str]) -> dict[str, Any]:
    """Encode QUERY and ``documents`` in a new interpreter with ``cache`` as pgsim's cache directory."""
    env = {key: value for key, value in os.environ.items() if key != "PGSIM_BACKEND"}
    env.update(HF_HUB_OFFLINE="1", PGSIM_CACHE_DIR=str(cache))
    code = CODE.format(model=MODEL, backend=backend, query=QUERY, documents=documents, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.splitlines()[-1]))


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding the onnx export, made and checked through torch as a first run does."""
    directory = tmp_path_factory.mktemp("first-query-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGSIM_CACHE_DIR", str(directory))
        build("onnx", load_model(MODEL), MODEL, model_revision(MODEL))
    assert (directory / "onnx" / f"{MODEL}-{model_revision(MODEL)}" / RECORD).is_file()
    return directory


def torch_vectors(texts: list[str], kind: str = "document") -> np.ndarray:
    vectors = Encoder(MODEL, backend="torch", warn_truncation=False).encode(texts, kind=kind)  # type: ignore[arg-type]
    return np.stack(vectors)  # type: ignore[arg-type]


def test_importing_pgsim_imports_no_torch() -> None:
    code = f"import sys, pgsim, pgsim.cli.main; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_cached_onnx_export_encodes_in_a_new_process_without_torch(
    exports: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    documents = ["Fast JSON parser for C", "café naïve 日本語 🙂", " ".join(["word"] * 400)]
    found = fresh_process(exports, "onnx", documents)
    assert found["heavy"] == []
    assert (found["backend"], found["reason"]) == ("onnx", "requested")
    assert (found["dimension"], found["max_tokens"], found["truncated"]) == (384, 256, 1)
    expected = torch_vectors([QUERY], "query")[0]
    assert float(np.dot(found["vector"], expected)) > 0.999
    monkeypatch.setenv("PGSIM_CACHE_DIR", str(exports))
    through_torch = build("onnx", load_model(MODEL), MODEL, model_revision(MODEL))  # what a process with torch runs
    np.testing.assert_allclose(np.asarray(found["documents"]), through_torch.embed(documents), atol=1e-5)
    assert float(np.min(np.sum(np.asarray(found["documents"]) * torch_vectors(documents), axis=1))) > 0.999


def test_auto_runs_its_remembered_exported_choice_without_torch(exports: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "onnx").symlink_to(exports / "onnx", target_is_directory=True)
    key = auto._choice_key(model_revision(MODEL))
    remembered = {"backend": "onnx", "why": "measured onnx fastest (test)", "method": measure.METHOD}
    (cache / "backend-choices.json").write_text(json.dumps({key: remembered}))
    found = fresh_process(cache, "auto", [])
    assert found["heavy"] == []
    assert found["backend"] == "onnx"
    assert found["reason"] == "auto, chosen earlier: measured onnx fastest (test)"
    assert float(np.dot(found["vector"], torch_vectors([QUERY], "query")[0])) > 0.999


def test_a_record_that_does_not_match_the_export_goes_through_torch(exports: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    directory = cache / "onnx" / f"{MODEL}-{model_revision(MODEL)}"
    directory.mkdir(parents=True)
    for item in (exports / "onnx" / directory.name).iterdir():
        (directory / item.name).symlink_to(item)
    record = json.loads((directory / RECORD).read_text())
    record["probe"] = (-np.asarray(record["probe"])).tolist()  # vectors the export does not give
    (directory / RECORD).unlink()
    (directory / RECORD).write_text(json.dumps(record))
    found = fresh_process(cache, "onnx", [])
    assert "torch" in found["heavy"]  # checked against torch instead, which records the right vectors again
    assert float(np.dot(found["vector"], torch_vectors([QUERY], "query")[0])) > 0.999
    assert json.loads((directory / RECORD).read_text())["probe"] != record["probe"]


def test_tokenizer_json_tokenises_as_sentence_transformers_does(packages: list[Any]) -> None:
    model = load_model(MODEL)
    directory = model_directory(MODEL)
    assert directory is not None
    tokens = FileTokens(directory / "tokenizer.json", 256, 0, "[PAD]")
    inputs = ["attention_mask", "input_ids", "token_type_ids"]
    texts = [p.synopsis for p in packages[:50]] + [p.text for p in packages[:20]]
    assert same_as_model(tokens, model, inputs, texts)
    np.testing.assert_array_equal(tokens.counts(texts), ModelTokens(model).counts(texts))
    wrong_padding = FileTokens(directory / "tokenizer.json", 256, 100, "[UNK]")
    assert not same_as_model(wrong_padding, model, inputs, texts)  # the check can fail


def test_a_remembered_revision_is_computed_again_when_a_weight_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgsim.encoding import models

    monkeypatch.setenv("PGSIM_CACHE_DIR", str(tmp_path / "cache"))
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    weights = directory / "model.safetensors"
    weights.write_bytes(b"first weights")
    first = models.model_revision(str(directory))
    assert str(directory) in json.loads((tmp_path / "cache" / "revisions.json").read_text())
    monkeypatch.setattr(models, "_revisions", {})  # what a new process starts with
    assert models.model_revision(str(directory)) == first
    weights.write_bytes(b"the weights of another model")
    monkeypatch.setattr(models, "_revisions", {})
    assert models.model_revision(str(directory)) != first
