"""Every public pgsim function on the connections applications have: a plain psycopg connection, a
psycopg_pool connection, a connection through PgBouncer in transaction pooling mode (where consecutive
transactions run on different server connections: tests/fixtures/pgbouncer.py makes sure they do), and an
async psycopg connection for the async path (``pgsim.register_async`` and the SQL function ``pgsim.knn``).

Results are checked against numpy ground truth over the vectors the table holds: the k rows nearest to the
query among those that pass the filter. The rows' text is the sample packages' synopses (short: quick to
encode), encoded once here for the tables loaded with their vectors and to check what pgsim stored.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.pgbouncer import SERVER_CONNECTIONS
from psycopg import sql
from psycopg_pool import ConnectionPool

import pgsim
from pgsim.columns.worker import LISTEN_LOST
from pgsim.demo.corpus import Package
from pgsim.encoding.encoder import Encoder
from pgsim.knn.filtered import search_with_plan

K = 10
BUCKETS = 4  # rows of the tables the tests fill have bucket = id % BUCKETS
SQL_ROWS = 96  # written with INSERT, embedded by pgsim.sync
INGESTED_ROWS = 48  # written by pgsim.ingest, half in autocommit, half inside a transaction
CORPUS_BUCKETS = 16  # the corpus table: 400 rows, a bucket keeps 25 of them
# the hnsw path for every filter of these tests (the defaults send tables this small to the exact path)
HNSW = pgsim.Tuning(exact_below_rows=0, min_hnsw_selectivity=0.05)
QUERIES = ("parse json", "play a game", "network server", "image editing", "python library", "font files",
           "audio player", "database driver", "kernel module", "documentation")  # fmt: skip
KNN_SQL = (
    "SELECT (r.row->>'id')::int, r.distance FROM pgsim.knn(%s::regclass, 'embedding', %s, %s, %s, "
    "exact_below_rows => 0, min_hnsw_selectivity => 0.05) AS r"
)

Truth = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]  # ids, buckets, vectors


@pytest.fixture(scope="module")
def database(database: str) -> str:
    """The module's database, where PostgreSQL scans a table by its HNSW index for the hnsw path as it does a
    large one (for tables this small a sequential scan costs less, and is exact whatever the settings). Set
    before any session opens, PgBouncer's included."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET enable_seqscan = off").format(sql.Identifier(conn.info.dbname)))
    return database


@pytest.fixture(scope="module")
def installed(pgbouncer_dsn: str) -> None:
    """pgsim installed through PgBouncer (the kinds of connection below install it again: a no-op)."""
    with psycopg.connect(pgbouncer_dsn, autocommit=True, prepare_threshold=None) as conn:
        assert pgsim.install(conn).applied


@pytest.fixture(scope="module")
def pool(database: str, installed: None) -> Iterator[ConnectionPool[Any]]:
    with ConnectionPool(database, min_size=1, max_size=2, configure=pgsim.register, open=True) as opened:
        yield opened


@pytest.fixture(scope="module")
def queries(encoder: Encoder) -> dict[str, np.ndarray[Any, Any]]:
    return {text: encoder.encode_query(text) for text in QUERIES}


@pytest.fixture(scope="module")
def texts(packages: list[Package]) -> list[str]:
    return [p.synopsis for p in packages]


