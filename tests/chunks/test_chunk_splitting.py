"""Chunk settings and cutting texts with the real model's tokenizer: limits, boundaries, spans, odd input."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.chunking.splitting import model_tokenizer, split, window
from pgsim.demo.corpus import Package
from pgsim.encoding.encoder import Encoder
from pgsim.errors import InvalidInput


@pytest.fixture(scope="module")
def tokenizer(encoder: Encoder) -> Any:
    return model_tokenizer(encoder)


def pieces(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def test_the_window_is_the_models_sequence_length_less_its_special_tokens(encoder: Encoder) -> None:
    assert window(encoder) == 254  # all-MiniLM-L6-v2: 256 positions, [CLS] and [SEP]


@pytest.mark.parametrize(
    ("tokens", "overlap", "message"),
    [
        (7, 0, "too small"),
        (64, 64, "less than tokens"),
        (64, 100, "less than tokens"),
        (64, -1, "at least 0"),
        (64.0, 0, "whole number"),
        (True, 0, "whole number"),
    ],
)
def test_chunk_settings_are_checked(tokens: Any, overlap: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        Chunks(tokens, overlap)


def test_a_chunk_size_past_the_models_window_is_refused(encoder: Encoder) -> None:
    Chunks(254).check(window(encoder), encoder.model_name)
    with pytest.raises(InvalidInput, match="at most 254 word pieces"):
        Chunks(255).check(window(encoder), encoder.model_name)


def long_text(packages: list[Package]) -> str:
    return "\n\n".join(p.text for p in packages[:60])


@pytest.mark.parametrize(("tokens", "overlap"), [(32, 0), (64, 16), (128, 0), (254, 40)])
def test_spans_reproduce_the_text_within_the_limit(
    tokenizer: Any, packages: list[Package], tokens: int, overlap: int
) -> None:
    text = long_text(packages)
    chunks = split(text, Chunks(tokens, overlap), tokenizer)
    assert len(chunks) > 3
    assert [c.chunk_no for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert text[chunk.start : chunk.end] == chunk.text
        assert chunk.text == chunk.text.strip()
        assert 0 < pieces(tokenizer, chunk.text) <= tokens
    assert chunks[0].start == 0 and chunks[-1].end == len(text.rstrip())
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert before.start < after.start and before.end < after.end  # always forwards
        if overlap == 0:
            assert before.end <= after.start and not text[before.end : after.start].strip()  # nothing lost between
        else:
            assert after.start < before.end  # the overlap is carried over
            assert pieces(tokenizer, text[after.start : before.end]) <= overlap + 1


def test_chunks_end_on_paragraphs_then_sentences(tokenizer: Any) -> None:
    paragraph = "One short sentence here. Another sentence follows it. A third one ends the paragraph."
    text = "\n\n".join([paragraph] * 12)
    chunks = split(text, Chunks(60), tokenizer)
    assert len(chunks) > 1
    assert all(chunk.text.endswith("paragraph.") for chunk in chunks)  # every cut at a paragraph break
    sentences = " ".join(["This sentence has exactly nine words in it, really."] * 30)
    cut = split(sentences, Chunks(50), tokenizer)
    assert len(cut) > 1 and all(chunk.text.endswith("really.") for chunk in cut)  # at a sentence end


def test_a_word_longer_than_a_chunk_is_cut_inside_and_still_fits(tokenizer: Any) -> None:
    word = "".join(f"x{i}y" for i in range(40))  # one word of many word pieces
    text = f"before {word} after"
    chunks = split(text, Chunks(8), tokenizer)
    assert all(0 < pieces(tokenizer, chunk.text) <= 8 for chunk in chunks)
    assert all(text[c.start : c.end] == c.text for c in chunks)
    assert "".join(re.sub(r"\s", "", c.text) for c in chunks) == re.sub(r"\s", "", text)


def test_empty_null_blank_and_one_word_texts(tokenizer: Any) -> None:
    settings = Chunks(16)
    assert split(None, settings, tokenizer) == []
    assert split("", settings, tokenizer) == []
    assert split(" \n\t ", settings, tokenizer) == []
    assert split("\x00\x00", settings, tokenizer) == []  # only characters the tokenizer drops
    [only] = split("  chess  ", settings, tokenizer)
    assert (only.chunk_no, only.start, only.end, only.text) == (0, 2, 7, "chess")


def test_nul_and_odd_unicode_keep_their_offsets(tokenizer: Any) -> None:
    text = "café\x00naïve 🙂 日本語のテキスト, Ærøskøbing\u200b Straße\r\n" * 20
    chunks = split(text, Chunks(16, 4), tokenizer)
    assert len(chunks) > 5
    for chunk in chunks:
        assert text[chunk.start : chunk.end] == chunk.text
    assert split(text, Chunks(16, 4), tokenizer) == chunks  # deterministic


def test_a_one_megabyte_text_is_cut_in_linear_time(tokenizer: Any, packages: list[Package]) -> None:
    paragraph = long_text(packages)
    small = paragraph * 4
    big = paragraph * (1_000_000 // len(paragraph) + 1)
    assert len(big) >= 1_000_000
    started = time.perf_counter()
    small_chunks = split(small, Chunks(128, 16), tokenizer)
    small_seconds = time.perf_counter() - started
    started = time.perf_counter()
    chunks = split(big, Chunks(128, 16), tokenizer)
    seconds = time.perf_counter() - started
    assert len(chunks) > 2_000 and chunks[-1].end == len(big.rstrip())
    assert seconds < 20
    # linear: about len(big) / len(small) times the small text's time (a quadratic cut would be ~30x that)
    assert seconds < (len(big) / len(small)) * small_seconds * 4 + 1
    assert len(chunks) == pytest.approx(len(small_chunks) * len(big) / len(small), rel=0.1)
