"""Changing what an embedding is made of (issue 22): a new source re-embeds every row in a shadow column and
switches at once; the old source's columns can be dropped right after; a cancelled change keeps the old
column in sync again; stale rows kept or hidden until re-embedded; waiting until a table is in sync."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.database import installed_without_registrations, packages_table

from pgsim.cli.main import main
from pgsim.columns.adding import add_embedding
from pgsim.columns.model_change import change_embedding
from pgsim.columns.registry import get_registration, remove_embedding
from pgsim.columns.waiting import wait_for_sync
from pgsim.columns.worker import Worker, sync
from pgsim.demo.corpus import Package
from pgsim.encoding.encoder import Encoder
from pgsim.errors import InvalidInput
from pgsim.knn.filtered import search

ROWS = 40
BOTH = "concat_ws(E'\\n\\n', synopsis, section)"


@pytest.fixture
def pkgs(conn: psycopg.Connection[Any], packages: list[Package]) -> psycopg.Connection[Any]:
    """``pkgs`` with ROWS packages, embedding = synopsis, filled."""
    installed_without_registrations(conn)
    packages_table(conn, packages[:ROWS], ("section", "synopsis"))
    add_embedding(conn, "pkgs", "embedding", source="synopsis")
    sync(conn)
    return conn


def vectors(conn: psycopg.Connection[Any], column: str = "embedding") -> dict[str, Any]:
    rows = conn.execute(f"SELECT package, {column} FROM pkgs").fetchall()  # noqa: S608 - a test's own column
    return {package: None if v is None else np.asarray(v.to_list(), dtype=np.float32) for package, v in rows}


def texts(conn: psycopg.Connection[Any], expression: str) -> dict[str, str]:
    return dict(conn.execute(f"SELECT package, {expression} FROM pkgs").fetchall())  # noqa: S608


def assert_embeds(conn: psycopg.Connection[Any], encoder: Encoder, expression: str) -> None:
    """Every row's stored vector is the encoding of ``expression`` over the row, as it is now."""
    wanted = texts(conn, expression)
    stored = vectors(conn)
    encoded = encoder.encode(list(wanted.values()))
    worst = max(float(np.abs(stored[p] - v).max()) for p, v in zip(wanted, encoded, strict=True))
    assert worst < 1e-5


