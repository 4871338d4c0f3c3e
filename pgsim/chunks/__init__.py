"""Long documents as chunks (issue 21, first version; not exported yet): a registered embedding with chunk
settings keeps, next to its table, a table of the document's chunk vectors that the queue worker replaces in
the batch's own transaction, and :func:`search_documents` returns k distinct documents ranked by their
best chunk.

- :mod:`pgsim.chunks.settings`: :class:`Chunks`, the chunk size and overlap in the model's word pieces.
- :mod:`pgsim.chunks.splitting`: cutting a text with the model's own tokenizer, on paragraph and sentence
  boundaries where it can.
- :mod:`pgsim.chunks.storage`: the chunk table, its grants, and :func:`add_chunks` / :func:`remove_chunks`.
- :mod:`pgsim.chunks.worker_step`: the step the worker's batch runs for a chunked registration.
- :mod:`pgsim.chunks.documents`: :func:`search_documents`.
"""

from __future__ import annotations

from pgsim.chunks.documents import DocumentHit, search_documents
from pgsim.chunks.settings import Chunks
from pgsim.chunks.splitting import Chunk, split
from pgsim.chunks.storage import add_chunks, remove_chunks

__all__ = ["Chunk", "Chunks", "DocumentHit", "add_chunks", "remove_chunks", "search_documents", "split"]
