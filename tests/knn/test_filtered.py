"""Filtered k-NN search: exactly k rows when k match, equal to an exact scan; clear errors on bad input."""

from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.model import exact_top_k
from psycopg import sql

from pgsim import InvalidInput
from pgsim.demo.corpus import Package
from pgsim.encoding.encoder import Encoder
from pgsim.knn.filtered import NoIndexWarning, explain, search, search_with_plan
from pgsim.knn.planner import Tuning, plan
from pgsim.knn.statements import Between
from pgsim.quality.relevance import relevant_search


@pytest.fixture
def conn(db: str) -> Any:
    from pgsim import connect

    with connect(db) as connection:
        yield connection


def sections(packages: list[Package]) -> list[tuple[str, int]]:
    from collections import Counter

    return Counter(p.section for p in packages).most_common()


@pytest.mark.parametrize("which", ["common", "rare"])
def test_filtered_search_returns_k_rows_equal_to_exact_scan(
    conn: Any, which: str, encoder: Encoder, packages: list[Package], package_vectors: np.ndarray[Any, Any]
) -> None:
    counts = sections(packages)
    section = counts[0][0] if which == "common" else next(s for s, n in reversed(counts) if n >= 10)
    for text in ("parse json", "play a game", "network server"):
        hits = search(conn, "packages", "embedding", text, k=10, where={"section": section})
        expected = exact_top_k(
            encoder.encode_query(text), package_vectors, packages, 10, lambda p: p.section == section
        )
        assert [h.row["package"] for h in hits] == expected
        assert [h.distance for h in hits] == sorted(h.distance for h in hits)


def test_fewer_matches_than_k_returns_all_of_them(conn: Any, packages: list[Package]) -> None:
    section, count = next((s, n) for s, n in reversed(sections(packages)) if n >= 2)
    hits = search(conn, "packages", "embedding", "anything at all", k=50, where={"section": section})
    assert sorted(h.row["package"] for h in hits) == sorted(p.package for p in packages if p.section == section)
    assert search(conn, "packages", "embedding", "x", k=5, where={"section": "no-such-section"}) == []


def test_rows_not_embedded_yet_are_left_out_not_ranked(conn: Any, packages: list[Package]) -> None:
    section, count = next((s, n) for s, n in reversed(sections(packages)) if n >= 2)
    conn.execute("INSERT INTO packages (package, section) VALUES ('not-embedded-yet', %s)", [section])
    try:
        hits = search(conn, "packages", "embedding", "anything at all", k=50, where={"section": section})
        assert sorted(h.row["package"] for h in hits) == sorted(p.package for p in packages if p.section == section)
        scored = relevant_search(
            conn, "packages", "embedding", "anything", k=count, min_score=0, where={"section": section}
        )
        assert len(scored) == count and scored[-1].score == 0
        in_sql = conn.execute(  # the SQL function, on its exact path (few rows pass)
            "SELECT r.row->>'package', r.distance FROM pgsim.knn('packages', 'embedding', "
            "(SELECT embedding FROM packages WHERE embedding IS NOT NULL LIMIT 1), 50, %s) AS r",
            [f"section = '{section}'"],
        ).fetchall()
        assert sorted(p for p, _ in in_sql) == sorted(p.package for p in packages if p.section == section)
        assert all(distance is not None for _, distance in in_sql)
    finally:
        conn.execute("DELETE FROM packages WHERE package = 'not-embedded-yet'")


def test_in_and_range_filters(
    conn: Any, encoder: Encoder, packages: list[Package], package_vectors: np.ndarray[Any, Any]
) -> None:
    keep = lambda p: p.section in ("utils", "admin") and 100 <= p.installed_size < 1000  # noqa: E731
    hits = search(
        conn,
        "packages",
        "embedding",
        "disk usage",
        k=7,
        where={"section": ["utils", "admin"], "installed_size": Between(100, 1000)},
    )
    assert [h.row["package"] for h in hits] == exact_top_k(
        encoder.encode_query("disk usage"), package_vectors, packages, 7, keep
    )


def test_vector_query_and_selected_columns(
    conn: Any, package_vectors: np.ndarray[Any, Any], packages: list[Package]
) -> None:
    hits = search(conn, "packages", "embedding", package_vectors[5], k=1, columns=["package", "section"])
    assert hits[0].row == {"package": packages[5].package, "section": packages[5].section}
    assert hits[0].distance == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("k", [0, -1, 10_001, 2.5, True])
