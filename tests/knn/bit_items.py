"""The table the bit-storage tests share: ``items`` (id, section, body, fts, embedding stored as dtype "bit"), owned
by a non-superuser owner, filled by COPY with the Debian sample's vectors and noisy copies of them, with the
worker and the application granted what they need; and its ORM mapping."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psycopg
from fixtures.roles import Roles, acting
from psycopg import sql
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pgsim.columns.adding import add_embedding
from pgsim.columns.grants import grant
from pgsim.demo.corpus import Package
from pgsim.psycopg import register
from pgsim.sqlalchemy import embedding_column

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chunks"))
from chunked_docs import owned_database  # noqa: E402

COPIES = 6  # each sample package's vector and five noisy copies: 2,400 rows, enough to calibrate


@contextmanager
def bit_items(
    server_dsn: str, roles: Roles, packages: list[Package], package_vectors: np.ndarray, label: str
) -> Iterator[tuple[str, np.ndarray, list[str]]]:
    """A database with ``items``: its superuser DSN, the vectors by id and the sections by id."""
    rng = np.random.default_rng(5)
    vectors = np.concatenate([package_vectors] * COPIES)
    vectors[len(package_vectors) :] += rng.normal(0, 0.3 / np.sqrt(384), vectors[len(package_vectors) :].shape)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    sections = [p.section for p in packages] * COPIES
    with owned_database(server_dsn, roles, label) as dsn, psycopg.connect(dsn, autocommit=True) as admin:
        register(admin)
        with acting(admin, roles.owner):
            admin.execute(
                "CREATE TABLE items (id int PRIMARY KEY, section text, body text, fts tsvector "
                "GENERATED ALWAYS AS (to_tsvector('english', coalesce(body, ''))) STORED)"
            )
            add_embedding(admin, "items", "embedding", source="body", dtype="bit", queue_existing=False)
            copying = "COPY items (id, section, body, embedding) FROM STDIN WITH (FORMAT BINARY)"
            with admin.cursor() as cur, cur.copy(copying) as copy:
                copy.set_types(["int4", "text", "text", "vector"])
                for i, vector in enumerate(vectors):
                    copy.write_row((i, sections[i], f"{packages[i % len(packages)].text} (copy {i})", vector))
            admin.execute("DELETE FROM pgsim.queue")  # the vectors are given: nothing for the workers to redo
            admin.execute("ANALYZE items")
            grant(admin, "worker", roles.worker, tables=["items"])
            grant(admin, "search", roles.app, tables=["items"])
            admin.execute(sql.SQL("GRANT INSERT ON items TO {}").format(sql.Identifier(roles.app)))
        yield dsn, vectors, sections


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    section: Mapped[str | None] = mapped_column(String, nullable=True)
    body: Mapped[str | None] = mapped_column(String, nullable=True)
    embedding = embedding_column(source="body", dtype="bit")
