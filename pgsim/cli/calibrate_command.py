"""``pgsim calibrate TABLE COLUMN``: measure the column's HNSW index on the table's own rows
(:func:`pgsim.quality.index_calibration.calibrate`), with a progress bar, and print the curve the planner follows."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from pgsim.cli.common import format_table, open_connection
from pgsim.db.calibration import DEFAULT_QUERIES, DEFAULT_SECONDS


def add_calibrate_command(add_command: Callable[..., Any]) -> None:
    calibrate = add_command(
        "calibrate",
        help="measure recall and speed of a column's HNSW index so searches pick the fastest path that keeps recall",
    )
    calibrate.add_argument("table")
    calibrate.add_argument("column")
    calibrate.add_argument(
        "--seconds", type=float, default=DEFAULT_SECONDS, help=f"time budget (default: {DEFAULT_SECONDS:g})"
    )
    calibrate.add_argument("-k", type=int, default=10, help="the k measured (default: 10)")
    calibrate.add_argument(
        "--queries",
        type=int,
        default=DEFAULT_QUERIES,
        help=f"query vectors sampled from the table (default: {DEFAULT_QUERIES})",
    )
    calibrate.add_argument(
        "--query-log",
        type=argparse.FileType("r", encoding="utf-8"),
        metavar="FILE",
        help="real queries instead of sampled ones: a text file, one query per line (- for standard input)",
    )
    calibrate.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="SQL",
        dest="filters",
        help="a filter your searches use, measured as its own level (repeatable)",
    )
    calibrate.set_defaults(run=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pgsim.quality.index_calibration import calibrate, relevance_of

    print(
        f"calibrating {args.table}.{args.column} for up to {args.seconds:g} s (Ctrl-C stores nothing)", file=sys.stderr
    )
    with open_connection(args) as conn, tqdm(total=100, unit="%", desc="measuring", file=sys.stderr) as bar:
        result = calibrate(
            conn,
            args.table,
            args.column,
            seconds=args.seconds,
            k=args.k,
            queries=logged_queries(args.query_log) if args.query_log else args.queries,
            filters=args.filters,
            progress=lambda fraction: bar.update(round(fraction * 100) - bar.n),
            relevance=False,
        )
        relevance = relevance_of(conn, args.table, args.column, args.seconds)
    if relevance.stored:
        scores = ", ".join(f"{score:.3f} over the {reference}th" for reference, score in relevance.min_scores)
        print(f"relevance threshold (relevant_search's min_score by reference row): {scores}"
              + ("; hybrid fusion calibrated" if relevance.hybrid else ""))  # fmt: skip
    else:
        print(f"relevance: nothing stored: {relevance.reason}")
    if not result.stored:
        print(f"nothing stored: {result.reason}")
        return 0
    print(
        f"{result.table}.{result.column} ({result.rows} rows, index {result.index_name}): {result.queries} queries, "
        f"k = {result.k}, {result.seconds:.1f} s"
    )
    headers = ["selectivity", "rows", "exact ms", *(f"ef {ef}" for ef in result.ef_search)]
    rows = [
        [
            f"{level.selectivity:.1%}",
            level.rows,
            f"{level.exact_ms:.1f}",
            *(f"{recall:.3f} / {ms:.1f} ms" for recall, ms in zip(level.recall, level.hnsw_ms, strict=True)),
            *[""] * (len(result.ef_search) - len(level.recall)),  # all k found already: not measured further
        ]
        for level in result.levels
    ]
    print(format_table(headers, rows))
    print(
        "(recall@k / median time of the HNSW path per ef_search; searches take the smallest that reaches their target)"
    )
    return 0


def logged_queries(lines: Any) -> list[str]:
    with lines:
        return [line.strip() for line in lines if line.strip()]
