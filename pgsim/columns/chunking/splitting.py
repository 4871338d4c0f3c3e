"""Cutting a text into chunks with the model's own tokenizer.

The text is tokenised once, with offsets (the ``tokenizers`` package's fast tokenizer from the model's
``tokenizer.json``, as the exported backends run it). Each chunk then takes at most ``tokens`` word pieces
and ends, where it can, at the last paragraph break in its second half, else at the last sentence end there,
else at the last word boundary, and only where a single word is longer than a chunk, inside a word. The next
chunk starts ``overlap`` word pieces before the previous one ended (moved to the next word start). Every cut
is found in constant time from per-level "last boundary at or before" arrays, so a text of n word pieces
costs one tokenisation and O(n), whatever its length.

A chunk's span is a pair of character offsets into the text as given, so ``text[start:end]`` is its text.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt

from pgsim.columns.chunking.settings import Chunks
from pgsim.encoding.encoder import MAX_CHARS, Encoder
from pgsim.encoding.models import model_directory
from pgsim.errors import InvalidInput

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# What a cut between two word pieces ends: nothing (inside a word), a word, a sentence or line, a paragraph.
INSIDE, WORD, SENTENCE, PARAGRAPH = 0, 1, 2, 3
SENTENCE_ENDS = frozenset(".!?;:。！？…")

_tokenizers: dict[str, Tokenizer] = {}
_lock = threading.Lock()


class Chunk(NamedTuple):
    chunk_no: int
    start: int  # character offsets into the text: text[start:end] is the chunk
    end: int
    text: str


def model_tokenizer(encoder: Encoder) -> Tokenizer:
    """The model's fast tokenizer, without truncation or padding (one per model and process; encoding with
    it is safe from several threads)."""
    with _lock:
        found = _tokenizers.get(encoder.model_name)
        if found is None:
            from tokenizers import Tokenizer

            directory = model_directory(encoder.model_name)
            if directory is not None and (directory / "tokenizer.json").is_file():
                found = Tokenizer.from_file(str(directory / "tokenizer.json"))
            else:
                backend = getattr(encoder.model.tokenizer, "backend_tokenizer", None)
                if backend is None:
                    raise InvalidInput(
                        f"Model {encoder.model_name!r} has no fast tokenizer (tokenizer.json), which chunking needs "
                        "for its offsets; use a model that ships one."
                    )
                found = Tokenizer.from_str(backend.to_str())
            found.no_truncation()
            found.no_padding()
            _tokenizers[encoder.model_name] = found
        return found


def window(encoder: Encoder) -> int:
    """The word pieces of one text the model reads: its maximum sequence length less its special tokens and
    the prefix the encoder puts before a document."""
    tokenizer = model_tokenizer(encoder)
    special = len(tokenizer.encode("", add_special_tokens=True).ids)
    prefix = encoder.document_prefix
    prefix_pieces = len(tokenizer.encode(prefix, add_special_tokens=False).ids) if prefix else 0
    return encoder.max_tokens - special - prefix_pieces


def split(text: str | None, chunks: Chunks, tokenizer: Tokenizer) -> list[Chunk]:
    """``text`` cut into chunks of at most ``chunks.tokens`` word pieces of ``tokenizer`` (see the module's
    text); no chunk for NULL, empty or blank text. Deterministic: the same text gives the same chunks."""
    if text is None or not text.strip():
        return []
    if len(text) > MAX_CHARS * 100:
        raise InvalidInput(f"A text of {len(text)} characters is too long to chunk; the limit is {MAX_CHARS * 100}.")
    encoding = tokenizer.encode(text, add_special_tokens=False)
    offsets = encoding.offsets
    n = len(offsets)
    if n == 0:
        return []
    levels = _levels(text, offsets, encoding.word_ids)
    indexes = np.arange(n + 1)
    last = {
        level: np.maximum.accumulate(np.where(levels >= level, indexes, -1)) for level in (WORD, SENTENCE, PARAGRAPH)
    }
    following = np.minimum.accumulate(np.where(levels >= WORD, indexes, n + 1)[::-1])[::-1]
    size, overlap = chunks.tokens, chunks.overlap
    found: list[Chunk] = []
    start = 0
    while start < n:
        end = _cut(start, size, n, last)
        end = _fits(text, offsets, start, end, size, tokenizer, levels)
        first, last_char = offsets[start][0], offsets[end - 1][1]
        found.append(Chunk(len(found), first, last_char, text[first:last_char]))
        if end >= n:
            break
        following_start = end - overlap
        if overlap:
            word_start = int(following[following_start])
            following_start = word_start if word_start < end else following_start
        start = max(following_start, start + 1)
    return found


def _levels(text: str, offsets: list[tuple[int, int]], word_ids: list[int | None]) -> npt.NDArray[np.int64]:
    """levels[i]: what a cut before word piece i ends (0 < i < n); 0 and n end everything."""
    n = len(offsets)
    levels = np.zeros(n + 1, dtype=np.int64)
    levels[0] = levels[n] = PARAGRAPH
    for i in range(1, n):
        previous_end, start = offsets[i - 1][1], offsets[i][0]
        gap = text[previous_end:start]
        if gap.count("\n") >= 2:
            levels[i] = PARAGRAPH
        elif "\n" in gap or (gap and text[previous_end - 1 : previous_end] in SENTENCE_ENDS):
            levels[i] = SENTENCE
        elif gap or word_ids[i] != word_ids[i - 1]:
            levels[i] = WORD
    return levels


def _cut(start: int, size: int, n: int, last: dict[int, npt.NDArray[np.int64]]) -> int:
    """Where the chunk from word piece ``start`` ends: the best boundary within ``size`` pieces."""
    limit = start + size
    if limit >= n:
        return n
    for level, shortest in ((PARAGRAPH, size // 2), (SENTENCE, size // 2), (WORD, 1)):
        boundary = int(last[level][limit])
        if boundary - start >= shortest:
            return boundary
    return limit  # a word longer than a chunk: cut inside it


def _fits(
    text: str,
    offsets: list[tuple[int, int]],
    start: int,
    end: int,
    size: int,
    tokenizer: Tokenizer,
    levels: npt.NDArray[np.int64],
) -> int:
    """``end``, or less where a chunk that starts or ends inside a word tokenises, alone, into more than
    ``size`` pieces (a word's tail is read as a word of its own). Chunks cut at word boundaries tokenise as
    they did in the whole text, so only those are checked."""
    while levels[start] == INSIDE or levels[end] == INSIDE:
        pieces = len(tokenizer.encode(text[offsets[start][0] : offsets[end - 1][1]], add_special_tokens=False).ids)
        if pieces <= size or end - start <= 1:
            break
        end -= 1
    return end
