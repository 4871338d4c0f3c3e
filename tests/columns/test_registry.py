"""Registering embedding columns: what add_embedding creates, what remove_embedding takes away, and bad input
that changes nothing. Real PostgreSQL, real model (for its dimension and revision)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from fixtures.database import installed_without_registrations
from psycopg import sql

from pgsim.columns.adding import add_embedding
from pgsim.columns.registry import get_registration, registrations, remove_embedding
from pgsim.db.hnsw import HNSW
from pgsim.errors import InvalidInput, ModelNotFound


@pytest.fixture
def docs(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """A fresh table ``docs`` with three rows (one without text) in an installed database."""
    installed_without_registrations(conn)
    conn.execute("DROP TABLE IF EXISTS docs, nokey CASCADE")
    conn.execute("CREATE TABLE docs (id int PRIMARY KEY, title text, body text, section text)")
    conn.execute(
        "INSERT INTO docs VALUES (1, 'json', 'parse JSON fast', 'libs'), (2, 'chess', 'play chess', 'games'), "
        "(3, NULL, '  ', 'misc')"
    )
    return conn


def snapshot(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    """Everything add_embedding may touch: columns, triggers, indexes, registry and queue."""
    return (
        conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'docs'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
        ).fetchall(),
        conn.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'docs'::regclass ORDER BY 1").fetchall(),
        conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'docs' ORDER BY 1").fetchall(),
        conn.execute("SELECT count(*) FROM pgsim.embedding").fetchone(),
        conn.execute("SELECT count(*) FROM pgsim.queue").fetchone(),
        conn.execute("SELECT * FROM docs ORDER BY id").fetchall(),
    )


def queued_keys(conn: psycopg.Connection[Any]) -> list[Any]:
    return [key["id"] for (key,) in conn.execute("SELECT key FROM pgsim.queue ORDER BY id").fetchall()]


def test_add_embedding_creates_column_registry_triggers_index_and_queues_rows_with_text(docs: Any) -> None:
    registration = add_embedding(docs, "docs", "embedding", source="body", index=HNSW(m=8, ef_construction=32))
    assert registration.dimension == 384 and registration.key_columns == ("id",)
    assert registration.source_columns == ("body",)
    columns = dict(snapshot(docs)[0])
    assert columns["embedding"] == "vector(384)"
    triggers = [name for (name,) in snapshot(docs)[1]]
    assert triggers == [f"pgsim_{registration.id}_insert", f"pgsim_{registration.id}_update"]
    definition = docs.execute(
        "SELECT indexdef FROM pg_indexes WHERE indexname = %s", [registration.index_name]
    ).fetchone()
    assert definition is not None and "hnsw" in definition[0] and "m='8'" in definition[0]
    assert sorted(queued_keys(docs)) == [1, 2]  # row 3 has only blank text
    assert get_registration(docs, "public.docs", "embedding") == registration


def test_remove_embedding_undoes_everything(docs: Any) -> None:
    before = snapshot(docs)
    add_embedding(docs, "docs", "embedding", source="body")
    remove_embedding(docs, "docs", "embedding")
    assert snapshot(docs) == before


def test_an_existing_column_of_the_right_type_is_adopted_and_kept_on_remove(docs: Any) -> None:
    docs.execute("ALTER TABLE docs ADD COLUMN embedding vector(384)")
    registration = add_embedding(docs, "docs", "embedding", source="body", index=None)
    assert not registration.created_column and registration.index_name is None
    remove_embedding(docs, "docs", "embedding")
    assert ("embedding", "vector(384)") in snapshot(docs)[0]


def test_triggers_queue_source_changes_only(docs: Any) -> None:
    registration = add_embedding(docs, "docs", "embedding", source=["title", "body"], queue_existing=False)
    assert registration.source_columns == ("title", "body")
    docs.execute("UPDATE docs SET section = 'other' WHERE id = 1")  # not a source column
    docs.execute("UPDATE docs SET body = body WHERE id = 1")  # a source column, unchanged
    assert queued_keys(docs) == []
    docs.execute("UPDATE docs SET title = 'yaml' WHERE id = 2")
    docs.execute("INSERT INTO docs (id, title, body) VALUES (4, 'new', 'a new row')")
    docs.execute("UPDATE docs SET title = 'again' WHERE id = 2")  # already queued: no second entry
    assert queued_keys(docs) == [2, 4]
    vector = "[" + ",".join(["0.05"] * 384) + "]"
    docs.execute("INSERT INTO docs (id, body, embedding) VALUES (5, 'has its vector', %s)", [vector])
    docs.execute("UPDATE docs SET body = 'with its new vector', embedding = %s WHERE id = 1", [vector])
    assert queued_keys(docs) == [2, 4]  # the writer supplied the embedding both times
    reasons = docs.execute("SELECT reason FROM pgsim.queue ORDER BY id").fetchall()
    assert reasons == [("update",), ("insert",)]
    with pytest.raises(RuntimeError), docs.transaction():  # the entry is part of the writer's transaction
        docs.execute("INSERT INTO docs (id, body) VALUES (6, 'rolled back')")
        assert queued_keys(docs) == [2, 4, 6]
        raise RuntimeError
    assert queued_keys(docs) == [2, 4]


def test_source_expression_reads_its_columns(docs: Any) -> None:
    registration = add_embedding(
        docs, "docs", "embedding", source="coalesce(title, '') || ': ' || upper(body)", queue_existing=False
    )
    assert registration.source_columns == ("title", "body")
    text = docs.execute(sql.SQL("SELECT {} FROM docs WHERE id = 1").format(registration.source_sql)).fetchone()
    assert text == ("json: PARSE JSON FAST",)


def test_halfvec_column(docs: Any) -> None:
    registration = add_embedding(docs, "docs", "embedding", source="body", dtype="halfvec")
    assert dict(snapshot(docs)[0])["embedding"] == "halfvec(384)"
    definition = docs.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", [registration.index_name])
    assert "halfvec_cosine_ops" in definition.fetchone()[0]  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "bodyy"}, 'column "bodyy" does not exist. The columns of public.docs are'),
        ({"source": ["title", "bodyy"]}, "no column 'bodyy'"),
        ({"source": "body); DROP TABLE docs; --"}, "not an SQL expression"),
        ({"source": "body || (SELECT 1)::text; DROP TABLE docs"}, "not an SQL expression"),
        ({"source": "'constant text'"}, "reads no column"),
        ({"source": "body", "dtype": "binary"}, "dtype must be"),
    ],
)
def test_bad_registration_changes_nothing(docs: Any, kwargs: dict[str, Any], message: str) -> None:
    before = snapshot(docs)
    with pytest.raises(InvalidInput, match=message):
        add_embedding(docs, "docs", "embedding", **kwargs)
    assert snapshot(docs) == before


def test_wrong_dimension_of_an_existing_column_changes_nothing(docs: Any) -> None:
    docs.execute("ALTER TABLE docs ADD COLUMN embedding vector(768)")
    before = snapshot(docs)
    with pytest.raises(InvalidInput, match=r"exists as vector\(768\).*gives vector\(384\)"):
        add_embedding(docs, "docs", "embedding", source="body")
    assert snapshot(docs) == before


def test_table_without_primary_key_is_refused(docs: Any) -> None:
    docs.execute("CREATE TABLE nokey (body text)")
    with pytest.raises(InvalidInput, match="no primary key.*ADD PRIMARY KEY"):
        add_embedding(docs, "nokey", "embedding", source="body")
    assert docs.execute("SELECT count(*) FROM pgsim.embedding").fetchone() == (0,)


def test_unknown_model_changes_nothing(docs: Any) -> None:
    before = snapshot(docs)
    with pytest.raises(ModelNotFound, match="no-such-model"):
        add_embedding(docs, "docs", "embedding", source="body", model="/nonexistent/no-such-model")
    assert snapshot(docs) == before


def test_registering_twice_is_refused(docs: Any) -> None:
    add_embedding(docs, "docs", "embedding", source="body")
    before = snapshot(docs)
    with pytest.raises(InvalidInput, match="already registered"):
        add_embedding(docs, "docs", "embedding", source="title")
    assert snapshot(docs) == before


def test_injection_shaped_identifiers_are_only_names(docs: Any) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        add_embedding(docs, 'docs"; DROP TABLE docs; --', "embedding", source="body")
    column = 'emb"; DROP TABLE docs; --'
    registration = add_embedding(docs, "docs", column, source="body", queue_existing=False)
    assert (column, "vector(384)") in snapshot(docs)[0]
    docs.execute("INSERT INTO docs (id, body) VALUES (9, 'queued through a trigger on a strange name')")
    assert queued_keys(docs) == [9]
    remove_embedding(docs, "docs", registration.column)
    assert docs.execute("SELECT count(*) FROM docs").fetchone() == (4,)


def test_a_name_with_a_percent_sign_is_refused_before_anything_changes(docs: Any) -> None:
    """psycopg reads '%' in a statement with parameters as a marker, so no search could run on such a column."""
    before = snapshot(docs)
    with pytest.raises(InvalidInput, match="holds '%'"):
        add_embedding(docs, "docs", "emb%(q)s", source="body")
    docs.execute('CREATE TABLE "50%_off" (id int PRIMARY KEY, body text)')
    with pytest.raises(InvalidInput, match="'50%_off'"):
        add_embedding(docs, "50%_off", "embedding", source="body")
    assert snapshot(docs) == before


@pytest.mark.parametrize(("m", "ef_construction"), [(1, 64), (16, 20), (101, 300), (16, 2000)])
def test_hnsw_parameters_are_checked(m: int, ef_construction: int) -> None:
    with pytest.raises(InvalidInput, match="HNSW"):
        HNSW(m, ef_construction)


def test_manual_write_of_a_wrong_dimension_is_refused_by_the_column(docs: Any) -> None:
    add_embedding(docs, "docs", "embedding", source="body")
    with pytest.raises(psycopg.errors.DataException, match="expected 384 dimensions"):
        docs.execute("UPDATE docs SET embedding = '[1, 2, 3]' WHERE id = 1")


def test_a_dropped_table_leaves_no_registration_behind(docs: Any) -> None:
    add_embedding(docs, "docs", "embedding", source="body")
    assert docs.execute("SELECT count(*) FROM pgsim.queue").fetchone() == (2,)
    docs.execute("DROP TABLE docs")
    docs.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")  # the same name, a new table
    registration = add_embedding(docs, "docs", "embedding", source="body")
    assert [r.id for r in registrations(docs)] == [registration.id]
    assert docs.execute("SELECT count(*) FROM pgsim.queue").fetchone() == (0,)  # the old entries went too
