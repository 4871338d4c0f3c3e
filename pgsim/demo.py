"""``pgsim demo``: Debian package descriptions, embedded and searched with filters in one SQL query.

Idempotent: rows already loaded are kept, only rows without an embedding are encoded, and the index is
built once, so a second run finishes in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psycopg

from pgsim.corpus import Package, load_sample
from pgsim.encode import Encoder, Vector
from pgsim.install import install
from pgsim.psycopg import register
from pgsim.search import Between, Hit, search

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
    description text NOT NULL,
    embedding vector(384)
);
"""
INDEX = (
    "CREATE INDEX IF NOT EXISTS packages_embedding_hnsw ON pgsim_demo.packages USING hnsw (embedding vector_cosine_ops)"
)
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
    truncated: int
    index_seconds: float
    index_built: bool
    results: list[SearchResult]


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


def write_embeddings(conn: psycopg.Connection[Any], keys: Sequence[str], vectors: Sequence[Vector | None]) -> None:
    """Binary COPY of (key, vector) into a temp table, then one UPDATE … FROM."""
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE pgsim_demo_vectors (package text, embedding vector(384)) ON COMMIT DROP")
        with conn.cursor() as cur:
            with cur.copy("COPY pgsim_demo_vectors (package, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["text", "vector"])
                for key, vector in zip(keys, vectors, strict=True):
                    copy.write_row((key, vector))
            cur.execute(
                "UPDATE pgsim_demo.packages p SET embedding = v.embedding FROM pgsim_demo_vectors v "
                "WHERE p.package = v.package"
            )


def run_demo(
    conn: psycopg.Connection[Any],
    encoder: Encoder,
    *,
    packages: Sequence[Package] | None = None,
    progress: Callable[[int, int], None] | None = None,
    queries: Sequence[DemoQuery] = QUERIES,
    chunk: int = 256,
) -> DemoReport:
    """Load, encode what lacks an embedding, index, and search. ``progress(done, total)`` while encoding."""
    install(conn)
    register(conn)  # the vector type may have been created just now by install
    conn.execute(CREATE.encode())
    loaded = load_rows(conn, packages if packages is not None else load_sample())
    pending = conn.execute(
        "SELECT package, synopsis || E'\\n\\n' || description FROM pgsim_demo.packages "
        "WHERE embedding IS NULL ORDER BY package"
    ).fetchall()
    started = time.perf_counter()
    truncated_before = encoder.stats.truncated
    for start in range(0, len(pending), chunk):
        rows = pending[start : start + chunk]
        vectors = encoder.encode(
            [text for _, text in rows],
            progress=partial(_report, progress, start, len(pending)) if progress else None,
        )
        write_embeddings(conn, [key for key, _ in rows], vectors)
    encode_seconds = time.perf_counter() - started
    index_built = conn.execute("SELECT to_regclass('pgsim_demo.packages_embedding_hnsw')").fetchone() == (None,)
    started = time.perf_counter()
    if index_built:
        conn.execute(INDEX)
        conn.execute("ANALYZE pgsim_demo.packages")
    index_seconds = time.perf_counter() - started
    results = [run_query(conn, encoder, query) for query in queries]
    return DemoReport(
        loaded=loaded,
        encoded=len(pending),
        encode_seconds=encode_seconds,
        truncated=encoder.stats.truncated - truncated_before,
        index_seconds=index_seconds,
        index_built=index_built,
        results=results,
    )


def _report(progress: Callable[[int, int], None], offset: int, total: int, done: int) -> None:
    progress(offset + done, total)


def run_query(conn: psycopg.Connection[Any], encoder: Encoder, query: DemoQuery, k: int = 5) -> SearchResult:
    vector = encoder.encode_query(query.text)
    started = time.perf_counter()
    hits = search(conn, TABLE, "embedding", vector, k=k, where=query.where, columns=DISPLAY)
    return SearchResult(query=query, hits=hits, seconds=time.perf_counter() - started)
