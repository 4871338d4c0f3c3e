"""Text to vectors with sentence-transformers, on the Python side.

Policies (each has a test):
- NULL or blank text has no embedding: its result is ``None`` (stored as SQL NULL), it is counted in
  ``stats.empty`` and never retried. A blank *query* is an error, since nothing can be ranked against it.
- Text longer than the model's limit (``max_tokens``, 256 word pieces for all-MiniLM-L6-v2) is truncated to
  it, as sentence-transformers does; each such text is counted in ``stats.truncated`` and a warning names
  how many were cut.
- Identical texts in one call are encoded once.
- Output rows are L2-normalised float32 (so cosine distance, inner product and L2 rank alike).
- Vectors handed in by the user go through :func:`check_vector`: NaN, infinity or a wrong dimension is an
  :class:`~pgsim.errors.InvalidInput` before anything reaches the database.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from pgsim.encoding.backends.base import TOKENIZER_LOCK
from pgsim.encoding.backends.lanes import embed_batches
from pgsim.encoding.models import DEFAULT_MODEL, load_backend, load_model, loaded_model, model_dimension, model_revision
from pgsim.errors import InvalidInput

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from pgsim.encoding.backends.base import Backend
    from pgsim.encoding.backends.tokens import Tokens

log = logging.getLogger(__name__)

# Models trained with instructions on each side (E5 family); others take text as it is.
PREFIXES = {"e5-": ("query: ", "passage: ")}
# Characters looked at when counting a text's tokens; far past any model's limit, so counts stay exact
# where it matters (is it over the limit?) while a pathological multi-megabyte text stays cheap.
MAX_CHARS = 100_000
# Token positions per forward pass (texts x longest text, padding included): batches of similar length
# under one budget beat fixed batch sizes on CPU for every call size (bench/encode.py tunes it).
DEFAULT_TOKEN_BUDGET = 1536
# max_tokens of a model without a limit (a static embedding model's is infinite): past any text's count,
# as every text is cut to MAX_CHARS characters first.
NO_TOKEN_LIMIT = 1 << 30

Vector = npt.NDArray[np.float32]
Kind = Literal["document", "query"]


@dataclass
class EncodeStats:
    """Running totals for one :class:`Encoder`."""

    texts: int = 0
    encoded: int = 0
    duplicates: int = 0
    empty: int = 0
    truncated: int = 0
    seconds: float = 0.0

    @property
    def texts_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds else 0.0


def check_text(text: object, position: int = 0) -> None:
    """:class:`InvalidInput` unless ``text`` is a str that UTF-8 can hold (no lone surrogate, which is what
    bytes that were not UTF-8 become when Python decodes them with ``surrogateescape``, as it does argv)."""
    if not isinstance(text, str):
        raise InvalidInput(f"Text #{position} is {type(text).__name__}, not str: decode it to text first.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"Text #{position} is not valid Unicode: character {exc.start} is a lone surrogate ({text[exc.start]!r}), "
            "as bytes that are not UTF-8 give when decoded leniently. Decode the text as UTF-8 (or drop those "
            "characters) first."
        ) from None


def check_vector(values: Any, dimension: int | None = None) -> Vector:
    """``values`` as a 1-D float32 array, or :class:`InvalidInput` saying what is wrong with it."""
    try:
        with np.errstate(over="ignore"):  # an overflow becomes inf, reported below with its position
            array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"Not a vector of numbers: {exc}. Pass a list of floats or a 1-D numpy array.") from None
    if array.ndim != 1 or array.size == 0:
        raise InvalidInput(f"A vector must be 1-D and non-empty; got shape {array.shape}.")
    if dimension is not None and array.shape[0] != dimension:
        raise InvalidInput(
            f"Vector has {array.shape[0]} dimensions, the column holds {dimension}: encode with the column's model."
        )
    finite = np.isfinite(array)
    if not finite.all():
        position = int(np.argmin(finite))
        raise InvalidInput(
            f"Vector has {array[position]} at position {position} (NaN, infinity, or a value beyond float32's "
            "range); pgvector stores only finite float32 values. Check what produced it."
        )
    return array


class Encoder:
    """Encodes texts with one sentence-transformers model. Construction is free; the model loads on first use."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str = "cpu",
        batch_size: int = 128,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        query_prefix: str | None = None,
        document_prefix: str | None = None,
        warn_truncation: bool = True,
        backend: str | None = None,
        lanes: int | None = None,
    ) -> None:
        from pgsim.encoding.backends.base import BACKEND_ENV, BACKENDS

        requested = backend or os.environ.get(BACKEND_ENV) or "auto"
        if requested not in ("auto", *BACKENDS):
            raise InvalidInput(f"Unknown encoder backend {requested!r}; choose auto, {', '.join(BACKENDS)}.")
        self.requested_backend = requested  # "auto" measures the candidates once and keeps the fastest
        if batch_size < 1 or token_budget < 1:
            raise InvalidInput(f"batch_size and token_budget must be at least 1; got {batch_size}, {token_budget}.")
        if lanes is not None and (isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1):
            raise InvalidInput(f"lanes must be a whole number >= 1, or None for one per torch thread; got {lanes!r}.")
        self.lanes = lanes  # forward passes side by side (torch backends on CPU); see pgsim.encoding.backends.lanes
        self.model_name = model
        self.device = device
        self.batch_size = batch_size  # at most this many texts in one forward pass
        self.token_budget = token_budget  # and at most this many token positions, padding included
        default_query, default_document = next(
            (prefixes for marker, prefixes in PREFIXES.items() if marker in model.lower()), ("", "")
        )
        self.query_prefix = default_query if query_prefix is None else query_prefix
        self.document_prefix = default_document if document_prefix is None else document_prefix
        self.warn_truncation = warn_truncation  # off for callers that report stats.truncated themselves
        self.stats = EncodeStats()

    @property
    def model(self) -> SentenceTransformer:
        return load_model(self.model_name, self.device)

    @property
    def backend(self) -> Backend:
        """The forward pass in use (see :mod:`pgsim.encoding.backends`), resolved on first use."""
        return load_backend(self.model_name, self.device, self.requested_backend)

    @property
    def dimension(self) -> int:
        model = loaded_model(self.model_name, self.device)
        if model is None:  # read from the model's files where they say it, so torch need not load
            return model_dimension(self.model_name)
        dimension = model.get_embedding_dimension()
        assert dimension is not None
        return int(dimension)

    @property
    def revision(self) -> str:
        return model_revision(self.model_name)

    @property
    def max_tokens(self) -> int:
        tokens = self._tokens()
        if tokens is not None:
            return tokens.max_tokens
        limit = self.model.max_seq_length
        assert limit is not None, f"model {self.model_name!r} declares no maximum sequence length"
        return NO_TOKEN_LIMIT if limit == float("inf") else int(limit)

    def encode_query(self, text: str) -> Vector:
        """One query's vector. Blank text is an error: nothing can be ranked against it."""
        if text is None or (isinstance(text, str) and not text.strip()):
            raise InvalidInput("The query text is empty; pass the words to search for.")
        check_text(text)
        vector = self.encode([text], kind="query")[0]
        assert vector is not None
        return vector

    def encode(
        self,
        texts: Sequence[str | None],
        *,
        kind: Kind = "document",
        progress: Callable[[int], None] | None = None,
    ) -> list[Vector | None]:
        """One vector per text, in order; ``None`` for NULL or blank text. ``progress(n)`` after each batch."""
        started = time.perf_counter()
        prefix = self.query_prefix if kind == "query" else self.document_prefix
        positions: dict[str, list[int]] = {}
        empty = 0
        for position, text in enumerate(texts):
            if text is None or (isinstance(text, str) and not text.strip()):
                empty += 1
                continue
            check_text(text, position)
            positions.setdefault(prefix + text[:MAX_CHARS], []).append(position)
        unique = list(positions)
        results: list[Vector | None] = [None] * len(texts)
        truncated = 0
        if unique:
            lengths = self._token_counts(unique)
            truncated = int((lengths > self.max_tokens).sum())
            done = empty
            batches = [[unique[i] for i in members] for members in self._batches(np.minimum(lengths, self.max_tokens))]
            # closing: an error below stops the lanes and gives torch its threads back at once
            with contextlib.closing(embed_batches(self.backend, batches, self.lanes)) as encoded:
                for batch, vectors in zip(batches, encoded, strict=True):
                    if not np.isfinite(vectors).all():
                        raise InvalidInput(
                            f"Model {self.model_name!r} produced NaN or infinite values; it cannot be used as is."
                        )
                    for text, vector in zip(batch, vectors, strict=True):
                        for position in positions[text]:
                            results[position] = vector
                        done += len(positions[text])
                    if progress is not None:
                        progress(done)
        elif progress is not None:
            progress(len(texts))
        if truncated and self.warn_truncation:
            log.warning(
                "%d of %d texts were longer than %s's limit of %d tokens and were truncated to it",
                truncated,
                len(unique),
                self.model_name,
                self.max_tokens,
            )
        self.stats.texts += len(texts)
        self.stats.encoded += len(unique)
        self.stats.duplicates += len(texts) - empty - len(unique)
        self.stats.empty += empty
        self.stats.truncated += truncated
        self.stats.seconds += time.perf_counter() - started
        return results

    def _batches(self, lengths: npt.NDArray[np.int64]) -> list[list[int]]:
        """Positions grouped longest first into forward passes of at most ``token_budget`` token positions
        (every text padded to the batch's longest) and ``batch_size`` texts: padding stays small even when a
        call holds few texts of very different lengths."""
        batches: list[list[int]] = []
        batch: list[int] = []
        for position in np.argsort(-lengths, kind="stable").tolist():
            if batch and (len(batch) >= self.batch_size or (len(batch) + 1) * lengths[batch[0]] > self.token_budget):
                batches.append(batch)
                batch = []
            batch.append(position)
        if batch:
            batches.append(batch)
        return batches

    def _tokens(self) -> Tokens | None:
        """The backend's own tokeniser (the exported backends'), which needs neither torch nor the model."""
        return getattr(self.backend, "tokens", None)

    def _token_counts(self, texts: list[str]) -> npt.NDArray[np.int64]:
        tokens = self._tokens()
        if tokens is not None:
            return tokens.counts(texts)
        tokenizer = self.model.tokenizer
        if not callable(tokenizer):  # a tokenizers.Tokenizer (StaticEmbedding's): counted as the model encodes
            with TOKENIZER_LOCK:
                counted = tokenizer.encode_batch(texts, add_special_tokens=False)
            return np.fromiter((len(item.ids) for item in counted), dtype=np.int64, count=len(texts))
        with TOKENIZER_LOCK:
            encoded = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
        return np.fromiter((len(ids) for ids in encoded["input_ids"]), dtype=np.int64, count=len(texts))


_encoders: dict[str, Encoder] = {}


def encoder_for(model: str) -> Encoder:
    """The process-wide :class:`Encoder` for ``model`` (its model object loads once, on first use)."""
    encoder = _encoders.get(model)
    if encoder is None:
        encoder = _encoders[model] = Encoder(model)
    return encoder
