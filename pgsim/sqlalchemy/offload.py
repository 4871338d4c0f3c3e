"""Encoding from ORM hooks without blocking an asyncio event loop.

Under ``AsyncSession`` SQLAlchemy runs the ORM's synchronous code (flush hooks, bind processors) in a
greenlet on the event loop's thread; encoding there would stall every other task for as long as the model
runs. :func:`off_event_loop` hands such work to one encoding thread and lets the loop run meanwhile. One
thread, because a model gains nothing from two callers on these cores and fast tokenizers refuse
concurrent use.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from pgsim.encoding.encoder import Vector

T = TypeVar("T")
QUERY_CACHE_SIZE = 256

_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_query_vectors: OrderedDict[tuple[str, str], Vector] = OrderedDict()


def off_event_loop(work: Callable[[], T]) -> T:
    """``work()``: in pgsim's encoding thread when called under SQLAlchemy's asyncio bridge, else here."""
    if not _in_async_bridge():
        return work()
    from sqlalchemy.util import concurrency

    wait = getattr(concurrency, "await_", None) or concurrency.await_only  # the name before SQLAlchemy 2.1
    return wait(asyncio.get_running_loop().run_in_executor(_encoding_thread(), work))


def query_vector(model: str, text: str) -> Vector:
    """``text`` encoded as a query with ``model``; the last few hundred are kept, so a query that runs twice
    (a fallback path, a page after a page) is encoded once."""
    from pgsim.encoding.encoder import encoder_for

    key = (model, text)
    with _lock:
        vector = _query_vectors.get(key)
        if vector is not None:
            _query_vectors.move_to_end(key)
            return vector
    vector = off_event_loop(lambda: encoder_for(model).encode_query(text))
    with _lock:
        _query_vectors[key] = vector
        while len(_query_vectors) > QUERY_CACHE_SIZE:
            _query_vectors.popitem(last=False)
    return vector


def _in_async_bridge() -> bool:
    try:
        greenlet = importlib.import_module("greenlet")
    except ImportError:  # no greenlet, no asyncio bridge
        return False
    return bool(getattr(greenlet.getcurrent(), "__sqlalchemy_greenlet_provider__", False))


def _encoding_thread() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgsim-encode")
        return _executor
