"""The ``pgsim`` command: argument parsing, progress bars and tables over the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pgsim.cli.column_commands import (
    cmd_add_embedding,
    cmd_backfill,
    cmd_change_model,
    cmd_remove_embedding,
    cmd_server,
    cmd_worker,
)
from pgsim.cli.inspect_commands import cmd_demo, cmd_doctor, cmd_index_advise, cmd_install, cmd_search, cmd_status
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.errors import PgsimError

SETUP_HINT = "Without --dsn or PGSIM_DSN, pgsim uses its embedded PostgreSQL under --data-dir (or PGSIM_HOME)."


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:

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
