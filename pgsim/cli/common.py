"""What the commands share: the connection from --dsn/--data-dir, tables, progress bars, summaries."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pgsim.errors import PgsimError

if TYPE_CHECKING:
    from pgsim.encoding.backends.base import Backend


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


def lanes_text(backend: Backend) -> str:
    """How a call's batches run (see :func:`pgsim.encoding.backends.lanes.embed_batches`), as doctor says it."""
    import torch

    from pgsim.encoding.backends.lanes import lane_count

    lanes = lane_count(backend, None, sys.maxsize)
    if lanes == 1:
        return f"one forward pass at a time on {torch.get_num_threads()} thread(s)"
    return f"up to {lanes} forward passes side by side, one thread each"


def open_connection(args: argparse.Namespace) -> Any:
    from pgsim.db.connection import connect

    return connect(args.dsn, data_dir=args.data_dir)


def where_from_filters(items: Sequence[str]) -> dict[str, Any]:
    """--filter COLUMN=VALUE items as a where dict; a column given twice means IN."""
    where: dict[str, list[str]] = {}
    for item in items:
        column, sep, value = item.partition("=")
        if not sep:
            raise PgsimError(f"--filter takes COLUMN=VALUE; got {item!r}.")
        where.setdefault(column, []).append(value)
    return {column: values[0] if len(values) == 1 else values for column, values in where.items()}


def progress_bar(description: str) -> tuple[Any, Any]:
    """A tqdm bar (with rate and ETA) and the sync progress callback that moves it."""
    from tqdm import tqdm

    bar = tqdm(total=0, unit="row", desc=description, file=sys.stderr)

    def progress(report: Any, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(report.done - bar.n)
        bar.set_postfix(failed=report.failed, stale=report.stale, refresh=False)

    return bar, progress


def queued_count(conn: Any, ids: list[int]) -> int:
    row = conn.execute(  # qualified and cast: the rule in pgsim.db.catalog
        "SELECT pg_catalog.count(*) FROM pgsim.queue WHERE embedding_id OPERATOR(pg_catalog.=) "
        "ANY(%s::pg_catalog.int4[])",
        [ids],
    ).fetchone()
    return int(row[0])


def sync_summary(report: Any) -> str:
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
