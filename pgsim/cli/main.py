"""The ``pgsim`` command: argument parsing, progress bars and tables over the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from pgsim.encoding.encoder import DEFAULT_MODEL
from pgsim.errors import PgsimError

SETUP_HINT = "Without --dsn or PGSIM_DSN, pgsim uses its embedded PostgreSQL under --data-dir (or PGSIM_HOME)."


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], max_width: int = 60) -> str:
    """Rows as an aligned plain-text table; long cells are cut with an ellipsis."""

    def cell(value: Any) -> str:
        text = "" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        text = " ".join(text.split())
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {number}")
    return number


def lanes_text(backend: Any) -> str:
    """How a call's batches run (see pgsim.backends.embed_batches), as pgsim doctor says it."""
    import torch

    from pgsim.encoding.backends.base import lane_count

    lanes = lane_count(backend, None, sys.maxsize)
    if lanes == 1:
        return f"one forward pass at a time on {torch.get_num_threads()} thread(s)"
    return f"up to {lanes} forward passes side by side, one thread each"


def _connect(args: argparse.Namespace) -> Any:
    from pgsim.db.connection import connect

    return connect(args.dsn, data_dir=args.data_dir)


def cmd_demo(args: argparse.Namespace) -> int:
    from pgsim.demo.corpus import load_sample
    from pgsim.demo.tour import TABLE, run_demo

    started = time.perf_counter()
    conn = _connect(args)
    bar, progress = _sync_bar("embedding")
    packages = load_sample()[: args.rows] if args.rows else None
    with conn:
        try:
            report = run_demo(conn, model=args.model, packages=packages, progress=progress)
        finally:
            bar.close()
    print(f"table {TABLE}: {report.loaded} rows loaded now; {report.encoded} embedded now", end="")
    if report.encoded:
        rate = report.encoded / report.encode_seconds if report.encode_seconds else 0.0
        print(
            f" in {report.seconds:.1f}s ({rate:.0f} texts/s while encoding, {report.truncated} truncated to the "
            "model's limit)",
            end="",
        )
    print("; HNSW index " + ("built" if report.index_built else "already there"))
    for result in report.results:
        print(
            f"\nquery: {result.query.text!r}   filter: {result.query.filter_label}   "
            f"{len(result.hits)} rows in {result.seconds * 1000:.1f} ms"
        )
        rows = [
            [hit.row["package"], hit.row["section"], hit.row["installed_size"], 1 - hit.distance, hit.row["synopsis"]]
            for hit in result.hits
        ]
        print(format_table(["package", "section", "size KiB", "similarity", "synopsis"], rows))
    print(f"\ndone in {time.perf_counter() - started:.1f}s")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from pgsim.db.schema import install

    with _connect(args) as conn:
        report = install(conn)
    if report.applied:
        print(f"applied {', '.join(report.applied)}")
    print(f"pgsim schema up to date ({len(report.applied) + len(report.already_applied)} SQL files applied in all)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pgsim.db.schema import applied_files, package_version

    if not (args.dsn or os.environ.get("PGSIM_DSN")):
        from pgsim.db.server import EmbeddedServer

        server = EmbeddedServer(args.data_dir)
        running = server.running()
        print(f"embedded server: {server.data_dir} - " + (f"running (pid {running.pid})" if running else "not running"))
    with _connect(args) as conn:
        info = conn.execute(
            "SELECT current_database(), current_user, current_setting('server_version'), "
            "(SELECT extversion FROM pg_extension WHERE extname = 'vector')"
        ).fetchone()
        assert info is not None
        print(f"database: {info[0]} as {info[1]}, PostgreSQL {info[2]}, pgvector {info[3] or 'not installed'}")
        files = applied_files(conn)
        if files:
            last_version = files[-1][1]
            print(f"pgsim schema: {len(files)} SQL files applied, last by pgsim {last_version}; ", end="")
            print(f"package {package_version()}")
        else:
            print("pgsim schema: not installed (run: pgsim install)")
        if conn.execute("SELECT to_regclass('pgsim.sync_status')").fetchone() != (None,):
            rows = conn.execute(
                "SELECT table_name || '.' || column_name, model, coalesce('replaces #' || replaces, ''), queued, "
                "retrying, dead_letters, coalesce(round(extract(epoch FROM lag)::numeric, 1) || ' s', '') "
                "FROM pgsim.sync_status ORDER BY id"
            ).fetchall()
            if rows:
                print("\nembedding columns (lag: age of the oldest queued row):")
                headers = ["column", "model", "model change", "queued", "retrying", "dead letters", "lag"]
                print(format_table(headers, rows))
    return 0


def _filters(items: Sequence[str]) -> dict[str, Any]:
    """--filter COLUMN=VALUE items as a where dict; a column given twice means IN."""
    where: dict[str, list[str]] = {}
    for item in items:
        column, sep, value = item.partition("=")
        if not sep:
            raise PgsimError(f"--filter takes COLUMN=VALUE; got {item!r}.")
        where.setdefault(column, []).append(value)
    return {column: values[0] if len(values) == 1 else values for column, values in where.items()}


def cmd_search(args: argparse.Namespace) -> int:
    from pgsim.knn.filtered import search

    where = _filters(args.filter)
    with _connect(args) as conn:
        started = time.perf_counter()
        hits = search(conn, args.table, args.column, args.query, k=args.k, where=where, model=args.model)
        seconds = time.perf_counter() - started
    if not hits:
        print("no rows match")
        return 0
    headers = [name for name in hits[0].row]
    print(format_table(headers + ["distance"], [list(hit.row.values()) + [hit.distance] for hit in hits]))
    print(f"{len(hits)} rows in {seconds * 1000:.1f} ms (including encoding the query)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from pgsim.columns.registry import get_registration
    from pgsim.knn.filtered import explain
    from pgsim.psycopg import encoder_for

    with _connect(args) as conn:
        plan, analyzed = explain(
            conn, args.table, args.column, args.query, k=args.k, where=_filters(args.filter), model=args.model
        )
        registration = get_registration(conn, args.table, args.column)
    model = args.model or (registration.model if registration else DEFAULT_MODEL)
    backend = encoder_for(model).backend
    precision = f" in {backend.precision}" if hasattr(backend, "precision") else ""  # openvino's own choice
    print(f"encoder: {model} on backend {backend.name}{precision} ({backend.reason}); {lanes_text(backend)}")
    print(f"path: {plan.path}" + (f" using index {plan.index_name}" if plan.path == "hnsw" else ""))
    print(f"why: {plan.reason}")
    print(f"estimated rows passing the filter: {plan.estimated_rows:.0f}", end="")
    if plan.indexed_rows is not None:
        print(f" of {plan.indexed_rows:.0f} indexed (selectivity {plan.selectivity:.4%})", end="")
    print()
    if plan.path == "hnsw":
        print(
            f"settings (SET LOCAL): hnsw.iterative_scan = relaxed_order, hnsw.ef_search = {plan.ef_search}, "
            f"hnsw.max_scan_tuples = {plan.max_scan_tuples}; rows re-sorted by distance"
        )
    else:
        print("settings: none (the filter runs first, then distances; no index can serve the ordering)")
    print("\nEXPLAIN ANALYZE:")
    print(analyzed)
    return 0


def cmd_index_advise(args: argparse.Namespace) -> int:
    import json

    from pgsim.knn.advice import advise, create

    source = sys.stdin if args.workload == "-" else open(args.workload, encoding="utf-8")
    with source:
        workload = [json.loads(line) for line in source if line.strip()]
    if not all(isinstance(item, dict) for item in workload):
        raise PgsimError('--workload holds one JSON object per line, the filter of one search: {"section": "libs"}')
    with _connect(args) as conn:
        advice = advise(conn, args.table, args.column, workload, k=args.k, min_share=args.min_share)
        if not advice:
            print(f"no partial index advised for {len(workload)} searches (min share {args.min_share:.0%})")
            return 0
        rows = [
            [a.column, a.value, f"{a.share:.0%}", a.current.path, f"{a.current.estimated_rows:.0f}", a.current.reason]
            for a in advice
        ]
        print(format_table(["filter column", "value", "share", "path now", "rows", "why"], rows, max_width=70))
        for item in advice:
            statement = item.statement.as_string(conn)
            if args.create:
                started = time.perf_counter()
                create(conn, item)
                print(f"created in {time.perf_counter() - started:.1f}s: {statement}")
            else:
                print(statement + ";")
    return 0


def cmd_add_embedding(args: argparse.Namespace) -> int:
    from pgsim.columns.registry import add_embedding
    from pgsim.db.hnsw import HNSW
    from pgsim.db.schema import install

    source: Any = args.source if len(args.source) > 1 else args.source[0]
    index = None if args.no_index else HNSW(args.m, args.ef_construction)
    with _connect(args) as conn:
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
        )
        queued = conn.execute("SELECT count(*) FROM pgsim.queue WHERE embedding_id = %s", [registration.id]).fetchone()
    print(
        f"{registration.table}.{registration.column}: {registration.dtype}({registration.dimension}) of "
        f"{registration.source} by {registration.model}; "
        + (f"index {registration.index_name}; " if registration.index_name else "no index; ")
        + f"{queued[0] if queued else 0} existing rows queued. Embed them: pgsim backfill (or run pgsim worker)"
    )
    return 0


def cmd_remove_embedding(args: argparse.Namespace) -> int:
    from pgsim.columns.registry import remove_embedding

    with _connect(args) as conn:
        remove_embedding(conn, args.table, args.column, drop_column=not args.keep_column)
    print(f"{args.table}.{args.column}: triggers, queue, index and registration removed")
    return 0


def cmd_change_model(args: argparse.Namespace) -> int:
    from pgsim.columns.registry import change_model

    with _connect(args) as conn:
        new = change_model(conn, args.table, args.column, args.model)
    print(
        f"filling {new.table}.{new.column} with {new.model} ({new.dimension} dimensions); searches keep using "
        f"{args.column} until it is full. Run pgsim backfill (or pgsim worker): it switches over when done."
    )
    return 0


def _sync_bar(description: str) -> tuple[Any, Any]:
    """A tqdm bar (with rate and ETA) and the sync progress callback that moves it."""
    from tqdm import tqdm

    bar = tqdm(total=0, unit="row", desc=description, file=sys.stderr)

    def progress(report: Any, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(report.done - bar.n)
        bar.set_postfix(failed=report.failed, stale=report.stale, refresh=False)

    return bar, progress


def cmd_backfill(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from pgsim.columns.worker import backfill, database_is_remote

    if args.processes > 1:
        return _backfill_in_processes(args)
    with _connect(args) as conn, _connect(args) if database_is_remote(conn) else nullcontext() as second:
        bar, progress = _sync_bar("embedding")
        try:
            report = backfill(conn, args.table, args.column, batch_size=args.batch_size, progress=progress,
                              cache=args.cache, overlap_with=second)  # fmt: skip
        finally:
            bar.close()
    print(_sync_summary(report))
    return 0 if not report.failed and not report.dead else 1


def _backfill_in_processes(args: argparse.Namespace) -> int:
    """Queue the rows, then let ``args.processes`` workers drain the queue; the bar follows the queue."""
    from tqdm import tqdm

    from pgsim.columns.processes import run_processes, worker_command
    from pgsim.columns.worker import queue_backfill
    from pgsim.db.connection import resolve_dsn

    dsn = resolve_dsn(args.dsn, args.data_dir)
    with _connect(args) as conn:
        ids = [registration.id for registration in queue_backfill(conn, args.table, args.column)]
        remaining = _queued(conn, ids)
        bar = tqdm(total=remaining, unit="row", desc=f"embedding ({args.processes} processes)", file=sys.stderr)
        started = time.perf_counter()
        command = worker_command(
            dsn, args.table, args.column, args.batch_size, once=True, poll_interval=1.0, cache=args.cache
        )
        code = run_processes(command, args.processes, tick=lambda: bar.update(remaining - _queued(conn, ids) - bar.n))
        bar.close()
        left = _queued(conn, ids)
    seconds = time.perf_counter() - started
    done = remaining - left
    rate = done / seconds if seconds else 0.0
    print(f"{done} queued rows done by {args.processes} processes in {seconds:.1f}s ({rate:.1f} rows/s); {left} left")
    return code


def _queued(conn: Any, ids: list[int]) -> int:
    row = conn.execute("SELECT count(*) FROM pgsim.queue WHERE embedding_id = ANY(%s)", [ids]).fetchone()
    return int(row[0])


def _sync_summary(report: Any) -> str:
    rate = report.embedded / report.encode_seconds if report.encode_seconds else 0.0
    text = (
        f"{report.embedded} rows embedded ({rate:.0f} texts/s while encoding; writing took "
        f"{report.write_seconds:.1f}s of {report.seconds:.1f}s), {report.emptied} without text, "
        f"{report.missing} deleted meanwhile, {report.failed} failed (to be retried), {report.dead} dead letters"
    )
    if report.cached:
        text += f"; {report.cached} texts came from the cache instead of the model"
    if report.switched:
        text += f"; {report.switched} model change(s) completed"
    return text


def cmd_worker(args: argparse.Namespace) -> int:
    import signal

    from pgsim.columns.worker import Worker
    from pgsim.db.connection import resolve_dsn

    if args.processes > 1:
        from pgsim.columns.processes import run_processes, worker_command

        command = worker_command(
            resolve_dsn(args.dsn, args.data_dir), args.table, args.column, args.batch_size, once=args.once,
            poll_interval=args.poll_interval, cache=args.cache,
        )  # fmt: skip
        return run_processes(command, args.processes)

    worker = Worker(
        resolve_dsn(args.dsn, args.data_dir),
        table=args.table,
        column=args.column,
        batch_size=args.batch_size,
        poll_interval=args.poll_interval,
        cache=args.cache,
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
    print(_sync_summary(report))
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


def build_parser() -> argparse.ArgumentParser:
    from pgsim.encoding.encoder import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="pgsim", description="Similarity search in PostgreSQL.", epilog=SETUP_HINT)
    parser.add_argument("--dsn", help="PostgreSQL connection string (default: $PGSIM_DSN, else the embedded server)")
    parser.add_argument(
        "--data-dir", help="the embedded server's directory (default: $PGSIM_HOME or the user data dir)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what pgsim does")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="load Debian package descriptions, embed them, and run filtered searches")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--rows", type=int, help="load only the first ROWS packages of the shipped sample (default: all)")
    demo.set_defaults(run=cmd_demo)

    commands.add_parser("install", help="create or upgrade the pgsim schema").set_defaults(run=cmd_install)
    commands.add_parser(
        "status", help="server, pgvector and schema versions; queue depth, dead letters and lag per embedding column"
    ).set_defaults(run=cmd_status)

    search = commands.add_parser("search", help="the k rows nearest to a text, with equality filters")
    search.add_argument("query", help="text to search for")
    search.add_argument("--table", default="pgsim_demo.packages")
    search.add_argument("--column", default="embedding", help="the vector column")
    search.add_argument("-k", type=int, default=10)
    search.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="keep rows where COLUMN = VALUE; repeat a column for IN",
    )
    search.add_argument("--model", help="the query's model (default: the column's registered model, else all-MiniLM)")
    search.set_defaults(run=cmd_search)

    doctor = commands.add_parser("doctor", help="which path a filtered search takes, why, and its EXPLAIN ANALYZE")
    doctor.add_argument("query", help="text to search for")
    doctor.add_argument("--table", default="pgsim_demo.packages")
    doctor.add_argument("--column", default="embedding", help="the vector column")
    doctor.add_argument("-k", type=int, default=10)
    doctor.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE")
    doctor.add_argument("--model", help="the query's model (default: the column's registered model, else all-MiniLM)")
    doctor.set_defaults(run=cmd_doctor)

    advise = commands.add_parser("index-advise", help="partial HNSW indexes for a workload's frequent filter values")
    advise.add_argument("--workload", required=True, help="JSON lines, one search's filter per line ('-' for stdin)")
    advise.add_argument("--table", default="pgsim_demo.packages")
    advise.add_argument("--column", default="embedding", help="the vector column")
    advise.add_argument("-k", type=int, default=10)
    advise.add_argument("--min-share", type=float, default=0.05, help="advise values used by at least this share")
    advise.add_argument("--create", action="store_true", help="build the indexes (CONCURRENTLY) instead of printing")
    advise.set_defaults(run=cmd_index_advise)

    add = commands.add_parser(
        "add-embedding", help="add an embedding column kept in sync with its source text by triggers and workers"
    )
    add.add_argument("table", help="table (schema.table) with a primary key")
    add.add_argument("column", help="the embedding column to add (or adopt, if it exists with the model's type)")
    add.add_argument(
        "--source",
        required=True,
        nargs="+",
        help="the column(s) holding the text, or an SQL expression over the table's columns",
    )
    add.add_argument("--model", default=DEFAULT_MODEL)
    add.add_argument("--dtype", choices=["vector", "halfvec"], default="vector")
    add.add_argument("--m", type=int, default=16, help="HNSW m (default 16)")
    add.add_argument("--ef-construction", type=int, default=64, help="HNSW ef_construction (default 64)")
    add.add_argument("--no-index", action="store_true", help="no HNSW index")
    add.add_argument("--concurrently", action="store_true", help="build the index without blocking writes")
    add.set_defaults(run=cmd_add_embedding)

    remove = commands.add_parser("remove-embedding", help="undo add-embedding: triggers, queue, index, column")
    remove.add_argument("table")
    remove.add_argument("column")
    remove.add_argument("--keep-column", action="store_true", help="keep the column and its vectors")
    remove.set_defaults(run=cmd_remove_embedding)

    change = commands.add_parser(
        "change-model", help="re-embed a column with another model in the background, then switch over at once"
    )
    change.add_argument("table")
    change.add_argument("column")
    change.add_argument("--model", required=True)
    change.set_defaults(run=cmd_change_model)

    for name, run, text in (
        ("backfill", cmd_backfill, "embed the rows that lack an embedding, with a progress bar; resumable"),
        ("worker", cmd_worker, "keep registered columns in sync: LISTEN for changes, encode them in batches"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("table", nargs="?", help="only this table (default: every registered column)")
        command.add_argument("column", nargs="?", help="only this column")
        command.add_argument(
            "--batch-size", type=int, default=256, help="at most this many rows per batch (one transaction)"
        )
        command.add_argument(
            "--processes",
            type=_positive,
            default=1,
            help="worker processes sharing the queue (each gets cores/N threads)",
        )
        command.add_argument(
            "--cache",
            action="store_true",
            help="look texts up in pgsim.embedding_cache before encoding them, and add what is encoded",
        )
        command.set_defaults(run=run)
        if name == "worker":
            command.add_argument("--poll-interval", type=float, default=5.0, help="seconds between polls")
            command.add_argument("--once", action="store_true", help="drain the queue once, then exit")

    server = commands.add_parser("server", help="start, stop or look at the embedded PostgreSQL")
    server.add_argument("action", choices=["start", "stop", "status"])
    server.set_defaults(run=cmd_server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the model loads from disk; its bar is noise
    try:
        return int(args.run(args))
    except PgsimError as exc:
        print(f"pgsim: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pgsim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
