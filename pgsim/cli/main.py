"""The ``pgsim`` command: argument parsing, progress bars and tables over the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from pgsim.cli.calibrate_command import add_calibrate_command
from pgsim.cli.column_commands import (
    cmd_add_embedding,
    cmd_backfill,
    cmd_change_embedding,
    cmd_change_model,
    cmd_remove_chunks,
    cmd_remove_embedding,
    cmd_server,
    cmd_worker,
)
from pgsim.cli.grant_commands import cmd_grant
from pgsim.cli.inspect_commands import (
    cmd_demo,
    cmd_doctor,
    cmd_encoder,
    cmd_index_advise,
    cmd_install,
    cmd_search,
    cmd_status,
)
from pgsim.columns.registry import DTYPES
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.errors import PgsimError

SETUP_HINT = "Without --dsn or PGSIM_DSN, pgsim uses its embedded PostgreSQL under --data-dir (or PGSIM_HOME)."


def _seconds(value: str) -> float:
    number = float(value)
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0; got {value}")
    return number


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {number}")
    return number


def prefix_argument(value: str) -> int | bool:
    """``--prefix`` of change-embedding: a number of values, or ``none`` (False: the whole vectors)."""
    return False if value.lower() == "none" else _positive(value)


def _connection_options(parser: argparse.ArgumentParser, default: Any, verbose_default: Any) -> None:
    parser.add_argument(
        "--dsn", default=default, help="PostgreSQL connection string (default: $PGSIM_DSN, else the embedded server)"
    )
    parser.add_argument(
        "--data-dir",
        default=default,
        help="the embedded server's directory (default: $PGSIM_HOME or the user data dir)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", default=verbose_default, help="log what pgsim does")


def chunk_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chunk-tokens",
        type=_positive,
        help="also cut each text into chunks of at most this many of the model's word pieces; searches then "
        "return documents ranked by their best chunk",
    )
    parser.add_argument(
        "--chunk-overlap", type=int, help="word pieces each chunk repeats of the one before (default 0)"
    )


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="pgsim", description="Similarity search in PostgreSQL.", epilog=SETUP_HINT)
    _connection_options(parser, None, False)
    # the same options after the command (pgsim install --dsn URL); given there, they win
    shared = argparse.ArgumentParser(add_help=False)
    _connection_options(shared, argparse.SUPPRESS, argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, **options: Any) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, parents=[shared], **options)

    demo = add_command("demo", help="load Debian package descriptions, embed them, and run filtered searches")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--rows", type=int, help="load only the first ROWS packages of the shipped sample (default: all)")
    demo.set_defaults(run=cmd_demo)

    add_command("install", help="create or upgrade the pgsim schema").set_defaults(run=cmd_install)
    add_command(
        "status", help="server, pgvector and schema versions; queue depth, dead letters and lag per embedding column"
    ).set_defaults(run=cmd_status)

    search = add_command("search", help="the k rows nearest to a text, with equality filters")
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

    doctor = add_command(
        "doctor", help="which path a filtered search takes, why, its EXPLAIN ANALYZE, and the indexes its filter lacks"
    )
    doctor.add_argument("query", nargs="?", help="text to search for (without it: only the filter's missing indexes)")
    doctor.add_argument("--table", default="pgsim_demo.packages")
    doctor.add_argument("--column", default="embedding", help="the vector column")
    doctor.add_argument("-k", type=int, default=10)
    doctor.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE")
    doctor.add_argument("--where", metavar="SQL", help="a filter as SQL over the table's columns (ANDed with --filter)")
    doctor.add_argument(
        "--calibration",
        nargs="*",
        metavar="TABLE COLUMN",
        help="print the stored calibration curve of TABLE COLUMN (default: --table, --column) and whether it is stale",
    )
    doctor.add_argument("--model", help="the query's model (default: the column's registered model, else all-MiniLM)")
    doctor.set_defaults(run=cmd_doctor)

    encoder = add_command("encoder", help="the encoder backend a model runs on here, and why")
    encoder.add_argument("--model", default=DEFAULT_MODEL)
    encoder.add_argument("--measure", action="store_true", help="measure the backends again and remember the result")
    encoder.set_defaults(run=cmd_encoder)

    advise = add_command("index-advise", help="partial HNSW indexes for a workload's frequent filter values")
    advise.add_argument("--workload", required=True, help="JSON lines, one search's filter per line ('-' for stdin)")
    advise.add_argument("--table", default="pgsim_demo.packages")
    advise.add_argument("--column", default="embedding", help="the vector column")
    advise.add_argument("-k", type=int, default=10)
    advise.add_argument("--min-share", type=float, default=0.05, help="advise values used by at least this share")
    advise.add_argument(
        "--recall", type=float, default=0.99, help="no index where the calibration shows the full index reaching this"
    )
    advise.add_argument("--create", action="store_true", help="build the indexes (CONCURRENTLY) instead of printing")
    advise.set_defaults(run=cmd_index_advise)
    add_calibrate_command(add_command)

    add = add_command(
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
    add.add_argument(
        "--dtype", choices=DTYPES, default="vector",
        help="vector, halfvec (half the size), or bit: vector rows with a binary index, candidates re-ranked",
    )  # fmt: skip
    add.add_argument(
        "--prefix", type=int, metavar="N",
        help="index each vector's first N values, candidates re-ranked (a Matryoshka-trained model's sizes)",
    )  # fmt: skip
    add.add_argument("--m", type=int, default=16, help="HNSW m (default 16)")
    add.add_argument("--ef-construction", type=int, default=64, help="HNSW ef_construction (default 64)")
    add.add_argument("--no-index", action="store_true", help="no HNSW index")
    add.add_argument("--concurrently", action="store_true", help="build the index without blocking writes")
    chunk_arguments(add)
    add.set_defaults(run=cmd_add_embedding)

    remove = add_command("remove-embedding", help="undo add-embedding: triggers, queue, index, column")
    remove.add_argument("table")
    remove.add_argument("column")
    remove.add_argument("--keep-column", action="store_true", help="keep the column and its vectors")
    remove.set_defaults(run=cmd_remove_embedding)

    unchunk = add_command(
        "remove-chunks", help="stop keeping a column's documents as chunks; the workers re-embed the whole texts"
    )
    unchunk.add_argument("table")
    unchunk.add_argument("column")
    unchunk.set_defaults(run=cmd_remove_chunks)

    change = add_command(
        "change-model", help="re-embed a column with another model in the background, then switch over at once"
    )
    change.add_argument("table")
    change.add_argument("column")
    change.add_argument("--model", required=True)
    change.set_defaults(run=cmd_change_model)

    changing = add_command(
        "change-embedding",
        help="re-embed a column from another source, model or dtype in the background, then switch at once",
    )
    changing.add_argument("table")
    changing.add_argument("column")
    changing.add_argument("--source", nargs="+", help="the new source column(s), or an SQL expression")
    changing.add_argument("--model", help="the new model")
    changing.add_argument("--dtype", choices=DTYPES, help="the new storage (vector, halfvec or bit)")
    changing.add_argument(
        "--prefix", type=prefix_argument, metavar="N|none",
        help="index each vector's first N values (none: the whole vectors); alone, only the index is rebuilt",
    )  # fmt: skip
    chunk_arguments(changing)
    changing.set_defaults(run=cmd_change_embedding)

    for name, run, text in (
        ("backfill", cmd_backfill, "embed the rows that lack an embedding, with a progress bar; resumable"),
        ("worker", cmd_worker, "keep registered columns in sync: LISTEN for changes, encode them in batches"),
    ):
        command = add_command(name, help=text)
        command.add_argument("table", nargs="?", help="only this table (default: every registered column)")
        command.add_argument("column", nargs="?", help="only this column")
        command.add_argument(
            "--batch-size", type=_positive, default=256, help="at most this many rows per batch (one transaction)"
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
        command.add_argument(
            "--allow-superuser",
            action="store_true",
            help="run as a superuser or BYPASSRLS role even for tables other roles own (their code runs with it)",
        )
        command.add_argument(
            "--owner",
            action="append",
            dest="owners",
            metavar="ROLE",
            help="keep only the tables of this owner in sync (repeat for owners that trust each other)",
        )
        command.set_defaults(run=run)
        if name == "worker":
            command.add_argument("--poll-interval", type=_seconds, default=5.0, help="seconds between polls")
            command.add_argument("--once", action="store_true", help="drain the queue once, then exit")

    for name, text in (
        ("grant", "give a role what it needs to search, to work for registered tables, or to register its own"),
        ("revoke", "take back what pgsim grant gave"),
    ):
        command = add_command(name, help=text)
        command.add_argument("kind", choices=["search", "worker", "register"])
        command.add_argument("role")
        command.add_argument(
            "--table",
            action="append",
            dest="tables",
            metavar="TABLE",
            help="worker: only these registered tables (default: every one you own); search: also SELECT on them",
        )
        command.set_defaults(run=cmd_grant, revoke=name == "revoke")

    server = add_command("server", help="start, stop or look at the embedded PostgreSQL")
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
