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
    current = get_registration(admin, "docs", "embedding")  # a test may have registered it again
    admin.execute("SELECT pgsim.unregister_embedding(%s, true)", [current.id if current else registration.id])


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
    # it may write the table's text, not its embeddings (a role that may is a worker of the table)
    admin.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE (section, body) ON docs TO {}").format(app))
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


def test_a_registered_partitioned_table_queues_rows_written_to_its_partitions(
    admin: psycopg.Connection[Any], roles: Roles
) -> None:
    with acting(admin, roles.owner):
        admin.execute(
            "CREATE TABLE parts (id int, region text, body text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)"
        )
        admin.execute("CREATE TABLE parts_eu PARTITION OF parts FOR VALUES IN ('eu')")
        registration = add_embedding(admin, "parts", "embedding", source="body", index=None)
        admin.execute("CREATE TABLE parts_us PARTITION OF parts FOR VALUES IN ('us')")  # attached later
        admin.execute("INSERT INTO parts VALUES (1, 'eu', 'hello'), (2, 'us', 'world')")
        admin.execute("UPDATE parts SET body = 'hello again' WHERE id = 1")
        queued = admin.execute(
            "SELECT key FROM pgsim.queue WHERE embedding_id = %s ORDER BY id", [registration.id]
        ).fetchall()
        admin.execute("SELECT pgsim.unregister_embedding(%s, true)", [registration.id])
        admin.execute("DROP TABLE parts")
    assert queued == [({"id": 1, "region": "eu"},), ({"id": 2, "region": "us"},)]


def test_names_stored_in_a_registration_row_never_lead_to_another_table(
    admin: psycopg.Connection[Any], roles: Roles, docs: Registration
) -> None:
    tenant = sql.Identifier(roles.tenant)
    admin.execute(sql.SQL("GRANT USAGE ON SCHEMA pgsim TO {}").format(tenant))
    admin.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON pgsim.embedding TO {}").format(tenant))
    forge = (
        "INSERT INTO pgsim.embedding (table_oid, table_schema, table_name, column_name, source, source_columns, "
        "key_columns, model, model_revision, dimension, dtype, created_column, replaces) "
        "SELECT 'tenant.notes'::regclass, 'public', 'docs', 'section', 'body', '{body}', '{id}', 'm', 'r', 384, "
        "'vector', true, %s"
    )
    with acting(admin, roles.tenant):  # a row for the tenant's own table, naming the victim's table and column
        with pytest.raises(psycopg.errors.ForeignKeyViolation):  # and claiming to replace the victim's column
            admin.execute(forge, [docs.id])
        admin.execute(forge.replace("true, %s", "true, NULL"))
    forged = admin.execute("SELECT id FROM pgsim.embedding WHERE table_oid = 'tenant.notes'::regclass").fetchone()
    assert forged is not None
    planted = get_registration(admin, "tenant.notes", "section")
    assert planted is not None and (planted.schema, planted.table_name) == ("tenant", "notes")  # from the OID
    with acting(admin, roles.owner):
        admin.execute("SELECT pgsim.remove_embedding('docs', 'embedding', false)")
        admin.execute("SELECT pgsim.requeue_dead_letters()")  # no error for letters of tables it does not own
    columns = admin.execute(
        "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'docs'::regclass "
        "AND attnum > 0 AND NOT attisdropped"
    ).fetchone()
    assert columns == (["id", "section", "body", "embedding"],)  # the victim kept its column
    admin.execute("DELETE FROM pgsim.embedding WHERE id = %s", [forged[0]])
    with acting(admin, roles.owner):  # as the docs fixture left it, for its teardown
        add_embedding(admin, "docs", "embedding", source="body", index=None, queue_existing=False)


def test_a_shadow_in_the_callers_path_does_not_run_inside_the_planner(
    admin: psycopg.Connection[Any], roles: Roles, docs: Registration
) -> None:
    admin.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(roles.tenant)))
    with acting(admin, roles.tenant):  # exact-type overloads: better matches than pg_catalog's variadic ones
        admin.execute(
            "CREATE FUNCTION public.format(f text, t regclass, w text) RETURNS text LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'shadow ran as %', current_user; END $$"
        )
        admin.execute(
            "CREATE FUNCTION public.quote_ident(t name) RETURNS text LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'shadow ran as %', current_user; END $$"
        )
    try:
        with acting(admin, roles.owner):  # the owner's default search_path has public in it
            (estimate,) = admin.execute("SELECT pgsim.estimate_rows('docs', 'true')").fetchone() or (None,)
            assert estimate is not None and estimate > 0  # the planner's guess: no shadow ran to give it
            planned = admin.execute("SELECT (pgsim.knn_plan('docs', 'embedding', 1, $$section = 'db'$$)).path")
            assert planned.fetchone() == ("exact",)
    finally:
        admin.execute("DROP FUNCTION public.format(text, regclass, text), public.quote_ident(name)")


def test_a_workers_drain_runs_no_function_another_role_put_in_its_path(
    admin: psycopg.Connection[Any], roles: Roles, docs: Registration
) -> None:
    from pgsim.columns.worker import sync

    with acting(admin, roles.owner):  # the database's owner may create in public, on everyone's path
        admin.execute(
            "CREATE FUNCTION public.jsonb_populate_record(docs, jsonb) RETURNS docs LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'shadow ran as %', current_user; END $$"
        )
    try:
        report = sync(admin, allow_superuser=True)  # as the test's superuser, the worker the finding describes
    finally:
        admin.execute("DROP FUNCTION public.jsonb_populate_record(docs, jsonb)")
    assert (report.embedded, report.failed, report.dead) == (2, 0, 0)
    assert admin.execute("SELECT count(embedding) FROM docs").fetchone() == (2,)
