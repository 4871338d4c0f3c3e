"""Filtered k-NN search: exactly k rows when k match, equal to an exact scan; clear errors on bad input."""

from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.model import exact_top_k, load_packages_table

from pgsim import InvalidInput, install
from pgsim.corpus import Package
from pgsim.encode import Encoder
from pgsim.search import Between, search


@pytest.fixture(scope="module")
def db(database: str, packages: list[Package], package_vectors: np.ndarray[Any, Any]) -> str:
    with psycopg.connect(database, autocommit=True) as conn:
        install(conn)
        load_packages_table(conn, packages, package_vectors, index=True)
    return database


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
