"""Issue 18, findings 1, 3, 4 and 5: the registry cannot be taken over, written by another role, fed forged
queue entries, or handed a statement list as a filter; each attack fails cleanly and leaves data intact."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fixtures.roles import Roles, acting
from psycopg import sql

from pgsim.columns.adding import add_embedding
from pgsim.columns.registry import Registration, forget_dropped, get_registration
from pgsim.errors import InvalidInput
from pgsim.knn.filtered import search


@pytest.fixture
def admin(shared: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(shared, autocommit=True) as conn:
        yield conn


@pytest.fixture
def docs(admin: psycopg.Connection[Any], roles: Roles) -> Iterator[Registration]:
    """public.docs.embedding registered by its owner (no index: these tests are about the registry)."""
    with acting(admin, roles.owner):
        registration = add_embedding(admin, "docs", "embedding", source="body", index=None, queue_existing=True)
    yield registration
    admin.execute("DELETE FROM pgsim.queue")
    admin.execute("DELETE FROM pgsim.dead_letter")
    admin.execute("SELECT pgsim.unregister_embedding(%s, true)", [registration.id])


def test_a_trigger_named_like_pgsims_on_another_table_moves_no_registration(
    admin: psycopg.Connection[Any], roles: Roles, docs: Registration
) -> None:
    admin.execute(sql.SQL("GRANT USAGE ON SCHEMA tenant TO {}").format(sql.Identifier(roles.app)))
    with acting(admin, roles.app):  # a role with no privilege on schema pgsim at all
        admin.execute("CREATE TEMP TABLE bait (id int PRIMARY KEY)")
        admin.execute("CREATE FUNCTION pg_temp.noop() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'")
        admin.execute(
            sql.SQL("CREATE TRIGGER {} AFTER INSERT ON bait FOR EACH ROW EXECUTE FUNCTION pg_temp.noop()").format(
                sql.Identifier(f"pgsim_{docs.id}_insert")
            )
        )
    with acting(admin, roles.tenant):  # a tenant does the same on a table of its own
        admin.execute("CREATE FUNCTION tenant.noop() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'")
        admin.execute(
            sql.SQL(
                "CREATE TRIGGER {} BEFORE UPDATE ON tenant.notes FOR EACH ROW EXECUTE FUNCTION tenant.noop()"
            ).format(sql.Identifier(f"pgsim_{docs.id}_insert"))
        )
    queued = admin.execute("SELECT count(*) FROM pgsim.queue WHERE embedding_id = %s", [docs.id]).fetchone()
    assert forget_dropped(admin) == []  # run by pgsim on every drain, registration and backfill
    after = get_registration(admin, "docs", "embedding")
    assert after is not None and (after.schema, after.table_name, after.table_oid) == ("public", "docs", docs.table_oid)
    assert admin.execute("SELECT count(*) FROM pgsim.queue WHERE embedding_id = %s", [docs.id]).fetchone() == queued
    admin.execute(sql.SQL("DROP TRIGGER {} ON tenant.notes").format(sql.Identifier(f"pgsim_{docs.id}_insert")))


def test_a_renamed_table_keeps_its_registration_and_a_dropped_one_loses_it(
    admin: psycopg.Connection[Any], roles: Roles
) -> None:
    with acting(admin, roles.owner):
        admin.execute("CREATE TABLE moving (id int PRIMARY KEY, body text)")
        registration = add_embedding(admin, "moving", "embedding", source="body", index=None)
        admin.execute("ALTER TABLE moving RENAME TO moved")
        assert forget_dropped(admin) == []
        followed = get_registration(admin, "moved", "embedding")
        assert followed is not None and followed.id == registration.id and followed.table_name == "moved"
        admin.execute("DROP TABLE moved")
        admin.execute("CREATE TABLE moved (id int PRIMARY KEY, body text)")  # the same name, another table
        assert forget_dropped(admin) == [registration.id]
        assert get_registration(admin, "moved", "embedding") is None
        admin.execute("DROP TABLE moved")


def test_only_a_tables_owner_may_register_or_change_its_registration(
    admin: psycopg.Connection[Any], roles: Roles, docs: Registration
) -> None:
    app = sql.Identifier(roles.app)
    admin.execute(sql.SQL("GRANT USAGE ON SCHEMA pgsim TO {}").format(app))
    admin.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON pgsim.embedding, pgsim.queue TO {}").format(app))
    admin.execute(sql.SQL("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgsim TO {}").format(app))
    admin.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON docs TO {}").format(app))
    with acting(admin, roles.app):
        admin.execute("CREATE FUNCTION pg_temp.steal(text) RETURNS text LANGUAGE sql AS 'SELECT $1'")
        rewritten = admin.execute(
            "UPDATE pgsim.embedding SET source = 'pg_temp.steal(body)' WHERE id = %s", [docs.id]
        ).rowcount
        deleted = admin.execute("DELETE FROM pgsim.embedding WHERE id = %s", [docs.id]).rowcount
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            admin.execute(
                "INSERT INTO pgsim.queue (embedding_id, key, reason) VALUES (%s, '{\"id\": 1}', 'forged')", [docs.id]
            )
        with pytest.raises(InvalidInput, match="Only the owner of public.docs"):
            add_embedding(admin, "docs", "embedding_2", source="body", index=None)
    assert (rewritten, deleted) == (0, 0)
    kept = get_registration(admin, "docs", "embedding")
    assert kept is not None and kept.source == docs.source
    assert admin.execute("SELECT count(*) FROM pgsim.embedding").fetchone() == (1,)
    assert admin.execute("SELECT to_regclass('pgsim_docs_embedding_2_probe')").fetchone() == (None,)


def test_pgsims_trigger_function_on_another_table_queues_nothing(
    admin: psycopg.Connection[Any], roles: Roles, docs: Registration
) -> None:
    tenant = sql.Identifier(roles.tenant)
    admin.execute(sql.SQL("GRANT USAGE ON SCHEMA pgsim TO {}").format(tenant))
    admin.execute(sql.SQL("GRANT EXECUTE ON FUNCTION pgsim.enqueue() TO {}").format(tenant))
    before = admin.execute("SELECT count(*) FROM pgsim.queue").fetchone()
    with acting(admin, roles.tenant):
        admin.execute(
            sql.SQL(
                "CREATE TRIGGER forge AFTER INSERT ON tenant.notes FOR EACH ROW EXECUTE FUNCTION {}({}, 'id')"
            ).format(sql.Identifier("pgsim", "enqueue"), sql.Literal(str(docs.id)))
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="holds no registration"):
            admin.execute("INSERT INTO tenant.notes VALUES (42, 'forged')")
        admin.execute("DROP TRIGGER forge ON tenant.notes")
    assert admin.execute("SELECT count(*) FROM pgsim.queue").fetchone() == before
    assert admin.execute("SELECT count(*) FROM tenant.notes WHERE id = 42").fetchone() == (0,)


@pytest.mark.parametrize(
    "statement_list",
    ["true; DELETE FROM docs RETURNING 1", "true; DELETE FROM docs", "section = 'db'; DROP TABLE docs"],
)
def test_a_filter_is_one_expression_never_a_statement_list(
    admin: psycopg.Connection[Any], docs: Registration, statement_list: str
) -> None:
    with pytest.raises(psycopg.errors.InvalidCursorDefinition, match="multi-query"):
        admin.execute("SELECT pgsim.knn_plan('docs', 'embedding', 10, %s)", [statement_list])
    with pytest.raises(psycopg.errors.InvalidCursorDefinition, match="multi-query"):
        admin.execute("SELECT pgsim.estimate_rows('docs', %s)", [statement_list])
    with pytest.raises((InvalidInput, psycopg.Error)):
        search(admin, "docs", "embedding", [0.1] * 384, where=sql.SQL(statement_list))  # type: ignore[arg-type]
    assert admin.execute("SELECT count(*) FROM docs").fetchone() == (2,)
