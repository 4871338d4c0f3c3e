"""Issue 18, the least-privilege worker under attack, what other roles read and write around it: a register role
planting a vector in the embedding cache for a text the owner's worker will encode, or reading which texts it
encoded; a role that reads a column of a table reading that table's queue and dead letters; a tenant that
renames its embedding column to break every other role's reads of the queue; two worker roles whose names
differ only after the 60th character. The worker logs in as itself. The drains: test_worker_attacks.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.database import dsn_for
from fixtures.roles import Roles, acting
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgsim.columns.adding import add_embedding
from pgsim.columns.cache import _digest
from pgsim.columns.grants import grant, revoke
from pgsim.columns.registry import Registration
from pgsim.columns.worker import sync
from pgsim.encoding.encoder import Encoder

DEAD_LETTER = (
    "INSERT INTO pgsim.dead_letter (embedding_id, key, reason, attempts, last_error, enqueued_at) "
    "VALUES (%s, %s, 'update', 5, %s, now())"
)


@pytest.fixture(scope="module")
def admin(shared: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(shared, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def docs(admin: psycopg.Connection[Any], roles: Roles) -> Registration:
    """public.docs registered by its owner (two rows queued), the owner's worker role (which logs in), and the
    tenant a register role."""
    with acting(admin, roles.owner):
        registration = add_embedding(admin, "docs", "embedding", source="body", index=None, queue_existing=True)
        grant(admin, "worker", roles.worker)
        grant(admin, "register", roles.tenant)
    login = sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(roles.worker))
    password = conninfo_to_dict(admin.info.dsn).get("password")  # a server that asks for one (a container)
    admin.execute(login + (sql.SQL(" PASSWORD {}").format(sql.Literal(password)) if password else sql.SQL("")))
    return registration


@pytest.fixture
def worker(shared: str, roles: Roles, docs: Registration) -> Iterator[psycopg.Connection[Any]]:
    """A session of the worker role itself (not SET ROLE from a superuser's)."""
    with psycopg.connect(dsn_for(shared, user=roles.worker), autocommit=True) as conn:
        yield conn


def seen(conn: psycopg.Connection[Any], query: str, params: list[Any] | None = None) -> list[Any]:
    """The rows ``query`` gives the current role; none when it may not read them at all."""
    try:
        return conn.execute(query, params).fetchall()
    except psycopg.errors.InsufficientPrivilege:
        return []


def test_a_register_role_can_neither_plant_a_cached_vector_for_the_owners_worker_nor_read_its_entries(
    admin: psycopg.Connection[Any], worker: psycopg.Connection[Any], roles: Roles, docs: Registration, encoder: Encoder
) -> None:
    text = "Vacuum tuning guide"  # a text the tenant expects the owner's table to hold
    entry = [encoder.model_name, encoder.revision, _digest(encoder, text)]
    with acting(admin, roles.tenant):  # no privilege on public.docs at all
        admin.execute(
            "INSERT INTO pgsim.embedding_cache (model, model_revision, digest, embedding) "
            "VALUES (%s, %s, %s, array_fill(0.25, ARRAY[384])::vector)",
            entry,
        )
    with acting(admin, roles.owner):
        admin.execute("INSERT INTO docs (id, section, body) VALUES (10, 'db', %s)", [text])
    (docs_queued,) = admin.execute("SELECT count(*) FROM pgsim.queue WHERE embedding_id = %s", [docs.id]).fetchall()
    report = sync(worker, table="docs", cache=True)
    stored = admin.execute("SELECT embedding::real[] FROM docs WHERE id = 10").fetchone()
    assert stored is not None and float(np.abs(np.asarray(stored[0]) - encoder.encode([text])[0]).max()) < 1e-5
    assert (report.embedded, report.cached) == (docs_queued[0], 0)  # the tenant's entry was not found

    worker_entry = [encoder.model_name, encoder.revision, _digest(encoder, "Tuning Postgres")]  # docs' row 1
    lookup = "SELECT count(*) FROM pgsim.embedding_cache WHERE model = %s AND model_revision = %s AND digest = %s"
    assert admin.execute(lookup, worker_entry).fetchone() == (1,)  # the worker stored it
    with acting(admin, roles.tenant):
        assert seen(admin, lookup, worker_entry) in ([], [(0,)])  # which texts the owner holds: not the tenant's
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            admin.execute(  # nor an entry in the worker's name
                "INSERT INTO pgsim.embedding_cache (model, model_revision, digest, embedding, stored_by) "
                "SELECT %s, %s, %s, array_fill(0.25, ARRAY[384])::vector, oid FROM pg_roles WHERE rolname = %s",
                [*entry[:2], _digest(encoder, "Another text"), roles.worker],
            )


def test_a_role_that_reads_a_column_of_a_table_reads_none_of_its_queue_and_dead_letters(
    admin: psycopg.Connection[Any], roles: Roles, docs: Registration
) -> None:
    with acting(admin, roles.owner):
        admin.execute("CREATE TABLE ledger (id int PRIMARY KEY, section text, body text)")
        admin.execute("INSERT INTO ledger VALUES (1, 'open', 'an open entry'), (2, 'closed', 'a closed entry')")
        ledger = add_embedding(admin, "ledger", "embedding", source="body", index=None, queue_existing=True)
        admin.execute(DEAD_LETTER, [ledger.id, '{"id": 2}', "failed on: a closed entry"])
        admin.execute("ALTER TABLE ledger ENABLE ROW LEVEL SECURITY")
        tenant = sql.Identifier(roles.tenant)
        admin.execute(
            sql.SQL("CREATE POLICY open_rows ON ledger FOR SELECT TO {} USING (section = 'open')").format(tenant)
        )
        admin.execute(sql.SQL("GRANT SELECT (id, section) ON ledger TO {}").format(tenant))
        admin.execute("CREATE TABLE vault (id int PRIMARY KEY, body text)")
        add_embedding(admin, "vault", "embedding", source="body", index=None)
    assert admin.execute("SELECT count(*) FROM pgsim.queue WHERE embedding_id = %s", [ledger.id]).fetchone() == (2,)
    with acting(admin, roles.tenant):  # a register role: it may read pgsim.queue, dead_letter and sync_status
        assert admin.execute("SELECT id FROM ledger").fetchall() == [(1,)]
        queue = seen(admin, "SELECT key FROM pgsim.queue WHERE embedding_id = %s", [ledger.id])
        letters = seen(admin, "SELECT key, last_error FROM pgsim.dead_letter WHERE embedding_id = %s", [ledger.id])
        status = {name for (name,) in seen(admin, "SELECT table_name FROM pgsim.sync_status")}
    assert (queue, letters) == ([], [])
    assert "public.ledger" in status and not status & {"public.vault", "public.docs"}  # only tables it may read


def test_a_tenant_renaming_its_embedding_column_breaks_no_other_roles_reads_of_the_queue(
    admin: psycopg.Connection[Any], worker: psycopg.Connection[Any], roles: Roles, docs: Registration
) -> None:
    with acting(admin, roles.tenant):
        admin.execute("CREATE TABLE tenant.memos (id int PRIMARY KEY, body text)")
        admin.execute("INSERT INTO tenant.memos VALUES (1, 'a memo'), (2, 'another memo')")
        memos = add_embedding(admin, "tenant.memos", "embedding", source="body", index=None, queue_existing=True)
        admin.execute(DEAD_LETTER, [memos.id, '{"id": 1}', "failed"])
        admin.execute("ALTER TABLE tenant.memos RENAME COLUMN embedding TO renamed")
    with acting(admin, roles.owner):
        grant(admin, "register", roles.app)  # another role with privileges on the queue, owning no table
        admin.execute("UPDATE docs SET body = body || ' (revised)' WHERE id = 2")
    with acting(admin, roles.app):
        assert admin.execute("SELECT count(*) FROM pgsim.queue").fetchone() == (0,)
        assert admin.execute("SELECT count(*) FROM pgsim.dead_letter").fetchone() == (0,)
        assert admin.execute("SELECT pgsim.requeue_dead_letters()").fetchone() == (0,)
    (docs_queued,) = admin.execute("SELECT count(*) FROM pgsim.queue WHERE embedding_id = %s", [docs.id]).fetchall()
    assert worker.execute("SELECT count(*) FROM pgsim.queue").fetchall() == [docs_queued]  # its table's only
    assert worker.execute("SELECT pgsim.requeue_dead_letters()").fetchone() == (0,)
    report = sync(worker, table="docs", progress=lambda report, total: None)
    assert (report.embedded, report.failed) == (docs_queued[0], 0)
    assert admin.execute("SELECT count(*) FROM pgsim.queue WHERE embedding_id = %s", [memos.id]).fetchone() == (2,)


def test_worker_policies_of_roles_whose_names_share_sixty_characters_are_each_their_own(
    admin: psycopg.Connection[Any], roles: Roles, docs: Registration
) -> None:
    stem = f"{roles.worker}_{'w' * 60}"[:60]
    first, second = f"{stem}_a1", f"{stem}_b2"  # 63 characters, the longest name PostgreSQL keeps
    for role in (first, second):
        admin.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    policies = (
        "SELECT polname, polcmd, pg_get_expr(polqual, polrelid), ARRAY(SELECT rolname::text FROM pg_roles "
        "WHERE oid = ANY(polroles) ORDER BY 1) FROM pg_policy WHERE polrelid = 'guarded'::regclass ORDER BY 1"
    )
    try:
        with acting(admin, roles.owner):
            admin.execute("CREATE TABLE guarded (id int PRIMARY KEY, body text)")
            admin.execute("INSERT INTO guarded VALUES (1, 'one'), (2, 'two'), (3, 'three')")
            add_embedding(admin, "guarded", "embedding", source="body", index=None)
            admin.execute("ALTER TABLE guarded ENABLE ROW LEVEL SECURITY")
            grant(admin, "worker", first, tables=["guarded"])
            grant(admin, "worker", second, tables=["guarded"])
            made = admin.execute(policies).fetchall()
            assert sorted((command, names) for _, command, _, names in made) == [
                ("r", [first]), ("r", [second]), ("w", [first]), ("w", [second])
            ]  # fmt: skip
            # the owner makes the first role's SELECT policy its own: it shows that role two rows only
            (own,) = [name for name, command, _, names in made if (command, names) == ("r", [first])]
            admin.execute(sql.SQL("ALTER POLICY {} ON guarded USING (id <= 2)").format(sql.Identifier(own)))
            revoke(admin, "worker", first, tables=["guarded"])
            left = admin.execute(policies).fetchall()
    finally:
        for role in (first, second):
            admin.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(role)))
    kept = [row for row in made if row[3] == [second]] + [(own, "r", "(id <= 2)", [first])]
    assert sorted(left) == sorted(kept)
