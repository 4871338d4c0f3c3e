"""Calibration in a shared database: another role's operators in public never run inside a calibration, the
planner's reading of a curve or a drain's recalibration (even as a superuser); a superuser does not measure
another role's table or view; a workload filter is one condition, never a statement list; a calibration
leaves the caller's session as it found it; a malformed or partial curve never costs a search its rows."""

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.database import installed_without_registrations
from psycopg import sql

from pgsim import InvalidInput
from pgsim.columns.recalibration import recalibrate_if_stale
from pgsim.columns.registry import Registration
from pgsim.knn.filtered import search
from pgsim.knn.planner import plan
from pgsim.quality.index_calibration import calibrate

DIMENSION = 8
# Operators for the argument types pgsim's statements pass where pg_catalog has no exact match: under a
# search_path with public, an exact match there would win.
OPERATORS = [
    (">=", "real", "smallint", "boolean"),
    (">=", "real", "integer", "boolean"),
    (">=", "real", "bigint", "boolean"),
    ("=", "oid", "smallint", "boolean"),
    ("=", "oid", "integer", "boolean"),
    ("=", "oid", "bigint", "boolean"),
    ("*", "double precision", "numeric", "double precision"),
    ("*", "double precision", "integer", "double precision"),
    ("/", "integer", "double precision", "double precision"),
    (">", "double precision", "integer", "boolean"),
    ("<=", "double precision", "numeric", "boolean"),
]


def fill(conn: psycopg.Connection[Any], table: str, rows: int) -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, DIMENSION))
    points = centres[rng.integers(0, 20, rows)] + 0.3 * rng.normal(size=(rows, DIMENSION))
    conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, kind text, embedding vector({}))").format(
        sql.Identifier(table), sql.Literal(DIMENSION)))  # fmt: skip
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} FROM STDIN").format(sql.Identifier(table))) as copy:
        for i, point in enumerate(points):
            copy.write_row([i, "ab"[i % 2], "[" + ",".join(f"{x:.5f}" for x in point) + "]"])
    conn.execute(sql.SQL("CREATE INDEX ON {} USING hnsw (embedding vector_cosine_ops)").format(sql.Identifier(table)))


@pytest.fixture(scope="module")
def planted(database: str) -> Iterator[str]:
    """Tables ``measured`` (3,000 rows) and ``tenant_items`` (a tenant's, with an index expression that
    logs who runs it, and a view on it), and an attacker's operators in public that log when they run."""
    with psycopg.connect(database, autocommit=True) as conn:
        installed_without_registrations(conn)
        fill(conn, "measured", 3000)
        conn.execute("DROP ROLE IF EXISTS calib_attacker")
        conn.execute("CREATE ROLE calib_attacker")
        conn.execute("GRANT CREATE, USAGE ON SCHEMA public TO calib_attacker")
        conn.execute("CREATE TABLE public.ran (what text, who text)")
        conn.execute("GRANT INSERT ON public.ran TO PUBLIC")
        conn.execute("SET ROLE calib_attacker")
        for number, (op, left, right, returns) in enumerate(OPERATORS):
            function = f"public.shadow_{number}"
            body = f"SELECT a::text::double precision {op} b::text::double precision"
            log = f"INSERT INTO public.ran VALUES ('{op}({left},{right})', current_user)"  # noqa: S608
            conn.execute(
                f"CREATE FUNCTION {function}(a {left}, b {right}) RETURNS {returns} LANGUAGE sql "  # noqa: S608
                f"SET search_path = pg_catalog AS $$ {log}; {body} $$"
            )
            conn.execute(f"CREATE OPERATOR public.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = {function})")
        fill(conn, "tenant_items", 2500)
        conn.execute("CREATE FUNCTION public.tenant_code(x int) RETURNS int LANGUAGE sql IMMUTABLE AS $$ SELECT x $$")
        conn.execute("CREATE INDEX ON tenant_items (public.tenant_code(id))")
        conn.execute("CREATE VIEW tenant_view AS SELECT * FROM tenant_items")
        conn.execute("RESET ROLE")
        yield database
        conn.execute("DROP OWNED BY calib_attacker CASCADE")
        conn.execute("DROP ROLE calib_attacker")