@pytest.fixture(scope="module")
def vectors(encoder: Encoder, texts: list[str]) -> np.ndarray[Any, Any]:
    return np.stack(encoder.encode(texts))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def corpus(database: str, installed: None, texts: list[str], vectors: Any) -> Truth:
    """Table ``corpus``: the 400 texts with their embeddings, bucket = id % CORPUS_BUCKETS, an HNSW index,
    statistics."""
    with pgsim.connect(database) as conn:
        conn.execute("CREATE TABLE corpus (id int PRIMARY KEY, bucket int, body text, embedding vector(384))")
        with conn.cursor() as cur, cur.copy("COPY corpus FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "int4", "text", "vector"])
            for i, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
                copy.write_row((i, i % CORPUS_BUCKETS, text, vector))
        conn.execute("CREATE INDEX ON corpus USING hnsw (embedding vector_cosine_ops)")
        conn.execute("ANALYZE corpus")
    return stored(database, "corpus")


@contextmanager
def connection(kind: str, autocommit: bool, *, database: str, bouncer: str, pool: ConnectionPool[Any]) -> Iterator[
    psycopg.Connection[Any]
]:  # fmt: skip
    """A connection of ``kind`` as an application opens one."""
    if kind == "plain":
        with psycopg.connect(database, autocommit=autocommit) as conn:
            yield conn
    elif kind == "pgbouncer":  # PgBouncer 1.18 has no prepared statements in transaction mode
        with psycopg.connect(bouncer, autocommit=autocommit, prepare_threshold=None) as conn:
            yield conn
    else:
        with pool.connection() as conn:
            conn.autocommit = autocommit
            try:
                yield conn
            finally:
                conn.rollback()
                conn.autocommit = False  # as the pool hands its connections out


def stored(database: str, table: str) -> Truth:
    """ids, buckets and embeddings the table holds, read directly (not through the connection tested)."""
    with pgsim.connect(database) as conn:
        rows = conn.execute(sql.SQL("SELECT id, bucket, embedding FROM {} ORDER BY id").format(sql.Identifier(table)))
        ids, buckets, vectors = zip(*rows.fetchall(), strict=True)
    return np.array(ids), np.array(buckets), np.stack([np.asarray(v.to_list(), dtype=np.float32) for v in vectors])


def assert_nearest(found: list[tuple[int, float]], truth: Truth, query: Any, bucket: int | None) -> None:
    """``found`` (id, distance), nearest first, are the K rows nearest to ``query`` among those in ``bucket``
    (all rows when None), as numpy finds them from the stored vectors (rows tied at the K-th may swap)."""
    ids, buckets, vectors = truth
    keep = np.ones(len(ids), dtype=bool) if bucket is None else buckets == bucket
    distances = 1.0 - (vectors[keep] @ query) / (np.linalg.norm(vectors[keep], axis=1) * np.linalg.norm(query))
    by_id = dict(zip(ids[keep].tolist(), distances.tolist(), strict=True))
    assert len(found) == K and len({row_id for row_id, _ in found}) == K
    for row_id, distance in found:
        assert row_id in by_id, f"row {row_id} does not pass the filter"
        assert abs(distance - by_id[row_id]) < 1e-5
    assert np.allclose([distance for _, distance in found], np.sort(distances)[:K], atol=1e-5)


def assert_nothing_left(pgbouncer_dsn: str) -> None:
    """No session state of a pgsim call is left on PgBouncer's server connections (visited in turn), where
    the next transaction, any client's, would run under it; and no staged ingest left in the database."""
    with psycopg.connect(pgbouncer_dsn, autocommit=True, prepare_threshold=None) as conn:
        for _ in range(2 * SERVER_CONNECTIONS):
            left = conn.execute(
                "SELECT current_setting('search_path'), current_setting('enable_indexscan'), "
                "coalesce(current_setting('hnsw.ef_search', true), '40'), "
                "coalesce(current_setting('hnsw.iterative_scan', true), 'off')"
            ).fetchone()
            assert left == ('"$user", public', "on", "40", "off"), f"session state left on a server connection: {left}"
        staged = "SELECT count(*) FROM pg_class WHERE relname LIKE 'pgsim_ingest%%' AND relpersistence = 't'"
        assert conn.execute(staged).fetchone() == (0,)


def rows_of(texts: list[str], ids: range) -> list[dict[str, Any]]:
    return [{"id": i, "bucket": i % BUCKETS, "body": texts[i]} for i in ids]


@pytest.mark.parametrize("kind", ["plain", "pool", "pgbouncer"])
def test_an_application_on_each_kind_of_connection(
    kind: str,
    database: str,
    pgbouncer_dsn: str,
    pool: ConnectionPool[Any],
    texts: list[str],
    vectors: Any,
    queries: dict[str, Any],
) -> None:
    table = sql.Identifier(f"docs_{kind}")
    options: dict[str, Any] = {"database": database, "bouncer": pgbouncer_dsn, "pool": pool}
    with connection(kind, False, **options) as conn:  # in transactions, as psycopg and the pool hand it out
        assert not pgsim.install(conn).changed
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, bucket int, body text)").format(table))
        pgsim.add_embedding(conn, f"docs_{kind}", "embedding", source="body")
        with conn.cursor() as cur:
            cur.executemany(sql.SQL("INSERT INTO {} VALUES (%(id)s, %(bucket)s, %(body)s)").format(table),
                            rows_of(texts, range(SQL_ROWS)))  # fmt: skip
        conn.commit()
        half = SQL_ROWS + INGESTED_ROWS // 2
        assert pgsim.ingest(conn, f"docs_{kind}", rows_of(texts, range(SQL_ROWS, half)), chunk_size=8).rows == 24
        conn.commit()

    def meanwhile(report: pgsim.SyncReport, total: int) -> None:  # between batches, while other clients run
        assert_nothing_left(pgbouncer_dsn)

    with connection(kind, True, **options) as conn:  # pgsim.sync commits each batch: autocommit
        assert pgsim.sync(conn, batch_size=8, progress=meanwhile).embedded == SQL_ROWS  # 12 batches, 12 transactions
        moved = 300  # rows 0-3 get the text of rows 300-303: re-queued by the trigger, embedded again
        for i in range(4):
            conn.execute(sql.SQL("UPDATE {} SET body = %s WHERE id = %s").format(table), [texts[moved + i], i])
        assert pgsim.sync(conn, batch_size=8).embedded == 4
        assert_nothing_left(pgbouncer_dsn)
        rows = rows_of(texts, range(half, SQL_ROWS + INGESTED_ROWS))
        assert pgsim.ingest(conn, f"docs_{kind}", rows, chunk_size=8).rows == 24  # 3 chunks, 6 transactions
        conn.execute(sql.SQL("ANALYZE {}").format(table))
    assert_nothing_left(pgbouncer_dsn)
    truth = stored(database, f"docs_{kind}")
    expected = vectors[: SQL_ROWS + INGESTED_ROWS].copy()
    expected[:4] = vectors[moved : moved + 4]
    assert truth[0].tolist() == list(range(SQL_ROWS + INGESTED_ROWS))
    assert np.abs(truth[2] - expected).max() < 1e-5  # each row holds what the encoder gives for its text

    for autocommit in (True, False):
        with connection(kind, autocommit, **options) as conn:
            if kind != "pool":  # the pool registers each connection it opens (configure=pgsim.register)
                pgsim.register(conn)
            for text, query in queries.items():
                for bucket, tuning, path in ((1, pgsim.Tuning(), "exact"), (1, HNSW, "hnsw"), (None, HNSW, "hnsw")):
                    where = None if bucket is None else {"bucket": bucket}
                    hits, plan = search_with_plan(conn, f"docs_{kind}", "embedding", text, k=K, where=where,
                                                  tuning=tuning)  # fmt: skip
                    assert (plan.path, plan.fell_back) == (path, False)
                    assert_nearest([(h.row["id"], h.distance) for h in hits], truth, query, bucket)
                found = conn.execute(KNN_SQL, [f"docs_{kind}", pgsim.Text(text), K, "bucket = 2"]).fetchall()
                assert_nearest(found, truth, query, 2)
    assert_nothing_left(pgbouncer_dsn)


