"""The table the prefix-storage tests share: ``items`` (id, section, body, fts, embedding by MODEL with a 64-value
prefix index), owned by a non-superuser owner, filled by COPY with the model's vectors of the Debian sample and
noisy copies of them (2,400 rows, enough to calibrate), with the worker and the application granted what they
need; and its ORM mapping."""

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
from pgsim.encoding.encoder import Encoder
from pgsim.psycopg import register
from pgsim.sqlalchemy import embedding_column

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chunks"))
from chunked_docs import owned_database  # noqa: E402

MODEL = "wordllama-l2-supercat"
PREFIX = 64
COPIES = 6  # each sample package's vector and five noisy copies


@contextmanager
def prefix_items(
    server_dsn: str, roles: Roles, packages: list[Package], label: str
) -> Iterator[tuple[str, np.ndarray]]:
    """A database with ``items``: its superuser DSN and the vectors by id."""
    encoded = np.asarray(Encoder(MODEL).encode([p.text for p in packages]), dtype=np.float32)
    rng = np.random.default_rng(5)
    vectors = np.concatenate([encoded] * COPIES)
    vectors[len(encoded) :] += rng.normal(0, 0.3 / np.sqrt(256), vectors[len(encoded) :].shape)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    with owned_database(server_dsn, roles, label) as dsn, psycopg.connect(dsn, autocommit=True) as admin:
        register(admin)
        with acting(admin, roles.owner):
            admin.execute(
                "CREATE TABLE items (id int PRIMARY KEY, section text, body text, fts tsvector "
                "GENERATED ALWAYS AS (to_tsvector('english', coalesce(body, ''))) STORED)"
            )
            add_embedding(admin, "items", "embedding", source="body", model=MODEL, prefix=PREFIX, queue_existing=False)
            copying = "COPY items (id, section, body, embedding) FROM STDIN WITH (FORMAT BINARY)"
            with admin.cursor() as cur, cur.copy(copying) as copy:
                copy.set_types(["int4", "text", "text", "vector"])
                for i, vector in enumerate(vectors):
                    package = packages[i % len(packages)]
                    copy.write_row((i, package.section, f"{package.text} (copy {i})", vector))
            admin.execute("DELETE FROM pgsim.queue")  # the vectors are given: nothing for the workers to redo
            admin.execute("ANALYZE items")
            grant(admin, "worker", roles.worker, tables=["items"])
            grant(admin, "search", roles.app, tables=["items"])
            admin.execute(sql.SQL("GRANT INSERT ON items TO {}").format(sql.Identifier(roles.app)))
        yield dsn, vectors


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    section: Mapped[str | None] = mapped_column(String, nullable=True)
    body: Mapped[str | None] = mapped_column(String, nullable=True)
    embedding = embedding_column(source="body", model=MODEL, prefix=PREFIX)


def create_parts(conn: psycopg.Connection) -> None:
    """``parts`` (id, body), partitioned by id range into parts_a (below 1200) and parts_b."""
    conn.execute("CREATE TABLE parts (id int, body text, PRIMARY KEY (id)) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE parts_a PARTITION OF parts FOR VALUES FROM (0) TO (1200)")
    conn.execute("CREATE TABLE parts_b PARTITION OF parts FOR VALUES FROM (1200) TO (100000)")


def copy_items_into_parts(conn: psycopg.Connection) -> None:
    """Every row of ``items`` with its vector into the registered ``parts``, queueing nothing."""
    conn.execute("ALTER TABLE parts DISABLE TRIGGER USER")
    conn.execute("INSERT INTO parts (id, body, embedding) SELECT id, body, embedding FROM items")
    conn.execute("ALTER TABLE parts ENABLE TRIGGER USER")
