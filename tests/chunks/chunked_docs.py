"""A database shared as in production for the chunk tests: a non-superuser owner installs pgsim and owns the
table, an application role writes and searches, a worker role keeps it in sync (each through SET ROLE on a
superuser's connection, see fixtures.roles)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import psycopg
from fixtures.database import scratch_database
from fixtures.roles import Roles, acting
from psycopg import sql
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pgsim.columns.adding import add_embedding
from pgsim.columns.batches import claim_and_encode
from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.grants import grant
from pgsim.columns.registry import require_registration
from pgsim.columns.worker import SyncReport, sync
from pgsim.encoding.encoder import Encoder, Kind, Vector
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.psycopg import register
from pgsim.sqlalchemy import embedding_column


@contextmanager
def owned_database(server_dsn: str, roles: Roles, label: str) -> Iterator[str]:
    """A database owned by ``roles.owner`` with pgvector, and pgsim installed by the owner; its superuser DSN."""
    from pgsim.db.schema import install

    with scratch_database(server_dsn, label, owner=roles.owner) as dsn:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("CREATE EXTENSION vector")
            with acting(admin, roles.owner):
                install(admin)
        try:
            yield dsn
        finally:
            with psycopg.connect(dsn, autocommit=True) as admin:
                for role in vars(roles).values():
                    admin.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))


def chunked_table(
    admin: psycopg.Connection[Any], roles: Roles, table: str, chunks: Chunks, *, dtype: str = "vector"
) -> None:
    """``table`` (id int primary key, section, body), the owner's, with embedding ``embedding`` of ``body`` chunked
    by ``chunks``; the worker and the application granted what they need (the app writes rows too)."""
    with acting(admin, roles.owner):
        # the chunk tables first (a change's too): a document table dropped leaves them (its registration is
        # forgotten)
        old_chunks = [sql.Identifier(f"{table}__embedding{part}_chunks") for part in ("", "_next")]
        admin.execute(
            sql.SQL("DROP TABLE IF EXISTS {}, {} CASCADE").format(sql.SQL(", ").join(old_chunks), sql.Identifier(table))
        )
        admin.execute(
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, section text, body text)").format(sql.Identifier(table))
        )
        add_embedding(admin, table, "embedding", source="body", dtype=dtype, chunks=chunks)
        grant(admin, "worker", roles.worker, tables=[table])
        grant(admin, "search", roles.app, tables=[table])
        admin.execute(
            sql.SQL("GRANT INSERT, UPDATE, DELETE ON {} TO {}").format(sql.Identifier(table), sql.Identifier(roles.app))
        )


@contextmanager
def chunked_connection(
    dsn: str, roles: Roles, chunks: Chunks, *, dtype: str = "vector"
) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit superuser connection to ``dsn`` with a fresh chunked table ``docs`` (:func:`chunked_table`)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        chunked_table(conn, roles, "docs", chunks, dtype=dtype)
        register(conn)
        yield conn


def document_class(table: str, sync: str, chunks: Chunks | None = None) -> Any:
    """A mapped class over ``table`` (id, section, body) with its embedding of ``body`` kept by ``sync``, declared
    chunked by ``chunks``."""

    class Base(DeclarativeBase):
        pass

    class Doc(Base):
        __tablename__ = table
        id: Mapped[int] = mapped_column(primary_key=True)
        section: Mapped[str | None] = mapped_column(String, nullable=True)
        body: Mapped[str | None] = mapped_column(String, nullable=True)
        embedding = embedding_column(source="body", sync=sync, chunks=chunks)

    return Doc


def engine_as(dsn: str, role: str) -> Any:
    """A SQLAlchemy engine on ``dsn`` whose sessions run as ``role`` (set at connection start)."""
    from psycopg.conninfo import conninfo_to_dict
    from sqlalchemy import create_engine
    from sqlalchemy.engine import URL

    params = conninfo_to_dict(dsn)
    url = URL.create(
        "postgresql+psycopg",
        username=str(params.get("user")),
        password=str(params.get("password") or "") or None,
        host=str(params.get("host")),
        port=int(str(params.get("port"))),
        database=str(params.get("dbname")),
        query={"options": f"-c role={role}"},
    )
    return create_engine(url)


def last_query(statements: list[str]) -> str:
    """The last statement recorded, savepoints aside (the ORM's document path runs in one)."""
    return [statement for statement in statements if "SAVEPOINT" not in statement][-1]


def sync_as_worker(conn: psycopg.Connection[Any], roles: Roles, table: str, **options: Any) -> SyncReport:
    """The worker role's drain of ``table`` (a superuser's session that SET ROLE: allowed explicitly)."""
    with acting(conn, roles.worker):
        return sync(conn, table=table, allow_superuser=True, **options)


def chunk_rows(conn: psycopg.Connection[Any], table: str) -> dict[int, list[tuple[int, int, int, bytes, Any]]]:
    """id -> [(chunk_no, span_start, span_end, digest, vector as numpy)], in chunk order."""
    register(conn)
    found: dict[int, list[tuple[int, int, int, bytes, Any]]] = {}
    rows = conn.execute(
        sql.SQL("SELECT id, chunk_no, span_start, span_end, digest, embedding FROM {} ORDER BY id, chunk_no").format(
            sql.Identifier(f"{table}__embedding_chunks")
        )
    ).fetchall()
    for id_, chunk_no, start, end, digest, vector in rows:
        values = np.asarray(vector.to_list(), dtype=np.float32)
        found.setdefault(id_, []).append((chunk_no, start, end, bytes(digest), values))
    return found


def document_distance(chunks: np.ndarray, query: np.ndarray) -> float:
    """A document's distance from the cosine similarities of its chunks (rows of ``chunks``) to ``query``, by
    numpy: one minus their soft maximum, log-mean-exp at temperature 0.05 (pgsim.knn.documents)."""
    similarities = (chunks @ query) / np.linalg.norm(chunks, axis=1) / np.linalg.norm(query)
    return float(1 - 0.05 * np.log(np.mean(np.exp(similarities / 0.05))))


class CountingEncoder(Encoder):
    """The real encoder, recording the texts of each call."""

    def __init__(self) -> None:
        super().__init__(DEFAULT_MODEL)
        self.warn_truncation = False
        self.calls: list[list[str | None]] = []

    def encode(self, texts: Sequence[str | None], *, kind: Kind = "document", **options: Any) -> list[Vector | None]:
        self.calls.append(list(texts))
        return super().encode(texts, kind=kind, **options)

    @property
    def encoded(self) -> list[str]:
        return [text for call in self.calls for text in call if text is not None]


def one_batch(admin: psycopg.Connection[Any], roles: Roles, encoder: Encoder, *, cache: bool = False) -> Any:
    """One batch (up to 50 rows) of table ``docs``'s queue, claimed and encoded by the worker role with ``encoder``."""
    with acting(admin, roles.worker):
        registration = require_registration(admin, "docs", "embedding")
        return claim_and_encode(admin, registration, encoder, 50, retried=False, max_attempts=5,
                                retry_delay=1.0, cache=cache, encoding=contextlib.nullcontext())  # fmt: skip


def document_vectors(admin: psycopg.Connection[Any], column: str = "embedding") -> dict[int, Any]:
    """id -> the vector in ``column`` of table ``docs`` (numpy, None where NULL)."""
    rows = admin.execute(sql.SQL("SELECT id, {}::vector FROM docs").format(sql.Identifier(column))).fetchall()
    return {doc_id: None if v is None else np.asarray(v, dtype=np.float32) for doc_id, v in rows}


def mean_of(vectors: Sequence[Any]) -> Any:
    """The normalised mean of ``vectors``: what a chunked document's own vector should be."""
    mean = np.mean(np.stack(vectors).astype(np.float64), axis=0)
    return mean / np.linalg.norm(mean)