@pytest.fixture
def conn(planted: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(planted, autocommit=True) as connection:
        connection.execute('SET search_path = "$user", public')  # the default: public, where the shadows are
        yield connection


def ran(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return conn.execute("SELECT DISTINCT what, who FROM public.ran ORDER BY 1").fetchall()


def test_no_shadow_runs_in_calibration_planning_or_a_drains_recalibration(conn: psycopg.Connection[Any]) -> None:
    assert calibrate(conn, "measured", "embedding", seconds=20, queries=5).stored
    for where in (None, {"kind": "a"}):
        for k in (5, 10, 40):
            chosen = plan(conn, "measured", "embedding", k=k, where=where)
            assert chosen.path in ("hnsw", "exact")
            assert len(search(conn, "measured", "embedding", [1.0] * DIMENSION, k=k, where=where)) == k
    (oid,) = conn.execute("SELECT 'measured'::regclass::oid").fetchone()  # type: ignore[misc]
    registration = Registration(-1, "public", "measured", "embedding", "kind", ("kind",), ("id",), "m", "r",
                                DIMENSION, "vector", None, None, False, None, oid)  # fmt: skip
    conn.execute("DELETE FROM pgsim.calibration")
    assert recalibrate_if_stale(conn, registration) is not None
    assert ran(conn) == []


def test_a_superuser_does_not_measure_another_roles_table_or_a_view(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(InvalidInput, match="SET ROLE to its owner"):
        calibrate(conn, "tenant_items", "embedding", seconds=5)
    with pytest.raises(InvalidInput, match="not a table"):
        calibrate(conn, "tenant_view", "embedding", seconds=5)
    (oid,) = conn.execute("SELECT 'tenant_items'::regclass::oid").fetchone()  # type: ignore[misc]
    registration = Registration(-1, "public", "tenant_items", "embedding", "kind", ("kind",), ("id",), "m", "r",
                                DIMENSION, "vector", None, None, False, None, oid)  # fmt: skip
    conn.execute("ANALYZE tenant_items")  # as a superuser: an index expression runs, not under test here
    conn.execute("DELETE FROM public.ran")
    assert recalibrate_if_stale(conn, registration) is None
    assert ran(conn) == []
    conn.execute("GRANT USAGE ON SCHEMA pgsim TO calib_attacker")
    conn.execute("GRANT SELECT, INSERT, UPDATE ON pgsim.calibration TO calib_attacker")  # pgsim grant register
    conn.execute("SET ROLE calib_attacker")  # its owner may
    try:
        assert calibrate(conn, "tenant_items", "embedding", seconds=20, queries=5).stored
    finally:
        conn.execute("RESET ROLE")


def test_a_workload_filter_is_one_condition_never_a_statement_list(conn: psycopg.Connection[Any]) -> None:
    escape = "true); CREATE TABLE public.escaped (x int); COMMIT; SELECT count(*) FROM public.measured WHERE (true"
    with pytest.raises(InvalidInput, match="workload filter"):
        calibrate(conn, "measured", "embedding", seconds=5, filters=[escape])
    assert conn.execute("SELECT to_regclass('public.escaped')").fetchone() == (None,)


def test_calibrating_leaves_the_callers_transaction_and_path_as_they_were(planted: str) -> None:
    with psycopg.connect(planted, autocommit=True) as other:
        other.execute("DELETE FROM pgsim.calibration WHERE table_oid = 'measured'::regclass")
    count = "SELECT count(*) FROM pgsim.calibration WHERE table_oid = 'measured'::regclass AND kind = 'knn'"
    with psycopg.connect(planted) as conn:  # not autocommit: the caller's own transaction
        conn.execute('SET search_path = "$user", public')
        conn.execute("SELECT 1")
        calibrate(conn, "measured", "embedding", seconds=20, queries=5)
        assert conn.execute("SHOW search_path").fetchone() == ('"$user", public',)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert conn.execute(count).fetchone() == (1,)
        conn.rollback()  # the caller's to decide: the curve goes with it
        assert conn.execute(count).fetchone() == (0,)


def test_a_malformed_curve_is_ignored_not_an_error(conn: psycopg.Connection[Any]) -> None:
    calibrate(conn, "measured", "embedding", seconds=20, queries=5)
    for broken in ('{"k": "ten"}', '{"k": 10.0, "ef_search": [20], "levels": [{"selectivity": "all"}]}',
                   '{"k": 10, "ef_search": [20], "levels": [{"selectivity": 1, "recall": ["x"], "hnsw_ms": [1], '
                   '"exact_ms": 9}]}'):  # fmt: skip
        conn.execute(
            "UPDATE pgsim.calibration SET measured = %s::jsonb WHERE table_oid = 'measured'::regclass", [broken]
        )
        chosen = plan(conn, "measured", "embedding", k=10)
        assert not chosen.reason.startswith("calibrated")
        assert len(search(conn, "measured", "embedding", [1.0] * DIMENSION, k=10)) == 10


def test_a_budget_cut_curve_leaves_lower_selectivities_to_the_thresholds(conn: psycopg.Connection[Any]) -> None:
    calibrate(conn, "measured", "embedding", seconds=20, queries=5)
    conn.execute(
        "UPDATE pgsim.calibration SET measured = jsonb_set(measured, '{levels}', "
        "jsonb_build_array(measured -> 'levels' -> 0)) WHERE table_oid = 'measured'::regclass"
    )
    half = plan(conn, "measured", "embedding", k=10, where={"kind": "a"})
    conn.execute("DELETE FROM pgsim.calibration WHERE table_oid = 'measured'::regclass")
    uncalibrated = plan(conn, "measured", "embedding", k=10, where={"kind": "a"})
    assert (half.path, half.reason) == (uncalibrated.path, uncalibrated.reason)
    assert not half.reason.startswith("calibrated")


def test_the_index_measured_is_the_index_planned(conn: psycopg.Connection[Any]) -> None:
    conn.execute('CREATE INDEX "{a" ON measured USING hnsw (embedding vector_cosine_ops) WITH (m = 8)')
    try:
        result = calibrate(conn, "measured", "embedding", seconds=20, queries=5)
        chosen = plan(conn, "measured", "embedding", k=10)
        same = conn.execute("SELECT %s::regclass = %s::regclass", [result.index_name, chosen.index_name])
        assert same.fetchone() == (True,)  # whichever it is, the same one
        assert chosen.reason.startswith("calibrated")
    finally:
        conn.execute('DROP INDEX "{a"')


def test_who_measured_cannot_be_forged_and_a_dropped_tables_curve_goes(planted: str) -> None:
    with psycopg.connect(planted, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS short_lived")
        fill(conn, "short_lived", 2500)
        conn.execute("ALTER TABLE short_lived OWNER TO calib_attacker")
        conn.execute("GRANT USAGE ON SCHEMA pgsim TO calib_attacker")
        conn.execute("GRANT SELECT, INSERT, UPDATE ON pgsim.calibration TO calib_attacker")
        conn.execute("SET ROLE calib_attacker")
        assert calibrate(conn, "short_lived", "embedding", seconds=20, queries=5).stored
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("UPDATE pgsim.calibration SET measured_by = 10 WHERE table_oid = 'short_lived'::regclass")
        conn.execute("RESET ROLE")
        (oid,) = conn.execute("SELECT 'short_lived'::regclass::oid").fetchone()  # type: ignore[misc]
        conn.execute("DROP TABLE short_lived")
        conn.execute("SELECT pgsim.forget_dropped()")
        assert conn.execute("SELECT count(*) FROM pgsim.calibration WHERE table_oid = %s", [oid]).fetchone() == (0,)