def triggers(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'pkgs'::regclass AND NOT tgisinternal")
    return sorted(name for (name,) in rows.fetchall())


def test_a_new_source_re_embeds_every_row_and_switches_at_once(pkgs: Any, encoder: Encoder) -> None:
    old = get_registration(pkgs, "pkgs", "embedding")
    assert old is not None
    new = change_embedding(pkgs, "pkgs", "embedding", source=["synopsis", "section"])
    assert (new.column, new.replaces, new.model) == ("embedding_next", old.id, old.model)
    queued = pkgs.execute("SELECT count(*) FROM pgsim.queue WHERE embedding_id = %s", [new.id]).fetchone()
    assert queued == (ROWS,)  # rows that had vectors too
    assert triggers(pkgs) == [f"pgsim_{new.id}_insert", f"pgsim_{new.id}_update"]  # the old source's went
    before = search(pkgs, "pkgs", "embedding", "chess", k=3)
    pkgs.execute("UPDATE pkgs SET section = 'games' WHERE package = %s", [before[0].row["package"]])
    assert search(pkgs, "pkgs", "embedding", "chess", k=3) == before  # the old column serves, as it was

    report = sync(pkgs)
    assert report.switched == 1 and report.embedded == ROWS
    switched = get_registration(pkgs, "pkgs", "embedding")
    assert switched is not None and (switched.id, switched.replaces) == (new.id, None)
    assert_embeds(pkgs, encoder, BOTH)


def test_a_column_only_the_old_source_read_can_be_dropped_right_after_the_change(
    conn: psycopg.Connection[Any], packages: list[Package], encoder: Encoder
) -> None:
    installed_without_registrations(conn)
    packages_table(conn, packages[:ROWS], ("section", "synopsis"))
    add_embedding(conn, "pkgs", "embedding", source=["synopsis", "section"])
    sync(conn)
    change_embedding(conn, "pkgs", "embedding", source="synopsis")
    conn.execute("ALTER TABLE pkgs DROP COLUMN section")  # no trigger of pgsim's depends on it any more
    assert sync(conn).switched == 1
    assert_embeds(conn, encoder, "synopsis")


def test_a_cancelled_change_of_source_keeps_the_old_column_in_sync_again(pkgs: Any, encoder: Encoder) -> None:
    old = get_registration(pkgs, "pkgs", "embedding")
    assert old is not None
    change_embedding(pkgs, "pkgs", "embedding", source=["synopsis", "section"])
    pkgs.execute("UPDATE pkgs SET synopsis = 'a chess engine' WHERE package = (SELECT min(package) FROM pkgs)")
    remove_embedding(pkgs, "pkgs", "embedding_next")
    assert triggers(pkgs) == [f"pgsim_{old.id}_insert", f"pgsim_{old.id}_update"]
    assert "embedding_next" not in vectors(pkgs) and sync(pkgs).embedded == ROWS  # every row, from its text now
    assert_embeds(pkgs, encoder, "synopsis")


def test_a_change_that_changes_nothing_or_twice_is_refused(pkgs: Any) -> None:
    for unchanged in ({}, {"source": "synopsis"}, {"model": "all-MiniLM-L6-v2", "dtype": "vector"}):
        with pytest.raises(InvalidInput, match="nothing to change"):
            change_embedding(pkgs, "pkgs", "embedding", **unchanged)
    with pytest.raises(InvalidInput, match="has no column 'nope'"):
        change_embedding(pkgs, "pkgs", "embedding", source=["synopsis", "nope"])
    change_embedding(pkgs, "pkgs", "embedding", dtype="halfvec")
    with pytest.raises(InvalidInput, match="under way"):
        change_embedding(pkgs, "pkgs", "embedding", source="section")
    assert pkgs.execute("SELECT count(*) FROM pgsim.embedding").fetchone() == (2,)


def test_the_command_line_changes_the_source(pkgs: Any, database: str, capsys: Any) -> None:
    assert main(["change-embedding", "pkgs", "embedding", "--source", "synopsis", "section", "--dsn", database]) == 0
    assert "filling public.pkgs.embedding_next with vector(384)" in capsys.readouterr().out
    new = get_registration(pkgs, "pkgs", "embedding_next")
    assert new is not None and new.source_columns == ("section", "synopsis")


@pytest.mark.parametrize("stale", ["keep", "hide"])
def test_a_changed_row_keeps_its_old_vector_or_is_hidden_until_re_embedded(
    conn: psycopg.Connection[Any], packages: list[Package], encoder: Encoder, stale: str
) -> None:
    installed_without_registrations(conn)
    packages_table(conn, packages[:ROWS], ("section", "synopsis"))
    registration = add_embedding(conn, "pkgs", "embedding", source="synopsis", stale=stale)
    assert registration.stale == stale
    sync(conn)
    target = search(conn, "pkgs", "embedding", "chess", k=1)[0].row["package"]
    conn.execute("UPDATE pkgs SET synopsis = 'a tool for sorting photos' WHERE package = %s", [target])
    found = [hit.row["package"] for hit in search(conn, "pkgs", "embedding", "chess", k=ROWS)]
    assert (target in found) == (stale == "keep") and len(found) == ROWS - (stale == "hide")
    assert sync(conn).embedded == 1
    assert_embeds(conn, encoder, "synopsis")
    with pytest.raises(InvalidInput, match="stale must be one of keep, hide"):
        add_embedding(conn, "pkgs", "other", source="synopsis", stale="drop")


def test_wait_for_sync_returns_when_a_worker_has_caught_up_and_says_why_it_cannot(
    pkgs: Any, database: str, encoder: Encoder
) -> None:
    pkgs.execute("UPDATE pkgs SET synopsis = synopsis || ' (new)'")
    with pytest.raises(TimeoutError, match=f"{ROWS} rows of pkgs still wait for a worker after 0.2s"):
        wait_for_sync(pkgs, "pkgs", timeout=0.2)
    worker = Worker(database)
    running = threading.Thread(target=worker.run)
    running.start()
    try:
        wait_for_sync(pkgs, "pkgs", timeout=120)
    finally:
        worker.stop.set()
        running.join()
    assert_embeds(pkgs, encoder, "synopsis")
    registration = get_registration(pkgs, "pkgs", "embedding")
    assert registration is not None
    pkgs.execute(
        "INSERT INTO pgsim.dead_letter (embedding_id, key, reason, attempts, enqueued_at) "
        "VALUES (%s, '{\"package\": \"x\"}', 'update', 5, now())",
        [registration.id],
    )
    with pytest.raises(InvalidInput, match="1 rows of pkgs are in pgsim.dead_letter"):
        wait_for_sync(pkgs, "pkgs")
    with pytest.raises(InvalidInput, match="has no registered embedding column"):
        wait_for_sync(pkgs, "pgsim.queue")
