"""How a registered embedding cuts its documents: :class:`Chunks`, checked against the model's window."""

from __future__ import annotations

from dataclasses import dataclass

from pgsim.errors import InvalidInput

MIN_TOKENS = 8  # fewer word pieces than this make chunks too short to mean anything on their own


@dataclass(frozen=True)
class Chunks:
    """Chunks of at most ``tokens`` word pieces of the model's tokenizer, each starting ``overlap`` word pieces
    before the previous one ended. :meth:`check` compares ``tokens`` with a model's window."""

    tokens: int
    overlap: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "overlap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidInput(f"Chunks({name}=...) must be a whole number of word pieces; got {value!r}.")
        if self.tokens < MIN_TOKENS:
            raise InvalidInput(
                f"Chunks(tokens={self.tokens}) is too small: a chunk needs at least {MIN_TOKENS} word pieces."
            )
        if not 0 <= self.overlap < self.tokens:
            raise InvalidInput(
                f"Chunks(overlap={self.overlap}) must be at least 0 and less than tokens ({self.tokens}): each chunk "
                "must move past the previous one. Choose a smaller overlap."
            )

    def check(self, window: int, model: str) -> None:
        """Refuse chunks longer than ``window``, the word pieces ``model`` reads of one text (its maximum sequence
        length less its special tokens): the encoder would cut them."""
        if self.tokens > window:
            raise InvalidInput(
                f"Chunks(tokens={self.tokens}) is longer than model {model!r} reads: at most {window} word pieces "
                f"fit its window. Choose tokens={window} or fewer."
            )


def checked_chunks(value: object, *, required: bool = False) -> Chunks | None:
    """``value`` when it is a :class:`Chunks` (or None, unless ``required``), else a clear error."""
    if isinstance(value, Chunks) or (value is None and not required):
        return value
    raise InvalidInput(f"chunks must be pgsim.Chunks(tokens=..., overlap=...); got {value!r}.")
