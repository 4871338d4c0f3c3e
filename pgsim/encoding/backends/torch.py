"""sentence-transformers' own forward pass: ``torch`` in float32 (the reference every other backend is
checked against) and ``torch-bf16``, a bfloat16 copy of the model with pooling and normalisation in
float32 (fast where the CPU has bfloat16 instructions, AVX-512 BF16 or AMX; slow where it emulates them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgsim.encoding.backends.base import TOKENIZER_LOCK, Matrix, default_prompt, normalised

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


class TorchBackend:
    """sentence-transformers' forward pass in the model's dtype (what ``model.encode`` runs for one batch);
    pooled rows normalised in float32."""

    def __init__(self, model: SentenceTransformer, name: str) -> None:
        self.model = model.eval()
        self.name = name
        self.reason = "requested"
        self.parallel = model.device.type == "cpu"
        self.prompt = default_prompt(model)
        self.precision: str | None = None  # the name says it

    def for_lanes(self, lanes: int) -> TorchBackend:
        return self

    def embed(self, texts: list[str]) -> Matrix:
        import torch
        from sentence_transformers.util import batch_to_device

        with TOKENIZER_LOCK:
            features = self.model.preprocess(texts, prompt=self.prompt)
        with torch.inference_mode():
            rows = self.model(batch_to_device(features, self.model.device))["sentence_embedding"]
        return normalised(rows.float().cpu().numpy())


def bfloat16_copy(model: SentenceTransformer) -> SentenceTransformer:
    import copy

    import torch

    return copy.deepcopy(model).to(torch.bfloat16)
