"""Issue 18: pgsim in a database shared by roles, run the way it is meant to be. The non-superuser owner
installs pgsim and registers its table; ``pgsim grant`` makes a worker role and an application role; the
worker keeps the column in sync with only those privileges, the application searches from Python, SQL and
the ORM. A superuser worker refuses another owner's table; rows hidden by row-level security are reported,
not dropped; a rename during a drain loses nothing; a pooled connection that changes role gets that role's
columns."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.alembic_project import sqlalchemy_url
from fixtures.database import dsn_for
from fixtures.roles import Roles, acting
from psycopg import sql
from sqlalchemy import Integer, String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pgsim.cli.main import main
from pgsim.columns.adding import add_embedding
from pgsim.columns.batches import SyncReport
from pgsim.columns.grants import grant
from pgsim.columns.registry import Registration
from pgsim.columns.worker import Worker, backfill, sync
from pgsim.db.hnsw import HNSW
from pgsim.demo.corpus import Package
from pgsim.encoding.encoder import Encoder
from pgsim.errors import InvalidInput
from pgsim.knn.filtered import search
from pgsim.psycopg import Text, register
from pgsim.sqlalchemy import Embedding

ROWS = 60


class Base(DeclarativeBase):
    pass


class Article(Base):
    __tablename__ = "articles"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    section: Mapped[str] = mapped_column(String)
    embedding = mapped_column(Embedding(384, "all-MiniLM-L6-v2"))


@pytest.fixture(scope="module")
def admin(shared: str) -> Iterator[psycopg.Connection[Any]]:
    """The test's superuser connection; each test acts as a role through SET ROLE."""
    with psycopg.connect(shared, autocommit=True) as conn:
        register(conn)
        yield conn


def login(admin: psycopg.Connection[Any], shared: str, role: str) -> psycopg.Connection[Any]:
    """A connection that logs in as ``role`` itself: a worker's session must not be one that may become a
    superuser (SET ROLE from the test's superuser would be refused)."""
    admin.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role)))
    conn = psycopg.connect(dsn_for(shared, user=role), autocommit=True)
    register(conn)
    return conn


@pytest.fixture(scope="module")
def as_worker(admin: psycopg.Connection[Any], shared: str, roles: Roles) -> Iterator[psycopg.Connection[Any]]:
    with login(admin, shared, roles.worker) as conn:
        yield conn


@pytest.fixture(scope="module")
def as_owner(admin: psycopg.Connection[Any], shared: str, roles: Roles) -> Iterator[psycopg.Connection[Any]]:
    with login(admin, shared, roles.owner) as conn:
        yield conn


def make_table(admin: psycopg.Connection[Any], roles: Roles, name: str, packages: list[Package]) -> Registration:
    """``name`` (the owner's): id, section, synopsis, and a column only the owner reads; registered."""
    with acting(admin, roles.owner):
        admin.execute(
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, section text, synopsis text, secret text)").format(
                sql.Identifier(name)
            )
        )
        with admin.cursor() as cur:
            cur.executemany(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, 'the owner''s')").format(sql.Identifier(name)),
                [(i, p.section, p.synopsis) for i, p in enumerate(packages)],
            )
        return add_embedding(admin, name, "embedding", source="synopsis", index=HNSW(), queue_existing=True)


@pytest.fixture(scope="module")
def articles(admin: psycopg.Connection[Any], roles: Roles, packages: list[Package]) -> Registration:
    """``articles`` with ROWS packages, filled by the worker role (pgsim grant worker) and searchable by the
    application role (pgsim grant search)."""
    registration = make_table(admin, roles, "articles", packages[:ROWS])
    with acting(admin, roles.owner):
        grant(admin, "worker", roles.worker)
        grant(admin, "search", roles.app, tables=["articles"])
    return registration


@pytest.fixture(scope="module")
def filled(as_worker: psycopg.Connection[Any], articles: Registration) -> SyncReport:
    return sync(as_worker, table="articles")


def stored(admin: psycopg.Connection[Any], table: str = "articles") -> dict[int, Any]:
    rows = admin.execute(sql.SQL("SELECT id, embedding FROM {}").format(sql.Identifier(table))).fetchall()
    return {i: None if v is None else np.asarray(v.to_list(), dtype=np.float32) for i, v in rows}


