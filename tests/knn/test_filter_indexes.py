"""missing_filter_indexes: the btree or GIN index a filter column lacks when the exact path reads the whole
table to apply the filter, named with the CREATE INDEX that serves it, and no longer named once it exists."""

from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgsim import InvalidInput
from pgsim.knn.filter_indexes import (
    index_name,
    likely_filters,
    missing_filter_indexes,
    missing_indexes_for_likely_filters,
)

ROWS = 5000
EVIL = 'x"); DROP TABLE items; --'  # a column name shaped like an injection


@pytest.fixture(scope="module")
def items(database: str) -> str:
    """5,000 rows: section (100 values, 1 % each), half (2 values), tags (text[]), attrs (jsonb), the
    injection-shaped column (50 values) and a 3-d embedding; only the primary key is indexed."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute(
            sql.SQL(
                "CREATE TABLE items (id int PRIMARY KEY, section text, half int, tags text[], attrs jsonb, {} int, "
                "embedding vector(3))"
            ).format(sql.Identifier(EVIL))
        )
        conn.execute(
            "INSERT INTO items SELECT i, 's' || (i %% 100), i %% 2, ARRAY['t' || (i %% 97), 'all'], "
            "jsonb_build_object('colour', 'c' || (i %% 90)), i %% 50, ARRAY[random(), random(), 1]::vector "
            "FROM generate_series(1, %s) AS i",
            [ROWS],
        )
        conn.execute("ANALYZE items")
    return database


def statements(conn: psycopg.Connection[Any], where: Any, table: str = "items") -> list[str]:
    return [a.statement.as_string(conn) for a in missing_filter_indexes(conn, table, "embedding", where)]


def test_missing_btree_is_named_then_not_once_created(items: str) -> None:
    with psycopg.connect(items, autocommit=True) as conn:
        (advice,) = missing_filter_indexes(conn, "items", "embedding", "section = 's7'")
        assert (advice.table, advice.column, advice.method) == ("public.items", "section", "btree")
        assert advice.table_rows == pytest.approx(ROWS, rel=0.05) and advice.estimated_rows < ROWS * 0.05
        assert "Seq Scan" in advice.reason
        expected = (
            'CREATE INDEX CONCURRENTLY IF NOT EXISTS "items_section_btree" ON "public"."items" USING btree ("section")'
        )
        assert advice.statement.as_string(conn) == expected
        assert statements(conn, {"section": ["s1", "s2"]}) == [expected]  # a search's dict filter, IN
        conn.execute(advice.statement)
        conn.execute("ANALYZE items")
        assert statements(conn, "section = 's7'") == []
        assert statements(conn, {"section": "s7"}) == []
        conn.execute('DROP INDEX "items_section_btree"')


def test_gin_for_array_and_jsonb_containment(items: str) -> None:
    with psycopg.connect(items, autocommit=True) as conn:
        (tags,) = missing_filter_indexes(conn, "items", "embedding", "tags @> ARRAY['t5']")
        assert tags.method == "gin" and tags.column_type == "text[]"
        assert tags.statement.as_string(conn).endswith('ON "public"."items" USING gin ("tags")')
        (attrs,) = missing_filter_indexes(conn, "items", "embedding", """attrs @> '{"colour": "c3"}'""")
        assert attrs.method == "gin" and attrs.index_name == "items_attrs_gin"
        conn.execute(tags.statement)
        conn.execute("ANALYZE items")
        assert statements(conn, "tags @> ARRAY['t5']") == []
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(tags.index_name)))


def test_injection_shaped_column_is_quoted_and_the_index_built(items: str) -> None:
    with psycopg.connect(items, autocommit=True) as conn:
        (advice,) = missing_filter_indexes(conn, "items", "embedding", {EVIL: 3})
        assert advice.column == EVIL
        text = advice.statement.as_string(conn)
        assert text.endswith('USING btree ("x""); DROP TABLE items; --")')
        assert all(c.isalnum() or c == "_" for c in advice.index_name) and len(advice.index_name) <= 63
        conn.execute(advice.statement)  # one statement: the index, nothing else
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (ROWS,)
        assert conn.execute("SELECT to_regclass(%s)", [advice.index_name]).fetchone() == (advice.index_name,)
        conn.execute("ANALYZE items")
        assert statements(conn, {EVIL: 3}) == []
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(advice.index_name)))


def test_filters_an_index_would_not_help(items: str) -> None:
    with psycopg.connect(items, autocommit=True) as conn:
        assert statements(conn, "half = 1") == []  # keeps half the rows: a whole-table read either way
        assert statements(conn, "section LIKE '%7'") == []  # a pattern: a btree does not serve it
        assert statements(conn, "attrs ->> 'colour' = 'c3'") == []  # a jsonb path: a GIN does not serve it
        assert statements(conn, "lower(section) = 's7'") == []  # an expression: an index on section does not serve it
        assert statements(conn, "id < 40") == []  # the primary key's index finds the rows
        assert statements(conn, "id < 40 AND section = 's1'") == []  # found by the key's index, then filtered
        conn.execute("CREATE TABLE few AS SELECT * FROM items LIMIT 500")
        conn.execute("ANALYZE few")
        assert statements(conn, "section = 's1'", table="few") == []  # reading 500 rows costs nothing


def test_bad_input_is_an_error_and_runs_nothing(items: str) -> None:
    with psycopg.connect(items, autocommit=True) as conn:
        with pytest.raises(InvalidInput, match="not a pgvector"):
            missing_filter_indexes(conn, "items", "section", "section = 's1'")
        with pytest.raises(InvalidInput, match="not valid"):
            missing_filter_indexes(conn, "items", "embedding", "nope = 1")
        with pytest.raises(InvalidInput, match="multiple commands"):  # a second statement is never run
            missing_filter_indexes(conn, "items", "embedding", "true); DROP TABLE items; SELECT (1")
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (ROWS,)
        with pytest.raises(InvalidInput, match="does not exist"):
            missing_filter_indexes(conn, 'it"ems; DROP TABLE items', "embedding", "true")


def test_index_names() -> None:
    assert index_name("items", "section", "btree") == "items_section_btree"
    odd = index_name("Items", EVIL, "gin")
    assert odd != index_name("items", EVIL, "gin") and len(odd) <= 63 and odd.endswith("_gin")


def test_likely_filters_from_the_statistics(items: str) -> None:
    """Without a filter: the columns that repeat their values, each with a value that keeps few rows."""
    with psycopg.connect(items, autocommit=True) as conn:
        filters = dict(likely_filters(conn, "items", "embedding"))
        assert list(filters) == ["section", "tags", "attrs", EVIL]  # not id (unique), half (no rare value)
        assert filters["section"].as_string(conn).startswith('"section" = \'s')
        assert filters["tags"].as_string(conn).startswith('"tags" @> ARRAY[\'t')
        missing = missing_indexes_for_likely_filters(conn, "items", "embedding")
        assert [(a.column, a.method) for a in missing] == [("section", "btree"), ("tags", "gin"), (EVIL, "btree")]
        conn.execute("CREATE INDEX items_section ON items (section)")
        assert [a.column for a in missing_indexes_for_likely_filters(conn, "items", "embedding")] == ["tags", EVIL]
        conn.execute("DROP INDEX items_section")
