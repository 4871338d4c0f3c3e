"""wordllama-l2-supercat: the Matryoshka-trained static model converted from the wordllama wheel, offline."""

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pgsim.encoding.backends.base import BackendUnavailable
from pgsim.encoding.backends.tokens import EDGE_TEXTS
from pgsim.encoding.converted import wordllama_l2_supercat_path
from pgsim.encoding.encoder import NO_TOKEN_LIMIT, Encoder
from pgsim.encoding.models import matryoshka_dims, model_dimension, model_directory, model_revision
from pgsim.errors import ModelNotFound

MODEL = "wordllama-l2-supercat"
TEXTS = [
    "PostgreSQL as a similarity-search engine",
    "The giant panda is a bear native to south central China.",
    "How do I reset my password?",
    "numbers 3.14159 and 2026-12-03, v0.4.0.post1",
    "def embed(texts: list[str]) -> np.ndarray: ...",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Matryoshka representation learning nests smaller embeddings in the first dimensions of larger ones.",
    " ".join(f"word{i}" for i in range(3000)),  # past any transformer's limit: a static model takes it all
    *EDGE_TEXTS,  # scripts without spaces, emoji, control whitespace
]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("pgsim-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGSIM_CACHE_DIR", str(directory))
        yield directory


def wordllama_vectors(texts: list[str]) -> np.ndarray:
    import wordllama

    # WordLlama looks for its tokenizer in <package>/tokenizer/ (the wheel has tokenizers/), then in
    # <cache_dir>/tokenizers/, then online: the package's own directory as cache_dir keeps it offline.
    package = Path(wordllama.__file__).parent
    model = wordllama.WordLlama.load(config="l2_supercat", dim=256, cache_dir=package, disable_download=True)
    assert model.embedding.shape == (32000, 256)
    return np.asarray(model.embed(texts, norm=True))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_vectors_equal_wordllamas(backend: str) -> None:
    encoder = Encoder(MODEL, backend=backend)
    vectors = np.stack(encoder.encode(TEXTS))  # type: ignore[arg-type]
    assert vectors.shape == (len(TEXTS), 256) and vectors.dtype == np.float32
    cosines = np.sum(vectors * wordllama_vectors(TEXTS), axis=1)
    assert cosines.min() >= 0.9999, dict(zip(TEXTS, cosines.round(6), strict=True))
    assert encoder.stats.truncated == 0 and encoder.max_tokens == NO_TOKEN_LIMIT
    assert encoder.backend.name == "torch"
    if backend == "auto":
        assert encoder.backend.reason == "auto: static embedding model: nothing to export"


def test_matryoshka_dims_are_declared_by_the_model() -> None:
    assert matryoshka_dims(MODEL) == (64, 128, 256)
    assert matryoshka_dims("all-MiniLM-L6-v2") == ()


def test_matryoshka_dims_of_a_model_directory_of_ones_own(tmp_path: Path) -> None:
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"hidden_size": 384}))
    assert matryoshka_dims(str(directory)) == ()  # no config_sentence_transformers.json
    settings = directory / "config_sentence_transformers.json"
    settings.write_text(json.dumps({"matryoshka_dims": [384, 96, 0, "64", True, 1024, 96]}))
    assert matryoshka_dims(str(directory)) == (96, 384)
    settings.write_text(json.dumps({"matryoshka_dims": 64}))
    assert matryoshka_dims(str(directory)) == ()
    settings.write_text("{not json")
    assert matryoshka_dims(str(directory)) == ()


def test_converted_once_then_reused_silently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PGSIM_CACHE_DIR", str(tmp_path))
    first = wordllama_l2_supercat_path()
    assert "pgsim: converting wordllama-l2-supercat" in capfd.readouterr().err
    assert first.parent == tmp_path / "models" and first.name.startswith(f"{MODEL}-")
    made = (first / "model.safetensors").stat().st_mtime_ns
    assert json.loads((first / "config_sentence_transformers.json").read_text())["matryoshka_dims"] == [64, 128, 256]
    assert wordllama_l2_supercat_path() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == made
    assert capfd.readouterr().err == ""
    assert [path.name for path in first.parent.iterdir()] == [first.name]  # no partial directory left


def test_explicit_exported_backends_are_a_clear_error() -> None:
    for backend in ("onnx", "openvino"):
        with pytest.raises(BackendUnavailable, match=f"The {backend} backend .* first module is StaticEmbedding"):
            Encoder(MODEL, backend=backend).encode(["anything"])


def test_dimension_and_revision() -> None:
    assert model_dimension(MODEL) == 256
    revision = model_revision(MODEL)
    assert len(revision) == 16 and revision != model_revision("all-MiniLM-L6-v2")
    assert Encoder(MODEL).dimension == 256
    directory = model_directory(MODEL)
    assert directory is not None and (directory / "tokenizer.json").is_file()


def test_missing_wheel_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wordllama", None)  # what an uninstalled package looks like to import
    with pytest.raises(ModelNotFound, match="pip install wordllama"):
        wordllama_l2_supercat_path()
    assert model_directory(MODEL) is None