def test_a_worker_role_fills_the_column_with_only_what_pgsim_grant_gives_it(
    admin: psycopg.Connection[Any], roles: Roles, filled: SyncReport, packages: list[Package], encoder: Encoder
) -> None:
    assert (filled.embedded, filled.failed, filled.dead, filled.missing) == (ROWS, 0, 0, 0)
    expected = encoder.encode([p.synopsis for p in packages[:ROWS]])
    vectors = stored(admin)
    assert max(float(np.abs(vectors[i] - v).max()) for i, v in enumerate(expected)) < 1e-5
    with acting(admin, roles.worker):  # nothing beyond the key, the source and the embedding
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            admin.execute("SELECT secret FROM articles LIMIT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            admin.execute("UPDATE articles SET synopsis = 'rewritten'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            admin.execute("UPDATE pgsim.embedding SET source = 'secret'")


def test_an_application_role_searches_from_python_sql_and_the_orm(
    admin: psycopg.Connection[Any], roles: Roles, filled: SyncReport, packages: list[Package], encoder: Encoder
) -> None:
    query, section = "a library for parsing", packages[0].section
    vectors = stored(admin)
    query_vector = encoder.encode([query])[0]
    order = np.argsort(-(np.stack([vectors[i] for i in range(ROWS)]) @ query_vector))
    expected = [int(i) for i in order if packages[int(i)].section == section][:5]
    assert len(expected) == 5 or len(expected) == sum(p.section == section for p in packages[:ROWS])

    with acting(admin, roles.app):
        hits = search(admin, "articles", "embedding", query, k=5, where={"section": section}, columns=["id"])
        from_sql = admin.execute(
            "SELECT (r.row ->> 'id')::int FROM pgsim.knn('articles', 'embedding', %s, 5, %s) AS r",
            [Text(query), sql.SQL("section = {}").format(sql.Literal(section)).as_string(admin)],
        ).fetchall()
    assert [hit.row["id"] for hit in hits] == expected
    assert [i for (i,) in from_sql] == expected

    engine = create_engine(sqlalchemy_url(admin.info.dsn))
    event.listen(engine, "connect", lambda dbapi, _: dbapi.execute(f'SET ROLE "{roles.app}"'))
    try:
        with Session(engine) as session:
            found = session.scalars(
                select(Article.id).where(Article.section == section).order_by(Article.embedding.nearest(query)).limit(5)
            ).all()
    finally:
        engine.dispose()
    assert list(found) == expected


def test_a_superuser_worker_refuses_another_owners_table_unless_told(
    admin: psycopg.Connection[Any], shared: str, roles: Roles, articles: Registration, filled: SyncReport
) -> None:
    admin.execute("UPDATE articles SET synopsis = synopsis || ' (revised)' WHERE id = 0")  # one row queued
    queued = "SELECT count(*) FROM pgsim.queue WHERE embedding_id = %s"
    assert admin.execute(queued, [articles.id]).fetchone() == (1,)
    refused = f"superuser or BYPASSRLS role.*articles \\({roles.owner}\\)"
    for run in (lambda: sync(admin), lambda: sync(admin, table="articles"), lambda: backfill(admin, "articles")):
        with pytest.raises(InvalidInput, match=refused):
            run()
    with acting(admin, roles.worker), pytest.raises(InvalidInput, match="may become"):
        sync(admin, table="articles")  # a superuser's session as the worker role: SET ROLE is no way out
    worker = Worker(admin.info.dsn, table="articles")
    assert worker.run(until_empty=True).embedded == 0  # refused, logged, nothing done
    bypass = f"{roles.worker}_bypass"
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN BYPASSRLS").format(sql.Identifier(bypass)))
    grant(admin, "worker", bypass)  # as a superuser: pgsim's objects and every table
    try:
        with psycopg.connect(dsn_for(shared, user=bypass), autocommit=True) as as_bypass:
            with pytest.raises(InvalidInput, match=refused):
                sync(as_bypass, table="articles")
    finally:
        admin.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(bypass)))
    assert admin.execute(queued, [articles.id]).fetchone() == (1,)
    assert sync(admin, table="articles", allow_superuser=True).embedded == 1  # told so explicitly


