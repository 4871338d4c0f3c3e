"""Long documents as chunks (issue 21, first version; not exported yet): a registered embedding with chunk
settings keeps, next to its table, a table of the document's chunk vectors that the queue worker replaces in
the batch's own transaction; :func:`pgsim.knn.documents.search_documents` returns k distinct documents ranked
by their best chunk.

- :mod:`.settings`: :class:`Chunks`, the chunk size and overlap in the model's word pieces.
- :mod:`.splitting`: cutting a text with the model's own tokenizer, on paragraph and sentence boundaries
  where it can.
- :mod:`.tables`: the chunk table, its grants, and :func:`add_chunks` / :func:`remove_chunks`.
- :mod:`.sync_step`: the step the worker's batch (:mod:`pgsim.columns.batches`) runs for a chunked
  registration.
"""

from __future__ import annotations

from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.chunking.splitting import Chunk, split
from pgsim.columns.chunking.tables import add_chunks, remove_chunks

__all__ = ["Chunk", "Chunks", "add_chunks", "remove_chunks", "split"]