def test_bad_k(conn: Any, k: Any) -> None:
    with pytest.raises(InvalidInput, match="k must be a whole number"):
        search(conn, "packages", "embedding", "x", k=k)


def test_bad_names_and_injection_shaped_input(conn: Any) -> None:
    with pytest.raises(InvalidInput, match="has no column 'nope'"):
        search(conn, "packages", "nope", "x")
    with pytest.raises(InvalidInput, match="does not exist"):
        search(conn, "no_such_table", "embedding", "x")
    with pytest.raises(InvalidInput, match="not a pgvector vector column"):
        search(conn, "packages", "section", "x")
    with pytest.raises(InvalidInput, match="column .* does not exist"):
        search(conn, "packages", "embedding", "x", where={"section\" = 'x'; DROP TABLE packages; --": "x"})
    assert search(conn, "packages", "embedding", "x", where={"section": "x'; DROP TABLE packages; --"}) == []
    with pytest.raises(InvalidInput, match="does not exist"):
        search(conn, 'packages"; DROP TABLE packages; --', "embedding", "x")
    assert conn.execute("SELECT count(*) > 0 FROM packages").fetchone() == (True,)


def test_wrong_dimension_and_nan_query_vectors(conn: Any) -> None:
    with pytest.raises(InvalidInput, match="has 3 dimensions, the column holds 384"):
        search(conn, "packages", "embedding", [0.1, 0.2, 0.3])
    with pytest.raises(InvalidInput, match="nan"):
        search(conn, "packages", "embedding", [float("nan")] * 384)


def test_settings_do_not_leak_into_the_callers_transaction(db: str) -> None:
    with psycopg.connect(db) as conn:  # not autocommit: search runs inside the caller's transaction
        from pgsim import register

        register(conn)
        search(conn, "packages", "embedding", "x", k=3, where={"section": "libs"})
        assert conn.execute("SHOW hnsw.iterative_scan").fetchone() == ("off",)
        assert conn.execute("SHOW enable_indexscan").fetchone() == ("on",)


# -- the planner: each path keeps the contract ---------------------------------------------------------------

HNSW_ALWAYS = Tuning(exact_below_rows=0, min_hnsw_selectivity=0)
EXACT_ALWAYS = Tuning(exact_below_rows=1e12)


@pytest.mark.parametrize("tuning", [HNSW_ALWAYS, EXACT_ALWAYS], ids=["hnsw", "exact"])
def test_each_path_returns_the_exact_top_k(
    conn: Any, tuning: Tuning, encoder: Encoder, packages: list[Package], package_vectors: np.ndarray[Any, Any]
) -> None:
    section = sections(packages)[0][0]
    for text in ("parse json", "a font", "backup tool"):
        hits, chosen = search_with_plan(
            conn, "packages", "embedding", text, k=10, where={"section": section}, tuning=tuning
        )
        assert chosen.path == ("hnsw" if tuning is HNSW_ALWAYS else "exact")
        expected = exact_top_k(
            encoder.encode_query(text), package_vectors, packages, 10, lambda p: p.section == section
        )
        assert [h.row["package"] for h in hits] == expected


def test_plan_sizes_the_hnsw_scan_from_the_filter(conn: Any, packages: list[Package]) -> None:
    section, count = sections(packages)[0]
    # the row count is the planner's estimate: counted afresh here, whatever autovacuum last saw of the rows
    # other tests of this module add and remove
    conn.execute("ANALYZE packages")
    chosen = plan(conn, "packages", "embedding", k=10, where={"section": section}, tuning=HNSW_ALWAYS)
    assert chosen.path == "hnsw" and chosen.index_name == "packages_embedding_idx"
    assert chosen.indexed_rows == len(packages)
    assert chosen.selectivity == pytest.approx(count / len(packages), rel=0.5)
    assert chosen.ef_search == 200 and chosen.max_scan_tuples >= 20000
    default = plan(conn, "packages", "embedding", k=10, where={"section": section})
    assert default.path == "exact" and "rows pass the filter" in default.reason  # 400 rows: below the threshold
    rare = plan(
        conn,
        "packages",
        "embedding",
        k=10,
        where={"section": section},
        tuning=Tuning(exact_below_rows=0, min_hnsw_selectivity=0.99),
    )
    assert rare.path == "exact" and "pgsim index-advise" in rare.reason


