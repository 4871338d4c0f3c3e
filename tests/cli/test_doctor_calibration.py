"""pgsim doctor: the index a filter lacks (--where, --filter) and the stored calibration curve (--calibration),
fresh or stale; index-advise reading that curve. Run as a user runs them (a subprocess); the curve is a row
inserted by hand, as the table's owner, in the shape pgsim calibrate stores."""

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

import psycopg
import pytest

from pgsim.cli.main import main
from pgsim.db.schema import install
from pgsim.knn.advice import advise
from pgsim.knn.planner import Tuning

ROWS = 4000
HNSW_FROM_ONE_ROW = Tuning(exact_below_rows=0, min_hnsw_selectivity=0)


def pgsim(dsn: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The command in-process (the first test runs it as a subprocess too), as a CompletedProcess."""
    out, err, given = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["--dsn", dsn, *args])
    finally:
        sys.stdin = given
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def as_user(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PGSIM_DSN", None)
    command = [sys.executable, "-m", "pgsim.cli", "--dsn", dsn, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def items(database: str) -> str:
    """4,000 rows, section with 100 values (1 % each), an 8-d embedding with an HNSW index; no other index."""
    with psycopg.connect(database, autocommit=True) as conn:
        install(conn)
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, section text, embedding vector(8))")
        conn.execute(
            "INSERT INTO items SELECT i, 's' || (i %% 100), "
            "(SELECT array_agg(random())::real[] FROM generate_series(1, 8) WHERE i > 0)::vector "
            "FROM generate_series(1, %s) AS i",
            [ROWS],
        )
        conn.execute("CREATE INDEX items_embedding_hnsw ON items USING hnsw (embedding vector_cosine_ops)")
        conn.execute("ANALYZE items")
    return database


def calibrate_by_hand(conn: psycopg.Connection[Any], levels: list[dict[str, Any]]) -> None:
    """A 'knn' row as pgsim calibrate writes it: the current index, rows and write counters."""
    measured = {"k": 10, "queries": 20, "ef_search": [20, 40, 64, 100], "levels": levels}
    conn.execute(
        """
        INSERT INTO pgsim.calibration (table_oid, column_attnum, kind, index_oid, measured, rows_measured,
            changes_measured, seconds)
        SELECT 'items'::regclass, 3, 'knn', 'items_embedding_hnsw'::regclass, %s::jsonb,
               (SELECT reltuples FROM pg_class WHERE oid = 'items'::regclass),
               (SELECT n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_all_tables WHERE relid = 'items'::regclass), 4.2
        ON CONFLICT (table_oid, column_attnum, kind) DO UPDATE SET measured = excluded.measured,
            index_oid = excluded.index_oid, rows_measured = excluded.rows_measured,
            changes_measured = excluded.changes_measured
        """,
        [json.dumps(measured)],
    )


UNFILTERED = {
    "selectivity": 1.0,
    "filter": None,
    "rows": ROWS,
    "exact_ms": 35.2,
    "recall": [0.91, 0.95, 0.992, 1.0],
    "hnsw_ms": [1.1, 1.4, 2.0, 3.1],
}
TEN_PERCENT = {
    "selectivity": 0.1,
    "filter": "section IN ('s1', 's2')",
    "rows": 400,
    "exact_ms": 9.5,
    "recall": [0.71, 0.84, 0.93],  # shorter: the last ef_search was not reached in time
    "hnsw_ms": [2.5, 3.0, 4.4],
}
ONE_PERCENT = {"selectivity": 0.01, "filter": "section = 's3'", "rows": 40, "exact_ms": 8.0, "recall": [0.995]}


def test_doctor_names_the_missing_index_until_it_exists(items: str) -> None:
    create = (
        'CREATE INDEX CONCURRENTLY IF NOT EXISTS "items_section_btree" ON "public"."items" USING btree ("section");'
    )
    for run, option in ((as_user, ["--where", "section = 's7'"]), (pgsim, ["--filter", "section=s7"])):
        doctor = run(items, "doctor", "--table", "items", *option)
        assert doctor.returncode == 0, doctor.stderr
        assert "section (text): no btree index" in doctor.stdout and create in doctor.stdout
        assert f"of {ROWS} rows of public.items pass the filter" in doctor.stdout
    with psycopg.connect(items, autocommit=True) as conn:
        conn.execute(create)
        conn.execute("ANALYZE items")
    doctor = pgsim(items, "doctor", "--table", "items", "--where", "section = 's7'")
    assert doctor.returncode == 0, doctor.stderr
    assert "none missing" in doctor.stdout and "CREATE INDEX" not in doctor.stdout
    with psycopg.connect(items, autocommit=True) as conn:
        conn.execute("DROP INDEX items_section_btree")
        conn.execute("ANALYZE items")
    by_statistics = pgsim(items, "doctor", "--table", "items")  # no filter: the columns the statistics suggest
    assert by_statistics.returncode == 0, by_statistics.stderr
    assert "items.embedding: filter columns by the planner's statistics: section" in by_statistics.stdout
    assert f"section (text): no btree index: a search filtering on it reads all {ROWS} rows" in by_statistics.stdout
    assert create in by_statistics.stdout
    hostile = pgsim(items, "doctor", "--table", "items", "--where", "true); DROP TABLE items; SELECT (1")
    assert hostile.returncode == 2 and "The filter is not valid here" in hostile.stderr  # one statement, an error
    with psycopg.connect(items) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (ROWS,)


def test_calibration_printed_then_stale_after_a_bulk_delete(items: str) -> None:
    none = pgsim(items, "doctor", "--calibration", "items", "embedding")
    assert none.returncode == 0, none.stderr
    assert none.stdout.strip() == "not calibrated: run pgsim calibrate items embedding"
    with psycopg.connect(items, autocommit=True) as conn:
        calibrate_by_hand(conn, [UNFILTERED, TEN_PERCENT])
        (user,) = conn.execute("SELECT current_user").fetchone()  # type: ignore[misc]
    shown = pgsim(items, "doctor", "--calibration", "items", "embedding")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("calibration of public.items.embedding: measured ")
    assert f"by {user} in 4.2 s on {ROWS} rows, index items_embedding_hnsw; k 10, 20 queries" in lines[0]
    assert lines[1].startswith(f"fresh: about {ROWS} rows now")
    header = next(line for line in lines if line.startswith("selectivity"))
    assert header.split() == [
        "selectivity",
        "rows",
        "exact",
        "ms",
        "ef",
        "20",
        "ef",
        "40",
        "ef",
        "64",
        "ef",
        "100",
        "filter",
    ]
    full = next(line for line in lines if line.startswith("100.0%"))
    assert "35.2" in full and "0.910 / 1.1 ms" in full and "0.992 / 2.0 ms" in full and "1.000 / 3.1 ms" in full
    ten = next(line for line in lines if line.startswith("10.0%"))
    assert "0.930 / 4.4 ms" in ten and "section IN ('s1', 's2')" in ten
    assert "reaches recall 0.99 faster than the exact scan unfiltered only" in shown.stdout  # 10 % never does
    assert "STALE" not in shown.stdout
    # the same from --table/--column
    same = pgsim(items, "doctor", "--table", "items", "--column", "embedding", "--calibration")
    assert same.returncode == 0 and same.stdout == shown.stdout
    with psycopg.connect(items, autocommit=True) as conn:
        conn.execute("DELETE FROM items WHERE id % 2 = 0")
        conn.execute("ANALYZE items")
    stale = pgsim(items, "doctor", "--calibration", "items", "embedding")
    assert stale.returncode == 0, stale.stderr
    assert "STALE, not trusted: the table has about 2000 rows now against 4000 when measured" in stale.stdout
    assert "Run pgsim calibrate public.items embedding" in stale.stdout
    assert "reaches recall 0.99" not in stale.stdout  # a stale curve vouches for nothing


def test_calibration_of_a_replaced_index_is_stale(items: str) -> None:
    with psycopg.connect(items, autocommit=True) as conn:
        calibrate_by_hand(conn, [UNFILTERED])
        assert "fresh:" in pgsim(items, "doctor", "--calibration", "items", "embedding").stdout
        conn.execute("DROP INDEX items_embedding_hnsw")
        conn.execute("CREATE INDEX items_embedding_hnsw2 ON items USING hnsw (embedding vector_cosine_ops)")
    stale = pgsim(items, "doctor", "--calibration", "items", "embedding")
    assert "index (dropped)" in stale.stdout
    assert "STALE, not trusted: it measured an index that no longer exists, and the column's HNSW index is now " in (
        stale.stdout
    )
    with psycopg.connect(items, autocommit=True) as conn:
        conn.execute("ALTER INDEX items_embedding_hnsw2 RENAME TO items_embedding_hnsw")


def test_index_advise_skips_filters_the_calibrated_full_index_serves(items: str) -> None:
    workload = [{"section": "s3"}] * 4
    with psycopg.connect(items, autocommit=True) as conn:
        conn.execute("DELETE FROM pgsim.calibration")
        before = advise(conn, "items", "embedding", workload, tuning=HNSW_FROM_ONE_ROW)
        assert [(a.column, a.value) for a in before] == [("section", "s3")]
        calibrate_by_hand(conn, [UNFILTERED, TEN_PERCENT])  # 1 % is narrower than any level that reaches 0.99
        assert len(advise(conn, "items", "embedding", workload, tuning=HNSW_FROM_ONE_ROW)) == 1
        served = {**TEN_PERCENT, "recall": [0.96, 0.99, 1.0]}
        calibrate_by_hand(conn, [UNFILTERED, served, ONE_PERCENT])
        assert advise(conn, "items", "embedding", workload, tuning=HNSW_FROM_ONE_ROW) == []
        assert len(advise(conn, "items", "embedding", workload, tuning=HNSW_FROM_ONE_ROW, recall=0.999)) == 1
        slow = {**ONE_PERCENT, "hnsw_ms": [9.0]}  # reaches the target, but slower than the exact scan there
        calibrate_by_hand(conn, [UNFILTERED, served, slow])
        assert len(advise(conn, "items", "embedding", workload, tuning=HNSW_FROM_ONE_ROW)) == 1
        calibrate_by_hand(conn, [UNFILTERED, served, ONE_PERCENT])
    advised = pgsim(items, "index-advise", "--table", "items", "--workload", "-", stdin='{"section": "s3"}\n' * 4)
    assert advised.returncode == 0, advised.stderr
    assert "calibrated: the full index reaches recall 0.99 for filters keeping 1.00% of the rows or more" in (
        advised.stdout
    )
    with psycopg.connect(items, autocommit=True) as conn:
        conn.execute("UPDATE pgsim.calibration SET rows_measured = rows_measured * 3")  # stale: not trusted
        assert len(advise(conn, "items", "embedding", workload, tuning=HNSW_FROM_ONE_ROW)) == 1
