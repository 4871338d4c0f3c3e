"""pgsim.ingest: rows written with their embeddings by COPY; bad rows refused with nothing written."""

from __future__ import annotations

from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.database import installed_without_registrations

from pgsim.columns.adding import add_embedding
from pgsim.columns.bulk_load import IngestReport, ingest
from pgsim.demo.corpus import Package
from pgsim.errors import InvalidInput

ROWS = 100


@pytest.fixture
def pkgs(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    installed_without_registrations(conn)
    conn.execute("DROP TABLE IF EXISTS pkgs, plain")
    conn.execute(
        "CREATE TABLE pkgs (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, package text UNIQUE, "
        "section text, synopsis text, description text, added timestamptz DEFAULT now())"
    )
    add_embedding(conn, "pkgs", "embedding", source="concat_ws(E'\\n\\n', synopsis, nullif(description, ''))")
    add_embedding(conn, "pkgs", "embedding_half", source="synopsis", dtype="halfvec", index=None)
    return conn


def rows_of(packages: list[Package]) -> list[dict[str, Any]]:
    return [
        {"package": p.package, "section": p.section, "synopsis": p.synopsis, "description": p.description}
        for p in packages
    ]


def test_ingest_writes_rows_with_every_registered_embedding(
    pkgs: Any, packages: list[Package], package_vectors: Any
) -> None:
    progress: list[int] = []
    report = ingest(pkgs, "pkgs", rows_of(packages[:ROWS]), chunk_size=40, progress=lambda r: progress.append(r.rows))
    assert isinstance(report, IngestReport)
    assert (report.rows, report.encoded, report.empty) == (ROWS, 2 * ROWS, 0)
    assert progress == [40, 80, 100]
    assert report.encode_seconds > report.write_seconds > 0
    stored = {
        package: (np.asarray(full.to_list()), np.asarray(half.to_list()))
        for package, full, half in pkgs.execute("SELECT package, embedding, embedding_half FROM pkgs").fetchall()
    }
    assert len(stored) == ROWS
    for p, vector in zip(packages[:ROWS], package_vectors[:ROWS], strict=True):
        assert float(np.abs(stored[p.package][0] - vector).max()) < 1e-5
        assert float(np.abs(stored[p.package][1]).max()) > 0  # halfvec of the synopsis, filled too
    assert pkgs.execute("SELECT count(*) FROM pgsim.queue").fetchone() == (0,)  # nothing left for workers
    assert pkgs.execute("SELECT count(*) FROM pkgs WHERE added IS NULL").fetchone() == (0,)  # defaults applied


def test_rows_without_text_get_null_and_an_entry_the_worker_ends(pkgs: Any) -> None:
    report = ingest(pkgs, "pkgs", [{"package": "empty", "synopsis": "", "description": None}])
    assert (report.rows, report.empty) == (1, 2)
    assert pkgs.execute("SELECT embedding, embedding_half FROM pkgs").fetchone() == (None, None)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"package": "x", "synopsis": "s", "embedding": [0.0] * 384}], "must not carry the embedding"),
        ([{"package": "x", "description": "no synopsis"}], "reads a column the rows do not carry"),
        ([{"package": "x", "synopsis": "a"}, {"package": "y", "synposis": "typo"}], "Row 1 has columns"),
        (["not a mapping"], "mapping"),
        ([{"package": "x", "synopsis": b"bytes, not text"}], "Row 0: 'synopsis' is bytes"),
    ],
)
def test_bad_rows_write_nothing(pkgs: Any, rows: list[Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        ingest(pkgs, "pkgs", rows)
    assert pkgs.execute("SELECT count(*) FROM pkgs").fetchone() == (0,)


def test_a_table_without_registered_column_is_refused(pkgs: Any) -> None:
    pkgs.execute("CREATE TABLE plain (id int PRIMARY KEY, body text)")
    with pytest.raises(InvalidInput, match="no registered embedding column"):
        ingest(pkgs, "plain", [{"id": 1, "body": "text"}])
    with pytest.raises(InvalidInput, match="does not exist"):
        ingest(pkgs, "nope", [{"id": 1}])


def test_a_failing_chunk_rolls_back_alone(pkgs: Any, packages: list[Package]) -> None:
    rows = rows_of(packages[:30]) + rows_of(packages[:1])  # the last chunk repeats a unique package
    with pytest.raises(psycopg.errors.UniqueViolation):
        ingest(pkgs, "pkgs", rows, chunk_size=30)
    assert pkgs.execute("SELECT count(*), count(embedding) FROM pkgs").fetchone() == (30, 30)


def test_a_bad_row_stops_the_ingest_after_the_chunks_before_it_are_written(pkgs: Any, packages: list[Package]) -> None:
    rows = rows_of(packages[:45])
    del rows[40]["section"]  # the third chunk's first row lacks a column
    with pytest.raises(InvalidInput, match="Row 40 has columns"):
        ingest(pkgs, "pkgs", rows, chunk_size=20)
    assert pkgs.execute("SELECT count(*), count(embedding) FROM pkgs").fetchone() == (40, 40)
    staged = pkgs.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'pgsim_ingest%' AND relpersistence = 't'")
    assert staged.fetchone() == (0,)  # no staged chunk left behind


def test_a_model_change_during_an_ingest_stops_it_between_chunks(
    pkgs: Any, packages: list[Package], database: str
) -> None:
    def change_the_registry(report: IngestReport) -> None:
        with psycopg.connect(database, autocommit=True) as other:
            other.execute("UPDATE pgsim.embedding SET model_revision = 'switched' WHERE column_name = 'embedding'")

    with pytest.raises(InvalidInput, match="changed while ingesting"):
        ingest(pkgs, "pkgs", rows_of(packages[:20]), chunk_size=10, progress=change_the_registry)
    assert pkgs.execute("SELECT count(*) FROM pkgs").fetchone() == (10,)  # the first chunk, before the change