def test_rows_hidden_from_the_worker_by_row_level_security_are_reported_not_dropped(
    admin: psycopg.Connection[Any], as_worker: psycopg.Connection[Any], roles: Roles, packages: list[Package]
) -> None:
    registration = make_table(admin, roles, "private", packages[:6])
    with acting(admin, roles.owner):
        grant(admin, "worker", roles.worker, tables=["private"])  # before the table had row-level security
        admin.execute("ALTER TABLE private ENABLE ROW LEVEL SECURITY")
        admin.execute("CREATE POLICY own_section ON private USING (section = current_user)")
    first = sync(as_worker, table="private", max_attempts=2, retry_delay=0)
    assert (first.missing, first.embedded, first.dead) == (0, 0, 6)
    letters = admin.execute(
        "SELECT last_error FROM pgsim.dead_letter WHERE embedding_id = %s", [registration.id]
    ).fetchall()
    assert len(letters) == 6 and all("row-level security" in error for (error,) in letters)

    with acting(admin, roles.owner):
        statements = grant(admin, "worker", roles.worker, tables=["private"])  # now with the worker's policies
        assert sum(statement.startswith("CREATE POLICY") for statement in statements) == 2
        assert admin.execute("SELECT pgsim.requeue_dead_letters()").fetchone() == (6,)
    second = sync(as_worker, table="private")
    assert (second.embedded, second.dead) == (6, 0)
    assert all(vector is not None for vector in stored(admin, "private").values())


def test_a_table_renamed_during_a_drain_loses_no_row_to_the_dead_letters(
    admin: psycopg.Connection[Any],
    as_worker: psycopg.Connection[Any],
    shared: str,
    roles: Roles,
    packages: list[Package],
) -> None:
    make_table(admin, roles, "moving", packages[:30])
    with acting(admin, roles.owner):
        grant(admin, "worker", roles.worker, tables=["moving"])
    renamed = threading.Event()

    def rename_once(report: SyncReport, total: int) -> None:
        if not renamed.is_set():
            with psycopg.connect(shared, autocommit=True) as other, acting(other, roles.owner):
                other.execute("ALTER TABLE moving RENAME TO moved")
            renamed.set()

    report = sync(as_worker, table="moving", batch_size=5, progress=rename_once)
    assert renamed.is_set()
    assert (report.embedded, report.failed, report.dead, report.missing) == (30, 0, 0, 0)
    assert admin.execute("SELECT count(embedding) FROM moved").fetchone() == (30,)


def test_a_pooled_connection_that_changes_role_gets_that_roles_columns(
    admin: psycopg.Connection[Any], roles: Roles, filled: SyncReport
) -> None:
    tenant = sql.Identifier(roles.tenant)
    with acting(admin, roles.owner):
        grant(admin, "search", roles.tenant)
        admin.execute(sql.SQL("GRANT SELECT (id, section, synopsis, embedding) ON articles TO {}").format(tenant))
        owners_view = search(admin, "articles", "embedding", "chess", k=2)
    with acting(admin, roles.tenant):  # the same connection, as another role: its own columns, no error
        as_tenant = search(admin, "articles", "embedding", "chess", k=2)
    assert "secret" in owners_view[0].row and "secret" not in as_tenant[0].row
    assert [hit.row["id"] for hit in as_tenant] == [hit.row["id"] for hit in owners_view]


def test_grants_from_the_command_line_and_their_limits(
    admin: psycopg.Connection[Any], shared: str, roles: Roles, articles: Registration, capsys: Any
) -> None:
    probe = "SELECT has_table_privilege(%s, 'pgsim.queue', 'DELETE'), has_column_privilege(%s, 'articles', " \
        "'embedding', 'UPDATE')"  # fmt: skip
    assert main(["grant", "worker", roles.tenant, "--table", "articles", "--dsn", shared]) == 0
    assert 'GRANT UPDATE ("embedding") ON TABLE "public"."articles"' in capsys.readouterr().out
    assert admin.execute(probe, [roles.tenant, roles.tenant]).fetchone() == (True, True)
    assert main(["revoke", "worker", roles.tenant, "--table", "articles", "--dsn", shared]) == 0
    assert admin.execute(probe, [roles.tenant, roles.tenant]).fetchone() == (False, False)
    assert main(["grant", "search", "no such role", "--dsn", shared]) == 2
    assert "There is no role 'no such role'" in capsys.readouterr().err
    with acting(admin, roles.app), pytest.raises(InvalidInput, match="Run this as one of them"):
        grant(admin, "worker", roles.app)  # owns neither pgsim nor a table
    with acting(admin, roles.tenant), pytest.raises(InvalidInput, match="may not use schema pgsim"):
        grant(admin, "search", roles.tenant, tables=["articles"])  # revoke took its USAGE on pgsim
    grant(admin, "search", roles.tenant)
    with acting(admin, roles.tenant), pytest.raises(InvalidInput, match="Only the owner of public.articles"):
        grant(admin, "search", roles.tenant, tables=["articles"])


