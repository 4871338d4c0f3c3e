"""pgsim.Text and checked vectors through psycopg, sync and async, against a real server."""

import asyncio
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.database import scratch_database
from fixtures.model import exact_top_k, load_packages_table

from pgsim import InvalidInput, Text, install, register, register_async
from pgsim.demo.corpus import Package
from pgsim.encoding.encoder import Encoder, encoder_for
from pgsim.errors import InstallError

QUERY = "SELECT package FROM packages WHERE section = %s ORDER BY embedding <=> %s LIMIT 5"


@pytest.fixture(scope="module")
def loaded(database: str, packages: list[Package], package_vectors: np.ndarray[Any, Any]) -> str:
    with psycopg.connect(database, autocommit=True) as conn:
        install(conn)
        load_packages_table(conn, packages, package_vectors, index=False)  # exact order: compare with numpy
    return database


def test_text_parameter_is_encoded_when_bound(
    loaded: str, encoder: Encoder, packages: list[Package], package_vectors: np.ndarray[Any, Any]
) -> None:
    with psycopg.connect(loaded) as conn:
        register(conn)
        rows = conn.execute(QUERY, ["libs", Text("parse json")]).fetchall()
    expected = exact_top_k(
        encoder.encode_query("parse json"), package_vectors, packages, 5, lambda p: p.section == "libs"
    )
    assert [r[0] for r in rows] == expected


def test_async_connection(
    loaded: str, encoder: Encoder, packages: list[Package], package_vectors: np.ndarray[Any, Any]
) -> None:
    async def run() -> list[str]:
        async with await psycopg.AsyncConnection.connect(loaded) as conn:
            await register_async(conn)
            cur = await conn.execute(QUERY, ["utils", Text("compress files")])
            return [r[0] for r in await cur.fetchall()]

    expected = exact_top_k(
        encoder.encode_query("compress files"), package_vectors, packages, 5, lambda p: p.section == "utils"
    )
    assert asyncio.run(run()) == expected


def test_text_is_encoded_once_across_executions(loaded: str) -> None:
    text = Text("manage network interfaces")
    stats = encoder_for("all-MiniLM-L6-v2").stats
    with psycopg.connect(loaded) as conn:
        register(conn)
        before = stats.encoded
        first = conn.execute(QUERY, ["net", text]).fetchall()
        second = conn.execute(QUERY, ["net", text]).fetchall()
    assert first == second and len(first) > 0
    assert stats.encoded - before == 1


def test_numpy_vectors_round_trip_and_nan_is_refused_before_the_server(
    loaded: str, package_vectors: np.ndarray[Any, Any]
) -> None:
    with psycopg.connect(loaded, autocommit=True) as conn:
        register(conn)
        (nearest,) = conn.execute(
            "SELECT package FROM packages ORDER BY embedding <=> %s LIMIT 1", [package_vectors[3]]
        ).fetchone()  # type: ignore[misc]
        (stored,) = conn.execute("SELECT embedding FROM packages WHERE package = %s", [nearest]).fetchone()  # type: ignore[misc]
        assert np.allclose(stored.to_numpy(), package_vectors[3])
        bad = package_vectors[3].copy()
        bad[7] = np.nan
        with pytest.raises(InvalidInput, match="nan at position 7"):
            conn.execute("SELECT embedding <=> %s FROM packages LIMIT 1", [bad])
        assert conn.execute("SELECT count(*) FROM packages").fetchone() == (len(package_vectors),)


def test_blank_text_is_refused() -> None:
    with pytest.raises(InvalidInput, match="non-empty query text"):
        Text(" ")


def test_register_without_pgvector_says_what_to_run(server_dsn: str) -> None:
    with scratch_database(server_dsn, "no_vector") as dsn, psycopg.connect(dsn) as conn:
        with pytest.raises(InstallError, match="pgsim install"):
            register(conn)
