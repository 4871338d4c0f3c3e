"""index-advise: partial HNSW indexes for a workload's frequent filter values, built and then used."""

from collections import Counter

import pytest

from pgsim import InvalidInput, connect
from pgsim.demo.corpus import Package
from pgsim.knn.advice import advise, create, index_name
from pgsim.knn.planner import Tuning, plan

HNSW_FROM_ONE_ROW = Tuning(exact_below_rows=0, min_hnsw_selectivity=0)


def test_frequent_narrow_filter_gets_a_partial_index_that_search_then_uses(db: str, packages: list[Package]) -> None:
    (common, _), (second, _), *_ = Counter(p.section for p in packages).most_common()
    workload = [{"section": common}] * 6 + [{"section": second, "priority": "optional"}] * 3 + [{"section": "x"}]
    with connect(db) as conn:
        advice = advise(conn, "packages", "embedding", workload, min_share=0.25, tuning=HNSW_FROM_ONE_ROW)
        assert [(a.column, a.value) for a in advice] == [("section", common), ("section", second)]
        assert advice[0].share == pytest.approx(0.6) and advice[0].current.path == "hnsw"
        statement = advice[0].statement.as_string(conn)
        assert statement.startswith("CREATE INDEX CONCURRENTLY IF NOT EXISTS")
        assert f"WHERE \"section\" = '{common}'" in statement
        create(conn, advice[0])
        now = plan(conn, "packages", "embedding", where={"section": common}, tuning=HNSW_FROM_ONE_ROW)
        assert now.index_name == advice[0].index_name
        assert now.ef_search == 64  # from the index's comment, written by create()
        assert "WITH (m = 24, ef_construction = 200)" in statement
        again = advise(conn, "packages", "embedding", workload, min_share=0.25, tuning=HNSW_FROM_ONE_ROW)
        assert [(a.column, a.value) for a in again] == [("section", second)]


def test_index_names_fit_and_quote_hostile_values() -> None:
    name = index_name("public.packages", "embedding", "section", "x'; DROP TABLE packages; --" + "y" * 100)
    assert len(name.encode()) <= 63 and name.endswith("_hnsw")
    assert name != index_name("public.packages", "embedding", "section", "x")
    assert all(c.isalnum() or c == "_" for c in name)


def test_bad_share_and_autocommit(db: str) -> None:
    with connect(db) as conn:
        with pytest.raises(InvalidInput, match="min_share"):
            advise(conn, "packages", "embedding", [], min_share=0)
    with connect(db, autocommit=False) as conn:
        advice = advise(conn, "packages", "embedding", [{"section": "libs"}], min_share=1, tuning=HNSW_FROM_ONE_ROW)
        with pytest.raises(InvalidInput, match="autocommit"):
            create(conn, advice[0])
