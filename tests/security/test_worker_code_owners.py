"""Issue 18, the review's second round: a superuser's drain runs no function of another role that a table it
owns calls (from the source expression, a CHECK constraint), and its cache lookups take no vector another
role stored, although neither row-level security nor pg_has_role holds a superuser back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.database import scratch_database
from fixtures.roles import Roles, acting
from psycopg import sql

from pgsim.columns.adding import add_embedding
from pgsim.columns.cache import _digest
from pgsim.columns.grants import grant
from pgsim.columns.worker import sync
from pgsim.db.schema import install
from pgsim.encoding.encoder import Encoder
from pgsim.errors import InvalidInput

# A function of the tenant's that makes ``role`` a superuser when a superuser runs it.
ESCALATE = """
CREATE FUNCTION tenant.{name}(t text) RETURNS {returns} LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', {role});
    END IF;
    RETURN {result};
END $$
"""


@pytest.fixture
def admin(server_dsn: str, roles: Roles) -> Iterator[psycopg.Connection[Any]]:
    """A database of its own, pgsim installed by the superuser, a schema of the tenant's."""
    with scratch_database(server_dsn, "code_owners") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION vector")
        install(conn)
        conn.execute(sql.SQL("CREATE SCHEMA tenant AUTHORIZATION {}").format(sql.Identifier(roles.tenant)))
        try:
            yield conn
        finally:
            for role in vars(roles).values():
                conn.execute(sql.SQL("ALTER ROLE {} NOSUPERUSER").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(roles.tenant)))


def test_a_superusers_drain_refuses_tables_that_call_another_roles_functions(
    admin: psycopg.Connection[Any], roles: Roles
) -> None:
    with acting(admin, roles.tenant):
        for name, returns, result in (("clean", "text", "t"), ("ok", "boolean", "true")):
            admin.execute(
                sql.SQL(ESCALATE).format(
                    name=sql.Identifier(name),
                    returns=sql.SQL(returns),
                    role=sql.Literal(roles.tenant),
                    result=sql.SQL(result),
                )  # fmt: skip
            )
        admin.execute("GRANT USAGE ON SCHEMA tenant TO PUBLIC")
    admin.execute("CREATE TABLE in_source (id int PRIMARY KEY, body text)")
    admin.execute("CREATE TABLE in_check (id int PRIMARY KEY, body text CHECK (tenant.ok(body)))")
    admin.execute(sql.SQL("ALTER ROLE {} NOSUPERUSER").format(sql.Identifier(roles.tenant)))  # made by the CHECK
    add_embedding(admin, "in_source", "embedding", source=sql.SQL("tenant.clean(body)"), index=None)
    admin.execute(sql.SQL("ALTER ROLE {} NOSUPERUSER").format(sql.Identifier(roles.tenant)))  # by the probe
    add_embedding(admin, "in_check", "embedding", source="body", index=None)
    admin.execute("INSERT INTO in_source VALUES (1, 'x')")
    admin.execute("INSERT INTO in_check VALUES (1, 'y')")
    admin.execute(sql.SQL("ALTER ROLE {} NOSUPERUSER").format(sql.Identifier(roles.tenant)))
    for table in ("in_source", "in_check"):
        with pytest.raises(InvalidInput, match=f"public.{table} \\({roles.tenant}\\)"):
            sync(admin, table=table)
    superuser = admin.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", [roles.tenant]).fetchone()
    assert superuser == (False,)
    assert admin.execute("SELECT count(embedding) FROM in_source").fetchone() == (0,)


def test_no_role_plants_a_cached_vector_for_the_owner_or_a_superuser(
    admin: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    grant(admin, "register", roles.tenant)
    admin.execute("CREATE TABLE mine (id int PRIMARY KEY, body text)")
    add_embedding(admin, "mine", "embedding", source="body", index=None)
    with acting(admin, roles.tenant):  # the vector for a text the superuser's table will hold
        admin.execute(
            "INSERT INTO pgsim.embedding_cache (model, model_revision, digest, embedding) "
            "VALUES (%s, %s, %s, array_fill(0.25, ARRAY[384])::public.vector)",
            [encoder.model_name, encoder.revision, _digest(encoder, "A superuser's text")],
        )
    admin.execute("INSERT INTO mine VALUES (1, 'A superuser''s text')")
    report = sync(admin, table="mine", cache=True)  # as pgsim's owner and a superuser: no RLS applies
    assert (report.embedded, report.cached) == (1, 0)
    (stored,) = admin.execute("SELECT embedding FROM mine").fetchone() or (None,)
    expected = encoder.encode(["A superuser's text"])[0]
    assert stored is not None and float(np.abs(np.asarray(stored.to_list()) - expected).max()) < 1e-5