def test_hnsw_path_falls_back_to_exact_when_short(conn: Any) -> None:
    hits, chosen = search_with_plan(
        conn, "packages", "embedding", "x", k=5, where={"section": "none such"}, tuning=HNSW_ALWAYS
    )
    assert hits == [] and chosen.path == "hnsw" and chosen.fell_back


def test_partial_index_serves_its_filter_value(db: str, packages: list[Package]) -> None:
    section = sections(packages)[1][0]
    with psycopg.connect(db, autocommit=True) as admin:
        create = (
            "CREATE INDEX packages_partial_hnsw ON packages USING hnsw (embedding vector_cosine_ops) WHERE section = {}"
        )
        admin.execute(sql.SQL(create).format(sql.Literal(section)))
        admin.execute("ANALYZE packages")
    try:
        from pgsim import connect

        with connect(db) as conn:
            served = plan(conn, "packages", "embedding", where={"section": section}, tuning=HNSW_ALWAYS)
            assert served.index_name == "packages_partial_hnsw" and served.selectivity == pytest.approx(1, rel=0.3)
            other = plan(conn, "packages", "embedding", where={"section": sections(packages)[0][0]}, tuning=HNSW_ALWAYS)
            assert other.index_name == "packages_embedding_idx"
            assert conn.execute("SHOW enable_seqscan").fetchone() == ("on",)
    finally:
        with psycopg.connect(db, autocommit=True) as admin:
            admin.execute("DROP INDEX packages_partial_hnsw")


def test_composable_filter(
    conn: Any, encoder: Encoder, packages: list[Package], package_vectors: np.ndarray[Any, Any]
) -> None:
    where = sql.SQL("{} < {} AND {} <> {}").format(
        sql.Identifier("installed_size"), sql.Literal(500), sql.Identifier("section"), sql.Literal("libs")
    )
    hits = search(conn, "packages", "embedding", "image viewer", k=8, where=where, tuning=HNSW_ALWAYS)
    keep = lambda p: p.installed_size < 500 and p.section != "libs"  # noqa: E731
    assert [h.row["package"] for h in hits] == exact_top_k(
        encoder.encode_query("image viewer"), package_vectors, packages, 8, keep
    )


@pytest.mark.parametrize("min_hnsw_selectivity", [0.0, 0.5], ids=["hnsw", "exact"])
def test_sql_function_for_sql_users(
    db: str,
    min_hnsw_selectivity: float,
    encoder: Encoder,
    packages: list[Package],
    package_vectors: np.ndarray[Any, Any],
) -> None:
    """pgsim.knn as the README shows it: one statement, typed rows back through jsonb_populate_record."""
    section = sections(packages)[0][0]
    query = encoder.encode_query("parse json")
    from pgsim import register

    with psycopg.connect(db) as conn:
        register(conn)
        with conn.transaction():
            rows = conn.execute(
                "SELECT p.package, p.section, r.distance "
                "FROM pgsim.knn('packages', 'embedding', %s, 10, %s, exact_below_rows => 0, "
                "min_hnsw_selectivity => %s) AS r, jsonb_populate_record(NULL::packages, r.row) AS p",
                [query, f"section = '{section}'", min_hnsw_selectivity],
            ).fetchall()
            # the settings it changed are restored before it returns, inside the same transaction
            assert conn.execute("SHOW hnsw.iterative_scan").fetchone() == ("off",)
            assert conn.execute("SHOW enable_indexscan").fetchone() == ("on",)
    assert [r[0] for r in rows] == exact_top_k(query, package_vectors, packages, 10, lambda p: p.section == section)
    assert all(r[1] == section for r in rows) and [r[2] for r in rows] == sorted(r[2] for r in rows)


def test_sql_function_falls_back_when_short(db: str, package_vectors: np.ndarray[Any, Any]) -> None:
    from pgsim import register

    with psycopg.connect(db, autocommit=True) as conn:
        register(conn)
        rows = conn.execute(
            "SELECT count(*) FROM pgsim.knn('packages', 'embedding', %s, 10, $$section = 'none such'$$, "
            "exact_below_rows => 0, min_hnsw_selectivity => 0)",
            [package_vectors[0]],
        ).fetchone()
        assert rows == (0,)
        three = [p for (p,) in conn.execute("SELECT package FROM packages ORDER BY package LIMIT 3").fetchall()]
        found = conn.execute(
            "SELECT r.row->>'package' FROM pgsim.knn('packages', 'embedding', %s, 10, %s, exact_below_rows => 0, "
            "min_hnsw_selectivity => 0) AS r",
            [package_vectors[0], "package IN (" + ", ".join(f"'{p}'" for p in three) + ")"],
        ).fetchall()
        assert sorted(p for (p,) in found) == three


