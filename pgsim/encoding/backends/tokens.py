"""Tokenising for the exported backends: a model's ``tokenizer.json`` run by the ``tokenizers`` package
(:class:`FileTokens`, which imports neither transformers nor torch), or the model's own tokenizer
(:class:`ModelTokens`). An exported backend uses the first once it was checked to give exactly what
sentence-transformers gives the model (:func:`same_as_model`), so what it computes does not depend on
whether torch was loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from pgsim.encoding.backends.base import TOKENIZER_LOCK

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

Ids = npt.NDArray[np.int64]

# What the check against sentence-transformers tokenises, beside the calibration texts: case, accents,
# scripts without spaces, emoji, control whitespace, and a text past every model's limit.
EDGE_TEXTS = [
    "UPPER and lower Case",
    "  leading and trailing spaces  ",
    "café naïve Ærøskøbing Straße",
    "日本語のテキストと中文",
    "emoji 🙂 and symbols ©®™ ½",
    "tabs\tand\nnew lines\r\n",
    "a",
    " ".join(f"word{i}" for i in range(600)),
]


class Tokens(Protocol):
    max_tokens: int

    def counts(self, texts: list[str]) -> Ids:
        """Each text's token count, special tokens included, without truncation."""
        ...

    def batch(self, texts: list[str]) -> dict[str, Ids]:
        """input_ids, attention_mask and token_type_ids, truncated at ``max_tokens`` and padded to the longest."""
        ...


class ModelTokens:
    """The model's own (transformers) tokenizer, as sentence-transformers calls it."""

    def __init__(self, model: SentenceTransformer) -> None:
        self.tokenizer = model.tokenizer
        self.max_tokens = int(model.max_seq_length or 512)

    def counts(self, texts: list[str]) -> Ids:
        with TOKENIZER_LOCK:
            encoded = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
        return np.fromiter((len(ids) for ids in encoded["input_ids"]), dtype=np.int64, count=len(texts))

    def batch(self, texts: list[str]) -> dict[str, Ids]:
        with TOKENIZER_LOCK:
            batch = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="np"
            )
        return {name: np.asarray(values, dtype=np.int64) for name, values in batch.items()}


class FileTokens:
    """``tokenizer.json`` under the ``tokenizers`` package: one instance counts (no truncation, no padding),
    another makes batches (truncation and padding), so neither is reconfigured while another thread uses it."""

    def __init__(self, path: Path, max_tokens: int, pad_id: int, pad_token: str, pad_type_id: int = 0) -> None:
        from tokenizers import Tokenizer

        self.path, self.max_tokens = path, max_tokens
        self.counting = Tokenizer.from_file(str(path))
        self.counting.no_truncation()
        self.counting.no_padding()
        self.batching = Tokenizer.from_file(str(path))
        self.batching.enable_truncation(max_tokens)
        self.batching.enable_padding(pad_id=pad_id, pad_type_id=pad_type_id, pad_token=pad_token)
        self.settings = {"max_tokens": max_tokens, "pad_id": pad_id, "pad_token": pad_token, "pad_type_id": pad_type_id}

    def counts(self, texts: list[str]) -> Ids:
        encoded = self.counting.encode_batch(texts, add_special_tokens=True)
        return np.fromiter((len(item.ids) for item in encoded), dtype=np.int64, count=len(texts))

    def batch(self, texts: list[str]) -> dict[str, Ids]:
        encoded = self.batching.encode_batch(texts, add_special_tokens=True)
        return {
            "input_ids": np.array([item.ids for item in encoded], dtype=np.int64),
            "attention_mask": np.array([item.attention_mask for item in encoded], dtype=np.int64),
            "token_type_ids": np.array([item.type_ids for item in encoded], dtype=np.int64),
        }


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def from_model_files(model: SentenceTransformer, directory: Path | None) -> FileTokens | None:
    """``directory``'s tokenizer.json as :class:`FileTokens` set up as the model's tokenizer is (its limit and
    padding token); None where there is none, the tokenizers package is missing, or the model's tokenizer
    has no padding token."""
    tokenizer: Any = model.tokenizer
    if directory is None or not (directory / "tokenizer.json").is_file() or tokenizer.pad_token_id is None:
        return None
    try:
        return FileTokens(
            directory / "tokenizer.json",
            int(model.max_seq_length or 512),
            int(tokenizer.pad_token_id),
            str(tokenizer.pad_token),
            int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        )
    except (ImportError, OSError, ValueError, TypeError, RuntimeError):
        return None


def same_as_model(tokens: Tokens, model: SentenceTransformer, inputs: list[str], texts: list[str]) -> bool:
    """Whether ``tokens`` gives the ``inputs`` sentence-transformers gives ``model`` for ``texts`` (with the
    model's default prompt prepended, as the exported backends do), each text alone and all in one batch."""
    from pgsim.encoding.backends.base import default_prompt

    prompt = default_prompt(model) or ""
    checked = [*texts, *EDGE_TEXTS]
    for group in [checked, *([text] for text in checked)]:
        with TOKENIZER_LOCK:
            expected = model.preprocess(group, prompt=prompt or None)
        found = tokens.batch([prompt + text for text in group])
        for name in inputs:
            if name not in found or name not in expected:
                return False
            if not np.array_equal(found[name], expected[name].cpu().numpy().astype(np.int64)):
                return False
    return True
