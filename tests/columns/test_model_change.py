"""Switching a column to another model: filled in the background, switched in one transaction, and no query
ever compares vectors of two models. The second model is real: MiniLM with a fixed projection to 128-d."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.database import installed_without_registrations, packages_table

from pgsim.columns.adding import add_embedding
from pgsim.columns.model_change import change_model
from pgsim.columns.registry import get_registration, registrations, remove_embedding
from pgsim.columns.worker import sync
from pgsim.demo.corpus import Package
from pgsim.encoding.encoder import Encoder
from pgsim.errors import InvalidInput
from pgsim.knn.filtered import search

ROWS = 60


@pytest.fixture
def pkgs(conn: psycopg.Connection[Any], packages: list[Package]) -> psycopg.Connection[Any]:
    """``pkgs`` with ROWS packages embedded by all-MiniLM-L6-v2 and an HNSW index."""
    installed_without_registrations(conn)
    packages_table(conn, packages[:ROWS], ("section", "synopsis"))
    add_embedding(conn, "pkgs", "embedding", source="synopsis")
    sync(conn)
    return conn


def column_types(conn: psycopg.Connection[Any]) -> dict[str, str]:
    return dict(
        conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'pkgs'::regclass AND attnum > 0 AND NOT attisdropped"
        ).fetchall()
    )


def test_model_change_fills_a_new_column_then_switches_in_one_go(
    pkgs: Any, small_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    old = get_registration(pkgs, "pkgs", "embedding")
    assert old is not None and old.index_name is not None
    before = search(pkgs, "pkgs", "embedding", "play chess", k=3)  # caches the column's registration
    new = change_model(pkgs, "pkgs", "embedding", small_model)
    assert (new.column, new.dimension, new.replaces) == ("embedding_next", 128, old.id)
    assert column_types(pkgs)["embedding_next"] == "vector(128)"
    assert pkgs.execute("SELECT count(*) FROM pgsim.queue WHERE embedding_id = %s", [new.id]).fetchone() == (ROWS,)

    # meanwhile searches use the old column with the old model, and a write is queued for both models
    assert search(pkgs, "pkgs", "embedding", "play chess", k=3) == before
    with pytest.raises(InvalidInput, match="holds embeddings of model 'all-MiniLM-L6-v2'"):
        search(pkgs, "pkgs", "embedding", "play chess", model=small_model)
    pkgs.execute("INSERT INTO pkgs VALUES ('late-row', 'games', 'a chess program written during the change')")

    report = sync(pkgs)
    assert report.switched == 1 and report.embedded == ROWS + 1 + 1  # the new column's rows, and the late row
    assert column_types(pkgs)["embedding"] == "vector(128)" and "embedding_next" not in column_types(pkgs)
    switched = get_registration(pkgs, "pkgs", "embedding")
    assert switched is not None and (switched.id, switched.model, switched.replaces) == (new.id, small_model, None)
    assert [r.id for r in registrations(pkgs)] == [new.id]
    index = pkgs.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", [old.index_name]).fetchone()
    assert index is not None and "(embedding vector_cosine_ops)" in index[0]
    triggers = pkgs.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'pkgs'::regclass ORDER BY 1").fetchall()
    assert triggers == [(f"pgsim_{new.id}_insert",), (f"pgsim_{new.id}_update",)]

    rows = pkgs.execute("SELECT synopsis, embedding FROM pkgs ORDER BY package").fetchall()
    expected = Encoder(small_model).encode([synopsis for synopsis, _ in rows])
    for (_, stored), vector in zip(rows, expected, strict=True):
        assert float(np.abs(np.asarray(stored.to_list()) - vector).max()) < 1e-5

    # the cached registration named the old model: the statement's own check refused it, and search retried
    with caplog.at_level(logging.INFO, logger="pgsim.knn.filtered"):
        hits = search(pkgs, "pkgs", "embedding", "play chess", k=3)
    assert "searching again" in caplog.text
    assert len(hits) == 3 and hits[0].row["package"] == "late-row"


def test_the_statement_refuses_a_query_of_another_model(pkgs: Any) -> None:
    check = "SELECT pgsim.expect_model('public', 'pkgs', 'embedding', %s, %s)"
    registration = get_registration(pkgs, "pkgs", "embedding")
    assert registration is not None
    assert pkgs.execute(check, [registration.model, registration.model_revision]).fetchone() == (True,)
    assert pkgs.execute(check, [None, None]).fetchone() == (True,)  # a vector from the caller: not checked
    with pytest.raises(psycopg.errors.DataException, match="holds embeddings of model all-MiniLM-L6-v2"):
        pkgs.execute(check, ["other-model", "0"])


def test_a_model_with_other_files_under_the_same_name_is_refused(pkgs: Any) -> None:
    pkgs.execute("UPDATE pgsim.embedding SET model_revision = 'elsewhere'")
    with pytest.raises(InvalidInput, match="revision elsewhere"):
        search(pkgs, "pkgs", "embedding", "play chess")
    pkgs.execute("INSERT INTO pkgs VALUES ('queued', 'games', 'waits for the right model')")
    with pytest.raises(InvalidInput, match="change-model"):
        sync(pkgs)
    assert pkgs.execute("SELECT count(*) FROM pgsim.queue").fetchone() == (1,)  # not dead-lettered: kept


def test_change_model_refuses_what_cannot_work(pkgs: Any, small_model: str) -> None:
    with pytest.raises(InvalidInput, match="already holds"):
        change_model(pkgs, "pkgs", "embedding", "all-MiniLM-L6-v2")
    new = change_model(pkgs, "pkgs", "embedding", small_model)
    with pytest.raises(InvalidInput, match="under way"):
        change_model(pkgs, "pkgs", "embedding", small_model)
    remove_embedding(pkgs, "pkgs", "embedding")  # takes the change under way with it
    assert registrations(pkgs) == [] and "embedding_next" not in column_types(pkgs)
    assert new.id not in [r for (r,) in pkgs.execute("SELECT embedding_id FROM pgsim.queue").fetchall()]


def test_no_switch_while_rows_of_the_new_model_are_dead_letters(pkgs: Any, small_model: str) -> None:
    new = change_model(pkgs, "pkgs", "embedding", small_model)
    pkgs.execute(
        "INSERT INTO pgsim.dead_letter (embedding_id, key, reason, attempts, last_error, enqueued_at) "
        "VALUES (%s, '{\"package\": \"x\"}', 'test', 5, 'failed', now())",
        [new.id],
    )
    report = sync(pkgs)
    assert report.switched == 0 and report.embedded == ROWS
    assert "embedding_next" in column_types(pkgs) and column_types(pkgs)["embedding"] == "vector(384)"
    pkgs.execute("DELETE FROM pgsim.dead_letter")
    assert sync(pkgs).switched == 1


def test_a_cancelled_change_is_not_switched_and_its_column_not_reused(pkgs: Any, small_model: str) -> None:
    change_model(pkgs, "pkgs", "embedding", small_model)
    remove_embedding(pkgs, "pkgs", "embedding_next", drop_column=False)
    assert sync(pkgs).switched == 0 and column_types(pkgs)["embedding"] == "vector(384)"
    with pytest.raises(InvalidInput, match="exists already"):
        change_model(pkgs, "pkgs", "embedding", small_model)