@pytest.mark.parametrize("autocommit", [True, False])
def test_through_pgbouncer_the_hnsw_settings_hold_in_the_searchs_transaction_only(
    autocommit: bool, database: str, pgbouncer_dsn: str, corpus: Truth, queries: dict[str, Any]
) -> None:
    """Under a filter keeping 1/16 of the rows, pgvector's default scan (ef_search 40, no iterative scan)
    finds about 2 of them: only the settings pgsim.prepare_knn sizes, in force in the transaction the search
    runs in, give k rows without the exact fallback. A filter that reads ef_search, a value each search
    plans afresh, sees it too; and no setting is left on PgBouncer's server connections afterwards. Hundreds
    of searches: psycopg would prepare statements run 5 times, if pgsim let it."""
    with pgsim.connect(pgbouncer_dsn, autocommit=autocommit) as conn:
        assert conn.prepare_threshold is None  # pgsim.connect saw the pooler
        for n, (text, query) in enumerate(queries.items()):
            for bucket in range(CORPUS_BUCKETS):
                hits, plan = search_with_plan(conn, "corpus", "embedding", text, k=K, where={"bucket": bucket},
                                              tuning=HNSW)  # fmt: skip
                assert (plan.path, plan.fell_back) == ("hnsw", False)
                assert_nearest([(h.row["id"], h.distance) for h in hits], corpus, query, bucket)
            ef_search = 50 + n + 20 * autocommit  # another value in each search
            reads_it = sql.SQL("current_setting('hnsw.ef_search')::int = {} AND bucket = 3").format(ef_search)
            hits, plan = search_with_plan(conn, "corpus", "embedding", text, k=K, where=reads_it,
                                          tuning=pgsim.Tuning(0, ef_search, 0))  # fmt: skip
            assert (plan.path, plan.ef_search, plan.fell_back) == ("hnsw", ef_search, False)
            assert_nearest([(h.row["id"], h.distance) for h in hits], corpus, query, 3)
            exact = pgsim.search(conn, "corpus", "embedding", text, k=K, where={"bucket": 5})
            assert_nearest([(h.row["id"], h.distance) for h in exact], corpus, query, 5)
            found = conn.execute(KNN_SQL, ["corpus", pgsim.Text(text), K, "bucket = 7"]).fetchall()
            assert_nearest(found, corpus, query, 7)
        if not autocommit:
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            conn.rollback()
    assert_nothing_left(pgbouncer_dsn)
    with pgsim.connect(database) as direct:
        assert direct.prepare_threshold == 5  # straight to PostgreSQL, psycopg's default stays


