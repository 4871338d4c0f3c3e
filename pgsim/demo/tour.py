"""``pgsim demo``: Debian package descriptions, embedded and searched with filters in one SQL query.

The demo uses pgsim as an application would: it registers ``pgsim_demo.packages.embedding`` (column,
triggers, HNSW index), loads rows with plain COPY (the triggers queue them), and drains the queue with
:func:`pgsim.backfill`. Idempotent: rows already loaded are kept and nothing is encoded twice, so a
second run finishes in seconds. Rows inserted later, from any client, are embedded by ``pgsim worker``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgsim.columns.adding import add_embedding
from pgsim.columns.batches import SyncReport
from pgsim.columns.registry import get_registration
from pgsim.columns.worker import backfill
from pgsim.db.calibration import MIN_ROWS, Calibration
from pgsim.db.hnsw import HNSW
from pgsim.db.schema import install
from pgsim.demo.corpus import Package, load_sample
from pgsim.encoding.backends.auto import say
from pgsim.encoding.encoder import Encoder, encoder_for
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.knn.filtered import Hit, search
from pgsim.knn.statements import Between
from pgsim.psycopg import register
from pgsim.quality.index_calibration import calibrate

SCHEMA = "pgsim_demo"
TABLE = f"{SCHEMA}.packages"
CREATE = """
CREATE SCHEMA IF NOT EXISTS pgsim_demo;
CREATE TABLE IF NOT EXISTS pgsim_demo.packages (
    package text PRIMARY KEY,
    section text NOT NULL,
    priority text NOT NULL,
    installed_size integer NOT NULL,
    source text NOT NULL,
    synopsis text NOT NULL,
    description text NOT NULL
);
"""
# What is embedded: the synopsis, then the long description when there is one (corpus.Package.text).
SOURCE = "concat_ws(E'\\n\\n', synopsis, nullif(description, ''))"
COLUMNS = "package, section, priority, installed_size, source, synopsis, description"


DISPLAY = ("package", "section", "installed_size", "synopsis")


@dataclass(frozen=True)
class DemoQuery:
    text: str
    where: dict[str, Any] = field(default_factory=dict)

    @property
    def filter_label(self) -> str:
        return " AND ".join(_describe(key, value) for key, value in self.where.items()) or "(none)"


def _describe(column: str, value: Any) -> str:
    if isinstance(value, list):
        return f"{column} IN ({', '.join(map(repr, value))})"
    if isinstance(value, Between):
        bounds = ([f"{column} >= {value.low!r}"] if value.low is not None else []) + (
            [f"{column} < {value.high!r}"] if value.high is not None else []
        )
        return " AND ".join(bounds)
    return f"{column} = {value!r}"


QUERIES = (
    DemoQuery("parse JSON documents quickly"),
    DemoQuery("parse JSON documents quickly", where={"section": "python"}),
    DemoQuery("play chess against the computer", where={"section": "games"}),
    DemoQuery("encrypt files with a password", where={"section": ["utils", "admin"]}),
    DemoQuery(
        "resize and convert images from the command line",
        where={"section": "graphics", "installed_size": Between(high=2048)},
    ),
)


@dataclass
class SearchResult:
    query: DemoQuery
    hits: list[Hit]
    seconds: float


@dataclass
class DemoReport:
    loaded: int
    encoded: int
    encode_seconds: float
    seconds: float  # of the backfill: encoding, reading and writing
    truncated: int
    index_built: bool
    results: list[SearchResult]
    calibration: Calibration | None = None  # when the rows just embedded were enough to measure the index


def load_rows(conn: psycopg.Connection[Any], packages: Sequence[Package]) -> int:
    """Insert packages not yet in the table (binary COPY into a temp table, then one INSERT); returns the count."""
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE pgsim_demo_load (LIKE pgsim_demo.packages) ON COMMIT DROP")
        with conn.cursor() as cur:
            with cur.copy("COPY pgsim_demo_load (" + COLUMNS + ") FROM STDIN") as copy:
                for p in packages:
                    copy.write_row(
                        (p.package, p.section, p.priority, p.installed_size, p.source, p.synopsis, p.description)
                    )
            cur.execute(
                "INSERT INTO pgsim_demo.packages (" + COLUMNS + ") "  # noqa: S608 - a constant column list
                "SELECT " + COLUMNS + " FROM pgsim_demo_load ON CONFLICT (package) DO NOTHING"
            )
            return cur.rowcount


def run_demo(
    conn: psycopg.Connection[Any],
    *,
    model: str = DEFAULT_MODEL,
    packages: Sequence[Package] | None = None,
    progress: Callable[[SyncReport, int], None] | None = None,
    queries: Sequence[DemoQuery] = QUERIES,
) -> DemoReport:
    """Register, load, embed what is queued, and search. ``progress(report, total)`` after each batch."""
    install(conn)
    register(conn)  # the vector type may have been created just now by install
    if get_registration(conn, TABLE, "embedding") is None:
        conn.execute("DROP SCHEMA IF EXISTS pgsim_demo CASCADE")  # a demo table from before registration
        conn.execute(CREATE.encode())
        add_embedding(conn, TABLE, "embedding", source=SOURCE, model=model, index=HNSW())
        index_built = True
    else:
        index_built = False
    loaded = load_rows(conn, packages if packages is not None else load_sample())
    encoder = encoder_for(model)
    truncated_before = encoder.stats.truncated
    synced = backfill(conn, TABLE, "embedding", progress=progress)
    calibration = None
    if synced.embedded:
        conn.execute("ANALYZE pgsim_demo.packages")
        # the planner follows what was measured on these rows (a drain does it too, once autovacuum has
        # counted the table; the demo should not wait for that)
        if synced.embedded >= MIN_ROWS:
            say("measuring the index on the demo's rows, once (pgsim calibrate; usually 5-15 s)")
        calibration = calibrate(conn, TABLE, "embedding", seconds=15)
    results = [run_query(conn, encoder, query) for query in queries]
    return DemoReport(
        loaded=loaded,
        encoded=synced.embedded,
        encode_seconds=synced.encode_seconds,
        seconds=synced.seconds,
        truncated=encoder.stats.truncated - truncated_before,
        index_built=index_built,
        results=results,
        calibration=calibration if calibration and calibration.stored else None,
    )


def run_query(conn: psycopg.Connection[Any], encoder: Encoder, query: DemoQuery, k: int = 5) -> SearchResult:
    vector = encoder.encode_query(query.text)
    started = time.perf_counter()
    hits = search(conn, TABLE, "embedding", vector, k=k, where=query.where, columns=DISPLAY)
    return SearchResult(query=query, hits=hits, seconds=time.perf_counter() - started)