def test_no_index_means_exact_scan_and_a_warning(db: str, packages: list[Package]) -> None:
    from pgsim import connect

    with connect(db) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS unindexed AS SELECT package, section, embedding FROM packages")
        with pytest.warns(NoIndexWarning, match="CREATE INDEX ON unindexed USING hnsw"):
            hits, chosen = search_with_plan(conn, "unindexed", "embedding", "editor", k=3)
        assert chosen.path == "exact" and "no valid HNSW index" in chosen.reason and len(hits) == 3


def test_doctor_explains(db: str, packages: list[Package]) -> None:
    from pgsim import connect

    with connect(db) as conn:
        chosen, analyzed = explain(
            conn, "packages", "embedding", "editor", k=3, where={"section": "libs"}, tuning=EXACT_ALWAYS
        )
    assert chosen.path == "exact"
    assert "actual time" in analyzed and "<query vector>" in analyzed and "Limit" in analyzed


def test_halfvec_column(
    db: str, encoder: Encoder, packages: list[Package], package_vectors: np.ndarray[Any, Any]
) -> None:
    from pgsim import connect

    with connect(db) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS packages_half AS SELECT package, section, embedding::halfvec(384) AS embedding "
            "FROM packages"
        )
        conn.execute(
            "CREATE INDEX IF NOT EXISTS packages_half_hnsw ON packages_half USING hnsw (embedding halfvec_cosine_ops)"
        )
        conn.execute("ANALYZE packages_half")
        section = sections(packages)[0][0]
        for text in ("parse json", "a font"):
            by_path = [
                [
                    h.row["package"]
                    for h in search(
                        conn, "packages_half", "embedding", text, k=10, where={"section": section}, tuning=t
                    )
                ]
                for t in (HNSW_ALWAYS, EXACT_ALWAYS)
            ]
            assert by_path[0] == by_path[1]
            full = exact_top_k(
                encoder.encode_query(text), package_vectors, packages, 10, lambda p: p.section == section
            )
            assert len(set(by_path[0]) & set(full)) >= 9  # half precision may swap a near tie at the edge
        chosen = plan(conn, "packages_half", "embedding", where={"section": section}, tuning=HNSW_ALWAYS)
        assert chosen.index_name == "packages_half_hnsw"


def test_search_without_pgsim_schema_says_to_install(server_dsn: str) -> None:
    from fixtures.database import scratch_database

    from pgsim import register

    with scratch_database(server_dsn, "no_schema") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, embedding vector(3))")
        register(conn)
        with pytest.raises(InvalidInput, match="run `pgsim install` first"):
            search(conn, "docs", "embedding", [0.1, 0.2, 0.3])


def test_plan_is_checked_against_the_index_postgres_would_scan(
    conn: Any, package_vectors: np.ndarray[Any, Any]
) -> None:
    """A plan made for one index is turned into the exact path when the search would scan another."""
    from pgsim.knn.planner import Plan, checked_plan
    from pgsim.knn.statements import PATHS, filter_sql, search_statement
    from pgsim.knn.target import vector_column

    target = vector_column(conn, "packages", "embedding")
    hnsw = search_statement(target, filter_sql(None), ["package"], PATHS[1]).as_bytes(conn)
    params = {"q": package_vectors[0], "k": 10}
    planned = Plan("hnsw", "packages_embedding_idx", 400.0, 400.0, 1.0, 200, 20000, "iterative HNSW scan")
    elsewhere = Plan("hnsw", "some_partial_hnsw", 40.0, 40.0, 1.0, 200, 20000, "iterative HNSW scan")
    # 400 rows: PostgreSQL sorts them rather than walk the graph, and sorted rows are exact: plan kept
    assert checked_plan(conn, elsewhere, hnsw, params) == elsewhere
    conn.execute("SET enable_sort = off")  # now only the HNSW index can produce the order
    try:
        assert checked_plan(conn, planned, hnsw, params) == planned
        checked = checked_plan(conn, elsewhere, hnsw, params)
    finally:
        conn.execute("RESET enable_sort")
    assert checked.path == "exact" and "would scan packages_embedding_idx instead" in checked.reason