def test_the_worker_through_pgbouncer_polls_and_says_why(
    pgbouncer_dsn: str, database: str, installed: None, texts: list[str], vectors: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with pgsim.connect(database) as conn:
        conn.execute("CREATE TABLE worker_docs (id int PRIMARY KEY, bucket int, body text)")
        pgsim.add_embedding(conn, "worker_docs", "embedding", source="body")
        worker = pgsim.Worker(pgbouncer_dsn, table="worker_docs", batch_size=4, poll_interval=0.2)
        with caplog.at_level(logging.WARNING, logger="pgsim.columns.worker"):
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            try:
                with conn.cursor() as cur:
                    cur.executemany("INSERT INTO worker_docs VALUES (%(id)s, %(bucket)s, %(body)s)",
                                    rows_of(texts, range(32)))  # fmt: skip
                deadline = time.monotonic() + 120  # a guard against a hang, not a measure
                while conn.execute("SELECT count(embedding) FROM worker_docs").fetchone() != (32,):
                    assert thread.is_alive() and time.monotonic() < deadline, "the worker did not embed the rows"
                    time.sleep(0.05)
            finally:
                worker.stop.set()
                thread.join(30)
    assert_nothing_left(pgbouncer_dsn)
    assert worker.report.embedded == 32 and worker.report.batches >= 8  # many transactions, no prepared statement
    assert np.abs(stored(database, "worker_docs")[2] - vectors[:32]).max() < 1e-5
    assert [r.getMessage() for r in caplog.records if r.name == "pgsim.columns.worker"] == [LISTEN_LOST % 0.2]


@pytest.mark.parametrize("through", ["direct", "pgbouncer"])
def test_async_connections_search_in_sql_with_text(
    through: str, database: str, pgbouncer_dsn: str, corpus: Truth, queries: dict[str, Any]
) -> None:
    async def run() -> None:
        dsn = database if through == "direct" else pgbouncer_dsn
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
            await pgsim.register_async(conn)
            for text, query in queries.items():
                for bucket in range(0, CORPUS_BUCKETS, 3):
                    cur = await conn.execute(KNN_SQL, ["corpus", pgsim.Text(text), K, f"bucket = {bucket}"])
                    assert_nearest(await cur.fetchall(), corpus, query, bucket)
                async with conn.transaction():  # a query of one's own: its setting in its transaction
                    await conn.execute("SET LOCAL hnsw.ef_search = 400")  # the whole graph: the exact k nearest
                    cur = await conn.execute(
                        "SELECT id, embedding <=> %s FROM corpus ORDER BY embedding <=> %s LIMIT %s",
                        [pgsim.Text(text), pgsim.Text(text), K],
                    )
                    found = await cur.fetchall()
                assert [row_id for row_id, _ in found] == [row_id for row_id, _ in sorted(found, key=lambda r: r[1])]
                assert_nearest(found, corpus, query, None)
            with pytest.raises(pgsim.InvalidInput, match=r"register_async.*pgsim\.knn"):
                pgsim.search(conn, "corpus", "embedding", "parse json")  # type: ignore[arg-type]
            with pytest.raises(pgsim.InvalidInput, match="register_async"):
                pgsim.register(conn)  # type: ignore[arg-type]

    asyncio.run(run())
