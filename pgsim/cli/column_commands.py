"""Commands that manage embedding columns and fill them: add/remove-embedding, change-model, backfill,
worker, and the embedded server.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from pgsim.cli.common import open_connection, progress_bar, queued_count, sync_summary


def cmd_add_embedding(args: argparse.Namespace) -> int:
    from pgsim.columns.adding import add_embedding
    from pgsim.db.hnsw import HNSW
    from pgsim.db.schema import install

    source: Any = args.source if len(args.source) > 1 else args.source[0]
    index = None if args.no_index else HNSW(args.m, args.ef_construction)
    chunks = chunks_of(args)
    with open_connection(args) as conn:
        install(conn)
        registration = add_embedding(
            conn,
            args.table,
            args.column,
            source=source,
            model=args.model,
            dtype=args.dtype,
            index=index,
            concurrently=args.concurrently,
            chunks=chunks,
            prefix=args.prefix,
        )
        queued = conn.execute(  # qualified and cast: the rule in pgsim.db.catalog
            "SELECT pg_catalog.count(*) FROM pgsim.queue WHERE embedding_id OPERATOR(pg_catalog.=) %s::pg_catalog.int4",
            [registration.id],
        ).fetchone()
    print(
        f"{registration.table}.{registration.column}: "
        f"{storage(registration.dtype, registration.dimension, registration.prefix)} of "
        f"{registration.source} by {registration.model}; "
        + (f"index {registration.index_name}; " if registration.index_name else "no index; ")
        + (f"chunks of {chunks.tokens} word pieces (overlap {chunks.overlap}); " if chunks else "")
        + f"{queued[0] if queued else 0} existing rows queued. Embed them: pgsim backfill (or run pgsim worker)"
    )
    return 0


def chunks_of(args: argparse.Namespace) -> Any:
    """``--chunk-tokens``/``--chunk-overlap`` as :class:`pgsim.Chunks`, or None without ``--chunk-tokens``."""
    from pgsim.columns.chunking.settings import Chunks
    from pgsim.errors import InvalidInput

    if args.chunk_tokens is None:
        if args.chunk_overlap is not None:
            raise InvalidInput("--chunk-overlap needs --chunk-tokens: the chunk size in the model's word pieces.")
        return None
    return Chunks(args.chunk_tokens, args.chunk_overlap or 0)


def cmd_remove_embedding(args: argparse.Namespace) -> int:
    from pgsim.columns.registry import remove_embedding

    with open_connection(args) as conn:
        remove_embedding(conn, args.table, args.column, drop_column=not args.keep_column)
    print(f"{args.table}.{args.column}: triggers, queue, index and registration removed")
    return 0


def cmd_remove_chunks(args: argparse.Namespace) -> int:
    from pgsim.columns.chunking.tables import remove_chunks

    with open_connection(args) as conn:
        remove_chunks(conn, args.table, args.column)
    print(f"{args.table}.{args.column}: chunk table dropped; searches use the column's own vectors")
    return 0


def cmd_change_model(args: argparse.Namespace) -> int:
    from pgsim.columns.model_change import change_model

    with open_connection(args) as conn:
        new = change_model(conn, args.table, args.column, args.model)
    print(
        f"filling {new.table}.{new.column} with {new.model} ({new.dimension} dimensions); searches keep using "
        f"{args.column} until it is full. Run pgsim backfill (or pgsim worker): it switches over when done."
    )
    return 0


def cmd_change_embedding(args: argparse.Namespace) -> int:
    from pgsim.columns.model_change import change_embedding

    source: Any = None if args.source is None else args.source if len(args.source) > 1 else args.source[0]
    with open_connection(args) as conn:
        new = change_embedding(conn, args.table, args.column, source=source, model=args.model, dtype=args.dtype,
                               chunks=chunks_of(args), prefix=args.prefix)  # fmt: skip
    if new.column == args.column:  # the prefix alone: the index was built again, the vectors stayed
        held = f"the first {new.prefix} of each vector's {new.dimension} values" if new.prefix else "the whole vectors"
        print(f"the index of {new.table}.{new.column} now holds {held}; nothing was re-embedded")
        return 0
    print(
        f"filling {new.table}.{new.column} with {storage(new.dtype, new.dimension, new.prefix)} of {new.source} "
        f"by {new.model}" + (f" in chunks of {args.chunk_tokens} word pieces" if args.chunk_tokens else "") + "; "
        f"searches keep using {args.column} until it is full. Run pgsim backfill (or pgsim worker): it switches "
        "over when done."
    )
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from pgsim.columns.worker import backfill, database_is_remote

    if args.processes > 1:
        return _backfill_in_processes(args)
    with open_connection(args) as conn, open_connection(args) if database_is_remote(conn) else nullcontext() as second:
        bar, progress = progress_bar("embedding")
        try:
            report = backfill(conn, args.table, args.column, batch_size=args.batch_size, progress=progress,
                              cache=args.cache, overlap_with=second,
                              allow_superuser=args.allow_superuser, owners=args.owners)  # fmt: skip
        finally:
            bar.close()
    print(sync_summary(report))
    return 0 if not report.failed and not report.dead else 1


def _backfill_in_processes(args: argparse.Namespace) -> int:
    """Queue the rows, then let ``args.processes`` workers drain the queue; the bar follows the queue."""
    from tqdm import tqdm

    from pgsim.columns.processes import run_processes, worker_command
    from pgsim.columns.worker import queue_backfill
    from pgsim.db.connection import resolve_dsn

    dsn = resolve_dsn(args.dsn, args.data_dir)
    with open_connection(args) as conn:
        ids = [
            registration.id
            for registration in queue_backfill(
                conn, args.table, args.column, allow_superuser=args.allow_superuser, owners=args.owners
            )
        ]
        remaining = queued_count(conn, ids)
        bar = tqdm(total=remaining, unit="row", desc=f"embedding ({args.processes} processes)", file=sys.stderr)
        started = time.perf_counter()
        command = worker_command(
            dsn, args.table, args.column, args.batch_size, once=True, poll_interval=1.0, cache=args.cache,
            allow_superuser=args.allow_superuser, owners=args.owners,
        )  # fmt: skip
        code = run_processes(
            command, args.processes, tick=lambda: bar.update(remaining - queued_count(conn, ids) - bar.n)
        )
        bar.close()
        left = queued_count(conn, ids)
    seconds = time.perf_counter() - started
    done = remaining - left
    rate = done / seconds if seconds else 0.0
    print(f"{done} queued rows done by {args.processes} processes in {seconds:.1f}s ({rate:.1f} rows/s); {left} left")
    return code


def cmd_worker(args: argparse.Namespace) -> int:
    import signal

    from pgsim.columns.worker import Worker
    from pgsim.db.connection import resolve_dsn

    if args.processes > 1:
        from pgsim.columns.processes import run_processes, worker_command

        command = worker_command(
            resolve_dsn(args.dsn, args.data_dir), args.table, args.column, args.batch_size, once=args.once,
            poll_interval=args.poll_interval, cache=args.cache, allow_superuser=args.allow_superuser,
            owners=args.owners,
        )  # fmt: skip
        return run_processes(command, args.processes)

    worker = Worker(
        resolve_dsn(args.dsn, args.data_dir),
        table=args.table,
        column=args.column,
        batch_size=args.batch_size,
        poll_interval=args.poll_interval,
        cache=args.cache,
        allow_superuser=args.allow_superuser,
        owners=args.owners,
    )

    def on_batch(report: Any, total: int) -> None:
        print(
            f"{time.strftime('%H:%M:%S')} embedded {report.embedded} rows so far "
            f"({report.failed} failed, {report.dead} dead letters)",
            flush=True,
        )

    worker.on_batch = on_batch
    signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
    print("pgsim worker: waiting for rows (LISTEN pgsim); Ctrl-C stops", flush=True)
    try:
        report = worker.run(until_empty=args.once)
    except KeyboardInterrupt:
        worker.stop.set()
        report = worker.report
    print(sync_summary(report))
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from pgsim.db.server import EmbeddedServer

    server = EmbeddedServer(args.data_dir)
    if args.action == "start":
        started = server.start()
        print(f"running (pid {started.pid}); connect with: {started.dsn()}")
    elif args.action == "stop":
        print("stopped" if server.stop() else "was not running")
    else:
        running = server.running()
        print(f"running (pid {running.pid}): {running.dsn()}" if running else f"not running ({server.data_dir})")
    return 0


def storage(dtype: str, dimension: int, prefix: int | None = None) -> str:
    """How a registration stores its vectors, for people: ``vector(384)``, ``vector(384) with a bit index``,
    or ``vector(256) with an index of their first 64 values``."""
    if prefix is not None:
        return f"vector({dimension}) with an index of their first {prefix} values"
    return f"vector({dimension}) with a bit index" if dtype == "bit" else f"{dtype}({dimension})"