def test_a_plain_psycopg_connection_needs_no_registration(db: str, packages: list[Package]) -> None:
    with psycopg.connect(db) as plain:  # what an application's own pool hands out: no pgsim or pgvector adapters
        hits = search(plain, "packages", "embedding", "parse JSON", k=3, where={"section": packages[0].section})
        vector_hits = search(plain, "packages", "embedding", np.ones(384, dtype=np.float32), k=2)
    assert len(hits) == 3 and all(hit.row["section"] == packages[0].section for hit in hits)
    assert len(vector_hits) == 2


def test_zero_query_vector_and_nul_in_filters_are_clear_errors(conn: Any) -> None:
    with pytest.raises(InvalidInput, match="all zeros"):
        search(conn, "packages", "embedding", [0.0] * 384)
    with pytest.raises(InvalidInput, match="filter column .*tion' holds a NUL"):
        search(conn, "packages", "embedding", "x", where={"sec\x00tion": "libs"})
    with pytest.raises(InvalidInput, match="filter value of 'section' .* holds a NUL"):
        search(conn, "packages", "embedding", "x", where={"section": ["libs", "li\x00bs"]})


def test_a_percent_sign_in_a_filter_value_or_pattern_is_data(conn: Any, packages: list[Package]) -> None:
    """psycopg reads % in a statement with parameters as a placeholder: the filter's own are doubled."""
    target = packages[0].package
    conn.execute("UPDATE packages SET section = %s WHERE package = %s", ["50% off", target])
    try:
        for where in ({"section": "50% off"}, {"section": ["50% off", "x%s"]}, sql.SQL("section LIKE '50%'")):
            hits = search(conn, "packages", "embedding", "anything", k=3, where=where)  # type: ignore[arg-type]
            assert [hit.row["package"] for hit in hits] == [target]
    finally:
        conn.execute("UPDATE packages SET section = %s WHERE package = %s", [packages[0].section, target])


def test_sql_function_refuses_bad_input_clearly(db: str, package_vectors: np.ndarray[Any, Any]) -> None:
    from pgsim import register

    with psycopg.connect(db, autocommit=True) as conn:
        register(conn)
        for query, message in [(None, "the query vector is NULL"), (np.zeros(384, dtype=np.float32), "all zeros")]:
            with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
                conn.execute("SELECT * FROM pgsim.knn('packages', 'embedding', %s::vector, 10)", [query])
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="k must be from 1 to 10000"):
            conn.execute("SELECT * FROM pgsim.knn('packages', 'embedding', %s, 2147483647)", [package_vectors[0]])
        with pytest.raises(psycopg.errors.InvalidCursorDefinition, match="multi-query"):
            conn.execute(
                "SELECT * FROM pgsim.knn('packages', 'embedding', %s, 10, 'true; SELECT 1')", [package_vectors[0]]
            )


def test_sql_function_scans_an_hnsw_index_whose_name_needs_quoting(
    db: str, packages: list[Package], package_vectors: np.ndarray[Any, Any]
) -> None:
    from pgsim import register

    with psycopg.connect(db, autocommit=True) as conn:
        register(conn)
        conn.execute("DROP TABLE IF EXISTS quoted")
        conn.execute("CREATE TABLE quoted AS SELECT package, section, embedding FROM packages")
        conn.execute("ALTER TABLE quoted ADD PRIMARY KEY (package)")
        conn.execute('CREATE INDEX "Quoted Index" ON quoted USING hnsw (embedding vector_cosine_ops)')
        conn.execute("ANALYZE quoted")

        def scans() -> int:
            conn.execute("SELECT pg_stat_force_next_flush()")
            row = conn.execute("SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'Quoted Index'")
            return int((row.fetchone() or (0,))[0])

        before = scans()
        conn.execute("SET enable_seqscan = off")  # on 400 rows a scan and sort is cheaper than the graph
        rows = conn.execute(
            "SELECT r.distance FROM pgsim.knn('quoted', 'embedding', %s, 10, exact_below_rows => 0) AS r",
            [package_vectors[0]],
        ).fetchall()
        assert len(rows) == 10 and rows[0][0] == pytest.approx(0.0, abs=1e-5)
        assert scans() > before  # the planned index, not a fallback to the exact scan
        conn.execute("RESET enable_seqscan")
        conn.execute("DROP TABLE quoted")