def test_a_register_role_registers_its_own_tables_and_works_them_with_its_own_worker(
    admin: psycopg.Connection[Any], as_worker: psycopg.Connection[Any], roles: Roles, articles: Registration
) -> None:
    with acting(admin, roles.owner):
        grant(admin, "register", roles.tenant)
    with acting(admin, roles.tenant):
        admin.execute("INSERT INTO tenant.notes VALUES (1, 'a note about chess'), (2, 'a note about go')")
        notes = add_embedding(admin, "tenant.notes", "embedding", source="body", index=None, queue_existing=True)
        with pytest.raises(InvalidInput, match="permission denied for table articles"):
            add_embedding(admin, "articles", "embedding_2", source="synopsis", index=None)
        # not pgsim's owner: its grant gives the worker the table's privileges only
        statements = grant(admin, "worker", roles.worker, tables=["tenant.notes"])
        admin.execute(sql.SQL("GRANT USAGE ON SCHEMA tenant TO {}").format(sql.Identifier(roles.worker)))
    assert statements and all('"tenant"."notes"' in statement for statement in statements)
    report = sync(as_worker, table="tenant.notes")
    assert report.embedded == 2
    with acting(admin, roles.tenant):
        admin.execute("UPDATE tenant.notes SET body = 'a longer note about chess' WHERE id = 1")
    with acting(admin, roles.owner):
        grant(admin, "worker", roles.app, tables=["articles"])  # a worker of the articles, not of the notes
    entry = {"id": notes.id}
    with acting(admin, roles.app):
        assert admin.execute("DELETE FROM pgsim.queue WHERE embedding_id = %(id)s", entry).rowcount == 0
        assert admin.execute("UPDATE pgsim.queue SET attempts = 99 WHERE embedding_id = %(id)s", entry).rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            admin.execute(
                "INSERT INTO pgsim.queue (embedding_id, key, reason) VALUES (%(id)s, '{\"id\": 2}', 'x')", entry
            )
    with acting(admin, roles.worker):  # the notes' worker takes it
        assert admin.execute("DELETE FROM pgsim.queue WHERE embedding_id = %(id)s", entry).rowcount == 1


def test_a_model_change_is_filled_by_the_worker_role_and_switched_by_the_owner(
    admin: psycopg.Connection[Any],
    as_worker: psycopg.Connection[Any],
    as_owner: psycopg.Connection[Any],
    roles: Roles,
    packages: list[Package],
    small_model: str,
) -> None:
    from pgsim.columns.model_change import change_model

    make_table(admin, roles, "changing", packages[:12])
    with acting(admin, roles.owner):
        grant(admin, "worker", roles.worker, tables=["changing"])
    assert sync(as_worker, table="changing").embedded == 12
    with acting(admin, roles.owner):
        new = change_model(admin, "changing", "embedding", small_model)
    filling = sync(as_worker, table="changing")  # the new column took the old one's grants: the worker fills it
    assert (filling.embedded, filling.failed, filling.switched) == (12, 0, 0)  # the switch is the owner's
    assert sync(as_owner, table="changing").switched == 1
    switched = admin.execute("SELECT model, column_name FROM pgsim.embedding WHERE id = %s", [new.id]).fetchone()
    assert switched == (small_model, "embedding")
    assert admin.execute(  # and the renamed column keeps them for the next change
        "SELECT has_column_privilege(%s, 'changing', 'embedding', 'UPDATE')", [roles.worker]
    ).fetchone() == (True,)
