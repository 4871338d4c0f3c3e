"""Per-index calibration (pgsim.calibrate): measured on the table's own rows, stored whole or not at all, and
followed by the planner from Python and from SQL while it describes the table."""

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.database import installed_without_registrations
from psycopg import sql

from pgsim import InvalidInput
from pgsim.knn.filtered import search, search_with_plan
from pgsim.knn.planner import plan
from pgsim.quality.index_calibration import calibrate

ROWS = 6000
DIMENSION = 16
KINDS = ("a", "b", "c", "d")  # shares of the rows: 60 %, 25 %, 10 %, 5 %


def vectors(count: int, seed: int) -> np.ndarray[Any, Any]:
    """Clustered unit vectors: the shape of embeddings, small enough to index in a second."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, DIMENSION))
    points = centres[rng.integers(0, 40, count)] + 0.35 * rng.normal(size=(count, DIMENSION))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def fill(conn: psycopg.Connection[Any], table: str, count: int, *, index: bool = True, seed: int = 1) -> None:
    name = sql.Identifier(table)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(name))
    conn.execute(
        sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, kind text, embedding vector({}))").format(
            name, sql.Literal(DIMENSION)
        )
    )
    rng = np.random.default_rng(seed)
    kinds = rng.choice(KINDS, size=count, p=[0.6, 0.25, 0.1, 0.05])
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} (id, kind, embedding) FROM STDIN").format(name)) as copy:
        for i, (kind, vector) in enumerate(zip(kinds, vectors(count, seed), strict=True)):
            copy.write_row([i, kind, "[" + ",".join(f"{x:.6f}" for x in vector) + "]"])
    if index:
        conn.execute(sql.SQL("CREATE INDEX ON {} USING hnsw (embedding vector_cosine_ops)").format(name))


@pytest.fixture(scope="module")
def calibrated(database: str) -> Iterator[str]:
    """Table ``items``, calibrated once for the module."""
    with psycopg.connect(database, autocommit=True) as conn:
        installed_without_registrations(conn)
        fill(conn, "items", ROWS)
        result = calibrate(conn, "items", "embedding", seconds=60, queries=10)
        assert result.stored, result.reason
        kinds = conn.execute("SELECT kind FROM pgsim.calibration WHERE table_oid = 'items'::regclass ORDER BY 1")
        assert kinds.fetchall() == [("knn",), ("relevance",)]  # no tsvector column: no hybrid fusion
    yield database


@pytest.fixture
def conn(calibrated: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(calibrated, autocommit=True) as connection:
        yield connection


def stored_curve(conn: psycopg.Connection[Any], table: str = "items") -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT measured FROM pgsim.calibration WHERE table_oid = %s::regclass AND kind = 'knn'", [table]
    ).fetchone()
    return row[0] if row else None


def expected_choice(curve: dict[str, Any], selectivity: float, recall: float) -> tuple[str, int | None]:
    """The rule the planner must follow, read off the stored curve: the level next below the selectivity,
    (or at most a tenth above it), its smallest ef_search that reached the recall, when that walk was 1.25x
    faster than the exact scan."""
    below = [level for level in curve["levels"] if level["selectivity"] <= selectivity * 1.1]
    if not below:
        return "thresholds", None
    level = max(below, key=lambda level: level["selectivity"])
    unfiltered = next(level for level in curve["levels"] if level["selectivity"] == 1.0)
    exact_ms = min(level["exact_ms"], 3 * selectivity * unfiltered["exact_ms"])
    for position, measured in enumerate(level["recall"]):
        if measured >= recall:
            if 1.25 * level["hnsw_ms"][position] >= exact_ms:
                return "exact", None
            return "hnsw", curve["ef_search"][position]
    return "exact", None


def test_the_curve_covers_the_grid_and_is_monotone_enough_to_plan_with(conn: psycopg.Connection[Any]) -> None:
    curve = stored_curve(conn)
    assert curve is not None and curve["k"] == 10 and curve["queries"] == 10
    levels = curve["levels"]
    assert levels[0]["selectivity"] == 1.0 and levels[0]["filter"] is None
    assert [level["selectivity"] for level in levels] == sorted(
        (level["selectivity"] for level in levels), reverse=True
    )
    for level in levels:
        assert 0 < len(level["recall"]) == len(level["hnsw_ms"]) <= len(curve["ef_search"])
        assert all(0 <= r <= 1 for r in level["recall"]) and level["exact_ms"] > 0
        # counted on the table, not estimated: a filtered level's rows match its selectivity
        assert level["rows"] == pytest.approx(level["selectivity"] * ROWS, rel=0.5)
    # the filtered levels use the table's own column where one has a value that common
    assert any("kind" in (level["filter"] or "") for level in levels)


@pytest.mark.parametrize("where", [None, {"kind": "a"}, {"kind": "b"}, {"kind": "c"}])
@pytest.mark.parametrize("recall", [0.9, 0.99, 1.0])
def test_the_planner_follows_the_curve(conn: psycopg.Connection[Any], where: Any, recall: float) -> None:
    curve = stored_curve(conn)
    assert curve is not None
    chosen = plan(conn, "items", "embedding", k=10, where=where, recall=recall)
    if chosen.estimated_rows <= 1000:
        assert chosen.path == "exact" and chosen.expected_recall == 1
        return
    path, ef_search = expected_choice(curve, chosen.selectivity or 0, recall)
    if path == "thresholds":  # below every level measured: the uncalibrated rules decide
        assert not chosen.reason.startswith("calibrated")
        return
    assert (chosen.path, chosen.ef_search) == (path, ef_search), chosen.reason
    if path == "hnsw":
        assert chosen.expected_recall is not None and chosen.expected_recall >= recall
        assert chosen.reason.startswith("calibrated")
    else:
        assert chosen.expected_recall == 1


def test_searches_keep_k_rows_and_the_recall_they_were_promised(conn: psycopg.Connection[Any]) -> None:
    queries = vectors(ROWS + 30, seed=1)[ROWS:]  # new points of the same clusters
    table = np.array(
        [
            np.array(v.strip("[]").split(","), dtype=np.float32)
            for (v,) in conn.execute("SELECT embedding::text FROM items ORDER BY id")
        ]
    )
    kinds = [kind for (kind,) in conn.execute("SELECT kind FROM items ORDER BY id")]
    for where in (None, {"kind": "a"}, {"kind": "b"}):
        found = 0
        promised = []
        for query in queries:
            hits, chosen = search_with_plan(
                conn, "items", "embedding", query.tolist(), k=10, where=where, columns=["id"]
            )
            assert len(hits) == 10
            allowed = np.array([where is None or kind == where["kind"] for kind in kinds])
            distances = 1 - table @ query / np.linalg.norm(table, axis=1)
            distances[~allowed] = np.inf
            kth = np.sort(distances)[9]
            found += sum(1 for hit in hits if hit.distance <= kth + 1e-5)
            promised.append(chosen.expected_recall)
        # measured on other queries of the same table: allow the sampling error of 30 queries
        assert found / (10 * len(queries)) >= min(promised) - 0.05


def test_sql_knn_takes_a_recall_target(conn: psycopg.Connection[Any]) -> None:
    query = "[" + ",".join(f"{x:.6f}" for x in vectors(1, seed=7)[0]) + "]"
    for recall in (0.5, 1.0):
        rows = conn.execute(
            "SELECT count(*) FROM pgsim.knn('items', 'embedding', %s::vector, 10, $$kind = 'a'$$, recall => %s)",
            [query, recall],
        ).fetchone()
        assert rows == (10,)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="recall"):
        conn.execute("SELECT * FROM pgsim.knn('items', 'embedding', %s::vector, 10, recall => 0)", [query])


def test_bad_recall_targets_are_clear_errors(conn: psycopg.Connection[Any]) -> None:
    for bad in (0, -1, 1.5, True, "high"):
        with pytest.raises(InvalidInput, match="recall"):
            search(conn, "items", "embedding", [1.0] * DIMENSION, recall=bad)  # type: ignore[arg-type]


def test_bad_budgets_and_tables_are_clear_errors(conn: psycopg.Connection[Any]) -> None:
    for budget in (0, -5, float("nan"), True):
        with pytest.raises(InvalidInput, match="time budget"):
            calibrate(conn, "items", "embedding", seconds=budget)
    fill(conn, "unindexed", 50, index=False)
    with pytest.raises(InvalidInput, match="no valid HNSW index"):
        calibrate(conn, "unindexed", "embedding")
    with pytest.raises(InvalidInput, match="no column"):
        calibrate(conn, "items", "missing")
    with pytest.raises(InvalidInput, match="not a pgvector"):
        calibrate(conn, "items", "kind")
    with pytest.raises(InvalidInput, match="dimensions"):
        calibrate(conn, "items", "embedding", queries=[[1.0, 2.0]])


@pytest.mark.parametrize("rows", [0, 5])
def test_a_table_too_small_stores_nothing_and_keeps_the_defaults(conn: psycopg.Connection[Any], rows: int) -> None:
    fill(conn, "small", rows)
    result = calibrate(conn, "small", "embedding", seconds=5)
    assert not result.stored and "defaults stand" in result.reason
    assert stored_curve(conn, "small") is None
    assert not plan(conn, "small", "embedding", k=10).reason.startswith("calibrated")


def test_rows_without_an_embedding_are_not_measured(conn: psycopg.Connection[Any]) -> None:
    fill(conn, "partly", 4000, seed=3)
    conn.execute("UPDATE partly SET embedding = NULL WHERE id % 2 = 0")
    result = calibrate(conn, "partly", "embedding", seconds=30, queries=5)
    assert result.stored and result.rows == 2000
    assert all(level["rows"] <= 2000 for level in stored_curve(conn, "partly")["levels"])  # type: ignore[index]
    result_small = calibrate(conn, "partly", "embedding", seconds=30, queries=5)
    assert result_small.rows == 2000


def test_an_interrupted_calibration_leaves_the_previous_curve(conn: psycopg.Connection[Any]) -> None:
    fill(conn, "interrupted", 3000, seed=4)
    calibrate(conn, "interrupted", "embedding", seconds=30, queries=5)
    before = conn.execute(
        "SELECT measured, measured_at FROM pgsim.calibration WHERE table_oid = 'interrupted'::regclass AND kind = 'knn'"
    ).fetchall()

    def stop(fraction: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(conn, "interrupted", "embedding", seconds=30, queries=6, progress=stop)
    after = conn.execute(
        "SELECT measured, measured_at FROM pgsim.calibration WHERE table_oid = 'interrupted'::regclass AND kind = 'knn'"
    ).fetchall()
    assert after == before and len(after) == 1
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_a_bulk_delete_makes_the_curve_stale_and_untrusted(conn: psycopg.Connection[Any]) -> None:
    fill(conn, "shrinking", 5000, seed=5)
    calibrate(conn, "shrinking", "embedding", seconds=30, queries=5)
    assert plan(conn, "shrinking", "embedding", k=10).reason.startswith("calibrated")
    conn.execute("DELETE FROM shrinking WHERE id % 2 = 0")
    conn.execute("ANALYZE shrinking")
    assert stored_curve(conn, "shrinking") is not None  # still there, for pgsim doctor to show
    stale = conn.execute(
        "SELECT pgsim.knn_calibration('shrinking'::regclass, 3::smallint, i.indexrelid::regclass) "
        "FROM pg_index i WHERE i.indrelid = 'shrinking'::regclass"
    ).fetchone()
    assert stale == (None,)
    assert not plan(conn, "shrinking", "embedding", k=10).reason.startswith("calibrated")
    calibrate(conn, "shrinking", "embedding", seconds=30, queries=5)  # measured again: trusted again
    assert plan(conn, "shrinking", "embedding", k=10).reason.startswith("calibrated")


def test_a_rebuilt_index_is_not_the_one_measured(conn: psycopg.Connection[Any]) -> None:
    fill(conn, "rebuilt", 3000, seed=6)
    calibrate(conn, "rebuilt", "embedding", seconds=30, queries=5)
    assert plan(conn, "rebuilt", "embedding", k=10).reason.startswith("calibrated")
    conn.execute("DROP INDEX rebuilt_embedding_idx")
    conn.execute("CREATE INDEX ON rebuilt USING hnsw (embedding vector_cosine_ops) WITH (m = 4)")
    assert not plan(conn, "rebuilt", "embedding", k=10).reason.startswith("calibrated")


def test_only_the_owner_calibrates(conn: psycopg.Connection[Any]) -> None:
    conn.execute("DROP ROLE IF EXISTS calibration_stranger")
    conn.execute("CREATE ROLE calibration_stranger")
    conn.execute("GRANT USAGE ON SCHEMA pgsim TO calibration_stranger")
    conn.execute("GRANT SELECT ON items TO calibration_stranger")
    conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON pgsim.calibration TO calibration_stranger")
    try:
        conn.execute("SET ROLE calibration_stranger")
        with pytest.raises(InvalidInput, match="Only the owner"):
            calibrate(conn, "items", "embedding", seconds=5)
        # nor around pgsim.calibrate: the table's row-level security keeps the curve the owner's
        assert stored_curve(conn) is not None  # it may read what it may search
        changed = conn.execute("UPDATE pgsim.calibration SET measured = '{}' WHERE table_oid = 'items'::regclass")
        assert changed.rowcount == 0
        assert conn.execute("DELETE FROM pgsim.calibration").rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute(
                "INSERT INTO pgsim.calibration (table_oid, column_attnum, kind, measured, rows_measured, seconds) "
                "VALUES ('items'::regclass, 3, 'relevance', '{}', 1, 1)"
            )
        conn.execute("RESET ROLE")
        assert stored_curve(conn) is not None
    finally:
        conn.execute("RESET ROLE")
        conn.execute("REVOKE ALL ON pgsim.calibration FROM calibration_stranger")
        conn.execute("REVOKE ALL ON items FROM calibration_stranger")
        conn.execute("REVOKE ALL ON SCHEMA pgsim FROM calibration_stranger")
        conn.execute("DROP ROLE calibration_stranger")


def test_injection_shaped_names_are_only_names(conn: psycopg.Connection[Any]) -> None:
    table = 'we"ird; DROP TABLE items; --%s'
    fill(conn, table, 2500, seed=8)
    conn.execute(
        sql.SQL("ALTER TABLE {} RENAME COLUMN kind TO {}").format(sql.Identifier(table), sql.Identifier("k%(q)s'"))
    )
    result = calibrate(conn, table, "embedding", seconds=30, queries=5)
    assert result.stored
    assert conn.execute("SELECT count(*) FROM items").fetchone() == (ROWS,)


def test_the_command_line_calibrates_and_prints_the_curve(
    calibrated: str, conn: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    from pgsim.cli.main import main

    fill(conn, "from_the_shell", 2500, seed=9)
    assert (
        main(["calibrate", "from_the_shell", "embedding", "--seconds", "30", "--queries", "5", "--dsn", calibrated])
        == 0
    )
    out = capsys.readouterr()
    curve = stored_curve(conn, "from_the_shell")
    assert curve is not None
    assert "100.0%" in out.out and f"ef {curve['ef_search'][0]}" in out.out
    assert "calibrating from_the_shell.embedding" in out.err
    assert "relevance threshold (relevant_search's min_score by reference row): " in out.out
    assert main(["calibrate", "from_the_shell", "embedding", "--seconds", "0", "--dsn", calibrated]) == 2
    assert "time budget" in capsys.readouterr().err
    log = tmp_path / "queries.txt"
    log.write_text("first query\n\nsecond query\n")
    assert main(["calibrate", "from_the_shell", "embedding", "--query-log", str(log), "--dsn", calibrated]) == 2
    assert "not a registered embedding column: its model is unknown" in capsys.readouterr().err


def test_a_drain_measures_a_missing_or_stale_curve_again_as_the_owner_only(conn: psycopg.Connection[Any]) -> None:
    from pgsim.columns.recalibration import recalibrate_if_stale
    from pgsim.columns.registry import Registration

    fill(conn, "drained", 3000, seed=10)
    conn.execute("ANALYZE drained")
    (oid,) = conn.execute("SELECT 'drained'::regclass::oid").fetchone()  # type: ignore[misc]
    # what the worker knows of the column: no row of pgsim.queue names this id
    registration = Registration(
        -1, "public", "drained", "embedding", "kind", ("kind",), ("id",), "m", "r", DIMENSION, "vector", None, None,
        False, None, oid,
    )  # fmt: skip
    assert recalibrate_if_stale(conn, registration) is not None  # missing: measured
    assert stored_curve(conn, "drained") is not None
    assert recalibrate_if_stale(conn, registration) is None  # fresh: left alone
    conn.execute("INSERT INTO drained SELECT id + 3000, kind, embedding FROM drained")
    conn.execute("ANALYZE drained")
    conn.execute("DROP ROLE IF EXISTS drain_stranger")
    conn.execute("CREATE ROLE drain_stranger")
    conn.execute("GRANT USAGE ON SCHEMA pgsim TO drain_stranger")
    conn.execute("GRANT SELECT ON pgsim.calibration, pgsim.queue TO drain_stranger")
    try:
        conn.execute("SET ROLE drain_stranger")
        assert recalibrate_if_stale(conn, registration) is None  # stale, but not this role's to measure
        conn.execute("RESET ROLE")
    finally:
        conn.execute("RESET ROLE")
        conn.execute("REVOKE ALL ON pgsim.calibration, pgsim.queue FROM drain_stranger")
        conn.execute("REVOKE ALL ON SCHEMA pgsim FROM drain_stranger")
        conn.execute("DROP ROLE drain_stranger")
    assert recalibrate_if_stale(conn, registration) is not None  # stale: the owner measures it again
    assert stored_curve(conn, "drained")["levels"][0]["rows"] == 6000  # type: ignore[index]


def test_a_long_index_build_says_what_it_is_doing_and_a_short_one_says_nothing(
    conn: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgsim.db import hnsw

    fill(conn, "announced", 3000, index=False, seed=11)
    conn.execute("ANALYZE announced")
    hnsw.create_hnsw_index(conn, "announced", "embedding", "announced_quick", hnsw.HNSW())
    assert "building HNSW index" not in capsys.readouterr().err  # 3,000 rows of 16 dimensions: a moment
    monkeypatch.setattr(hnsw, "BUILD_ROWS_PER_SECOND", 10)  # a machine where it would take minutes
    hnsw.create_hnsw_index(conn, "announced", "embedding", "announced_slow", hnsw.HNSW())
    said = capsys.readouterr().err
    assert "building HNSW index announced_slow on 3,000 rows (usually about 156 s" in said


def test_a_workloads_filters_are_measured_as_levels_of_their_own(conn: psycopg.Connection[Any]) -> None:
    fill(conn, "workload", 4000, seed=12)
    result = calibrate(
        conn, "workload", "embedding", seconds=30, queries=5, filters=["kind IN ('a', 'c')", "id < 1500"]
    )
    mine = {level.filters: level for level in result.levels}
    assert (
        mine[("kind IN ('a', 'c')",)].rows
        == conn.execute("SELECT count(*) FROM workload WHERE kind IN ('a', 'c')").fetchone()[0]
    )  # type: ignore[index]
    assert mine[("id < 1500",)].rows == 1500 and mine[("id < 1500",)].selectivity == pytest.approx(1500 / 4000)
    for bad in ("no_such_column = 1", "", "1 = 1; DROP TABLE items"):
        with pytest.raises(InvalidInput, match="workload filter"):
            calibrate(conn, "workload", "embedding", seconds=5, filters=[bad])
    assert conn.execute("SELECT count(*) FROM items").fetchone() == (ROWS,)


def test_a_query_log_is_encoded_with_the_columns_model_and_measured(
    conn: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from pgsim import add_embedding

    with pytest.raises(InvalidInput, match="not a registered embedding column"):
        calibrate(conn, "items", "embedding", queries=["a query in words"])  # whose model? unknown
    with pytest.raises(InvalidInput, match="none of them empty"):
        calibrate(conn, "items", "embedding", queries=["fine", " "])
    conn.execute("DROP TABLE IF EXISTS logged")
    conn.execute("CREATE TABLE logged (id int PRIMARY KEY, body text)")
    conn.execute("INSERT INTO logged SELECT i, 'note number ' || i FROM generate_series(1, 3) i")
    add_embedding(conn, "logged", "embedding", source="body")
    result = calibrate(conn, "logged", "embedding", queries=["a note", "another note"], relevance=False)
    assert "encoding 2 logged queries with all-MiniLM-L6-v2" in capsys.readouterr().err
    assert not result.stored and "fewer than 2000" in result.reason  # three rows: the defaults stand


def test_a_columns_query_bank_is_what_it_measures_with(conn: psycopg.Connection[Any]) -> None:
    fill(conn, "banked", 2500, seed=12)
    sampled = calibrate(conn, "banked", "embedding", seconds=30, queries=12, relevance=False)
    assert sampled.stored and sampled.queries == 12  # no bank: rows moved towards rows
    bank = vectors(2500 + 30, seed=12)[2500:]  # new points of the table's clusters: its typical queries
    conn.execute(
        "INSERT INTO pgsim.query_bank (table_schema, table_name, column_name, embedding) "
        "SELECT 'public', 'banked', 'embedding', v::vector FROM unnest(%s::text[]) AS v",
        [["[" + ",".join(f"{x:.6f}" for x in vector) + "]" for vector in bank] + ["[1,0,0]"]],
    )  # and one left from a model of 3 dimensions: it does not fit, and is left out
    try:
        banked = calibrate(conn, "banked", "embedding", seconds=30, queries=12, relevance=False)
        assert banked.stored and banked.queries == 10  # the bank's 30, every third: at most 12, evenly
        given = calibrate(conn, "banked", "embedding", seconds=30, queries=bank[:7], relevance=False)
        assert given.queries == 7  # vectors given win over the bank
    finally:
        conn.execute("DELETE FROM pgsim.query_bank WHERE table_name = 'banked'")


def test_a_worker_asked_to_stop_drops_its_measurement_and_stores_nothing(conn: psycopg.Connection[Any]) -> None:
    import threading

    from pgsim.columns.recalibration import recalibrate_if_stale
    from pgsim.columns.registry import Registration

    fill(conn, "stopping", 3000, seed=13)
    conn.execute("ANALYZE stopping")
    (oid,) = conn.execute("SELECT 'stopping'::regclass::oid").fetchone()  # type: ignore[misc]
    registration = Registration(
        -1, "public", "stopping", "embedding", "kind", ("kind",), ("id",), "m", "r", DIMENSION, "vector", None, None,
        False, None, oid,
    )  # fmt: skip
    stop = threading.Event()
    stop.set()  # as Ctrl-C on `pgsim worker` sets it, here before the first level ends
    assert recalibrate_if_stale(conn, registration, stop) is None
    assert stored_curve(conn, "stopping") is None  # the levels measured were dropped, not stored
