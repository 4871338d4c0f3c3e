"""Issue 18, the least-privilege worker under attack: a tenant that grants its table to another owner's worker,
a superuser session behind SET ROLE, a tenant's partition and pgsim's owner planting code for a superuser's
drain, a hostile database search_path, rows hidden by a policy of a role the worker does not inherit, and a
table renamed and replaced mid-drain. The worker logs in as itself, as it is meant to run; each attack fails
and no role becomes a superuser. Reads of the queue and the cache: test_worker_attacks_reads.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from fixtures.database import dsn_for
from fixtures.roles import Roles, acting
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgsim.columns.adding import add_embedding
from pgsim.columns.batches import SyncReport
from pgsim.columns.grants import grant
from pgsim.columns.registry import Registration
from pgsim.columns.worker import sync
from pgsim.encoding.encoder import Encoder
from pgsim.errors import InvalidInput

# A trigger function that, run by a superuser (or by a role that may RESET ROLE to one), makes {role} one.
ESCALATE = """
CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RESET ROLE;
    IF (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', {role});
    END IF;
    RETURN NULL;
END $$
"""

# The tenant's trigger function: it copies the owner's texts and overwrites the owner's embeddings.
HOOK = """
CREATE FUNCTION tenant.hook() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tenant.loot SELECT current_user || ':' || body FROM public.docs;
    UPDATE public.docs SET embedding = (SELECT array_fill(0.5, ARRAY[384])::public.vector);
    DELETE FROM pgsim.queue WHERE embedding_id = {docs};
    RETURN NULL;
END $$
"""


def escalating(name: str, role: str) -> sql.Composed:
    return sql.SQL(ESCALATE).format(name=sql.Identifier(*name.split(".")), role=sql.Literal(role))


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


@pytest.fixture(scope="module")
def notes(admin: psycopg.Connection[Any], roles: Roles, docs: Registration) -> Registration:
    """tenant.notes, registered by the tenant (two rows queued) and granted to the owner's worker, with an
    AFTER UPDATE trigger that runs tenant.hook; tenant.loot, where the hook puts what it reads."""
    with acting(admin, roles.tenant):
        admin.execute("CREATE TABLE tenant.loot (what text)")
        admin.execute("GRANT INSERT ON tenant.loot TO PUBLIC; GRANT USAGE ON SCHEMA tenant TO PUBLIC")
        admin.execute(sql.SQL(HOOK).format(docs=sql.Literal(docs.id)))
        admin.execute("INSERT INTO tenant.notes VALUES (1, 'a note'), (2, 'another note')")
        registration = add_embedding(admin, "tenant.notes", "embedding", source="body", index=None)
        admin.execute("CREATE TRIGGER zz_hook AFTER UPDATE ON tenant.notes FOR EACH ROW EXECUTE FUNCTION tenant.hook()")
        grant(admin, "worker", roles.worker, tables=["tenant.notes"])
    return registration


@pytest.fixture(autouse=True)
def demoted(admin: psycopg.Connection[Any], roles: Roles) -> Iterator[None]:
    """Whatever a test's attack did (on code without the fixes), its roles are not superusers after it."""
    yield
    for role in vars(roles).values():
        admin.execute(sql.SQL("ALTER ROLE {} NOSUPERUSER").format(sql.Identifier(role)))


def superusers(admin: psycopg.Connection[Any], roles: Roles) -> list[str]:
    query = "SELECT rolname FROM pg_catalog.pg_roles WHERE rolsuper AND rolname = ANY(%s) ORDER BY 1"
    return [name for (name,) in admin.execute(query, [list(vars(roles).values())]).fetchall()]


def queued(admin: psycopg.Connection[Any], registration: Registration) -> int:
    row = admin.execute("SELECT count(*) FROM pgsim.queue WHERE embedding_id = %s", [registration.id]).fetchone()
    return int(row[0]) if row else 0


def refusal(run: Callable[[], object]) -> str:
    """The message of the InvalidInput that ``run`` raised; "" when it ran (then the test shows what it did)."""
    try:
        run()
    except InvalidInput as exc:
        return str(exc)
    return ""


def owners_table(admin: psycopg.Connection[Any], roles: Roles, name: str, rows: int) -> Registration:
    """``name`` (the owner's): ``rows`` rows queued, registered, its worker the owner's worker role."""
    with acting(admin, roles.owner):
        table = sql.Identifier(name)
        admin.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(table))
        admin.execute(
            sql.SQL("INSERT INTO {} SELECT g, 'text number ' || g FROM generate_series(1, %s) g").format(table), [rows]
        )
        registration = add_embedding(admin, name, "embedding", source="body", index=None, queue_existing=True)
        grant(admin, "worker", roles.worker, tables=[name])
    return registration


def test_a_worker_of_two_owners_drains_only_the_owners_it_is_told_and_runs_no_tenant_trigger(
    admin: psycopg.Connection[Any],
    worker: psycopg.Connection[Any],
    roles: Roles,
    docs: Registration,
    notes: Registration,
    encoder: Encoder,
) -> None:
    refused = refusal(lambda: sync(worker))
    assert admin.execute("SELECT count(*) FROM tenant.loot").fetchone() == (0,)  # the tenant's trigger never ran
    assert "several owners" in refused
    assert queued(admin, docs) == 2 and queued(admin, notes) == 2  # nothing drained
    report = sync(worker, owners=[roles.owner])
    assert (report.embedded, report.failed, report.dead) == (2, 0, 0)
    assert admin.execute("SELECT count(*) FROM tenant.loot").fetchone() == (0,)  # the tenant's trigger never ran
    assert queued(admin, notes) == 2  # the tenant's table was not drained
    rows = admin.execute("SELECT body, embedding::real[] FROM docs ORDER BY id").fetchall()
    expected = encoder.encode([body for body, _ in rows])
    vectors = np.asarray([stored for _, stored in rows], dtype=np.float32)
    assert float(np.abs(vectors - np.stack(expected)).max()) < 1e-5  # the true encodings, not the tenant's


def test_a_table_name_takes_that_table_not_a_tenants_namesake_in_another_schema(
    admin: psycopg.Connection[Any],
    worker: psycopg.Connection[Any],
    roles: Roles,
    docs: Registration,
    notes: Registration,
) -> None:
    with acting(admin, roles.tenant):  # tenant.docs: the owner's table's name, the tenant's trigger
        admin.execute("CREATE TABLE tenant.docs (id int PRIMARY KEY, body text)")
        admin.execute("INSERT INTO tenant.docs VALUES (1, 'bait')")
        admin.execute("CREATE TRIGGER zz_hook AFTER UPDATE ON tenant.docs FOR EACH ROW EXECUTE FUNCTION tenant.hook()")
        namesake = add_embedding(admin, "tenant.docs", "embedding", source="body", index=None)
        grant(admin, "worker", roles.worker, tables=["tenant.docs"])
    with acting(admin, roles.owner):
        admin.execute("UPDATE docs SET body = body || ' (revised)' WHERE id = 1")
    owners = queued(admin, docs)
    report = sync(worker, table="docs")
    assert (report.embedded, report.failed, report.dead) == (owners, 0, 0)
    assert queued(admin, namesake) == 1
    assert admin.execute("SELECT count(*) FROM tenant.loot").fetchone() == (0,)
    assert admin.execute("SELECT count(embedding) FROM tenant.docs").fetchone() == (0,)


def test_a_tenant_cannot_make_its_registration_a_model_change_of_another_table(
    admin: psycopg.Connection[Any], roles: Roles, docs: Registration, notes: Registration
) -> None:
    refused = (psycopg.errors.InsufficientPrivilege, psycopg.errors.ForeignKeyViolation)  # policy or key
    with acting(admin, roles.tenant), pytest.raises(refused, match="row-level security|replaces_same_table"):
        admin.execute("UPDATE pgsim.embedding SET replaces = %s WHERE id = %s", [docs.id, notes.id])
    assert admin.execute("SELECT replaces FROM pgsim.embedding WHERE id = %s", [notes.id]).fetchone() == (None,)


def test_a_superuser_session_set_to_the_worker_role_refuses_to_drain(
    admin: psycopg.Connection[Any], roles: Roles, docs: Registration
) -> None:
    lifted = owners_table(admin, roles, "lifted", 2)
    with acting(admin, roles.owner):  # the owner's trigger: RESET ROLE gets the session's superuser back
        admin.execute(escalating("public.lift", roles.owner))
        admin.execute("CREATE TRIGGER lift AFTER UPDATE ON lifted FOR EACH ROW EXECUTE FUNCTION public.lift()")
    with acting(admin, roles.worker):
        refused = refusal(lambda: sync(admin, table="lifted"))
    assert superusers(admin, roles) == []
    assert "may become (SET ROLE), a superuser" in refused
    assert queued(admin, lifted) == 2


def test_a_superusers_drain_refuses_code_of_a_tenants_partition_and_of_pgsims_owner(
    admin: psycopg.Connection[Any], roles: Roles, docs: Registration
) -> None:
    admin.execute("CREATE TABLE ptab (id int PRIMARY KEY, body text) PARTITION BY RANGE (id)")
    admin.execute("CREATE TABLE ptab_a PARTITION OF ptab FOR VALUES FROM (0) TO (100)")
    admin.execute("CREATE TABLE ptab_t PARTITION OF ptab FOR VALUES FROM (100) TO (200)")
    admin.execute(sql.SQL("ALTER TABLE ptab_t OWNER TO {}").format(sql.Identifier(roles.tenant)))
    admin.execute("INSERT INTO ptab VALUES (1, 'the superuser''s row'), (101, 'the tenant''s row')")
    ptab = add_embedding(admin, "ptab", "embedding", source="body", index=None, queue_existing=True)
    with acting(admin, roles.tenant):
        admin.execute(escalating("tenant.esc", roles.tenant))
        admin.execute("CREATE TRIGGER esc AFTER UPDATE ON public.ptab_t FOR EACH ROW EXECUTE FUNCTION tenant.esc()")
    with acting(admin, roles.owner):  # pgsim's owner, not a superuser, owns pgsim.queue
        admin.execute(escalating("public.qesc", roles.owner))
        admin.execute("CREATE TRIGGER qesc AFTER DELETE ON pgsim.queue FOR EACH ROW EXECUTE FUNCTION public.qesc()")
    try:
        refused = refusal(lambda: sync(admin, table="ptab"))  # as the superuser, allow_superuser not given
    finally:
        admin.execute("DROP TRIGGER qesc ON pgsim.queue")
    assert superusers(admin, roles) == []
    assert f"ptab ({roles.tenant})" in refused and f"ptab ({roles.owner})" in refused
    assert queued(admin, ptab) == 2


def test_an_operator_in_a_hostile_database_search_path_never_runs_in_a_superusers_drain(
    admin: psycopg.Connection[Any], roles: Roles, docs: Registration
) -> None:
    admin.execute("CREATE TABLE sutab (id int PRIMARY KEY, body text)")
    admin.execute("INSERT INTO sutab VALUES (1, 'the superuser''s row')")
    add_embedding(admin, "sutab", "embedding", source="body", index=None, queue_existing=True)
    database = sql.Identifier(str(conninfo_to_dict(admin.info.dsn)["dbname"]))
    with acting(admin, roles.owner):  # the database's owner: public, before pg_catalog, for every new session
        admin.execute(
            sql.SQL(
                "CREATE FUNCTION public.oideq(oid, oid) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN "
                "IF (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) current_user) "
                "AND NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) {0}) "
                "THEN EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', {0}); END IF; "
                "RETURN $1 OPERATOR(pg_catalog.=) $2; END $$"
            ).format(sql.Literal(roles.owner))
        )
        admin.execute("CREATE OPERATOR public.= (leftarg = oid, rightarg = oid, function = public.oideq)")
        admin.execute(sql.SQL("ALTER DATABASE {} SET search_path = public, pg_catalog").format(database))
    try:
        with psycopg.connect(admin.info.dsn, autocommit=True) as hostile:  # a new session: the database's path
            refused = refusal(lambda: sync(hostile, table="sutab"))
            assert superusers(admin, roles) == []
            assert f"sutab ({roles.owner})" in refused  # pgsim's owner is not a superuser
            report = sync(hostile, table="sutab", allow_superuser=True)
        assert (report.embedded, report.failed, report.dead) == (1, 0, 0)
        assert superusers(admin, roles) == []
    finally:
        admin.execute(sql.SQL("ALTER DATABASE {} RESET search_path").format(database))
        admin.execute("DROP OPERATOR public.= (oid, oid)")


def test_rows_hidden_by_a_policy_of_a_role_the_worker_does_not_inherit_go_to_the_dead_letters(
    admin: psycopg.Connection[Any], worker: psycopg.Connection[Any], roles: Roles, docs: Registration
) -> None:
    readers = sql.Identifier(f"{roles.worker}_readers")
    hid = owners_table(admin, roles, "hid", 4)  # granted before the table had row-level security
    admin.execute(sql.SQL("CREATE ROLE {}").format(readers))
    admin.execute(sql.SQL("GRANT {} TO {} WITH INHERIT FALSE").format(readers, sql.Identifier(roles.worker)))
    try:
        with acting(admin, roles.owner):
            admin.execute("ALTER TABLE hid ENABLE ROW LEVEL SECURITY")
            admin.execute(sql.SQL("CREATE POLICY all_rows ON hid FOR SELECT TO {} USING (true)").format(readers))
            admin.execute(
                sql.SQL("CREATE POLICY some_rows ON hid TO {} USING (id <= 2)").format(sql.Identifier(roles.worker))
            )
        report = sync(worker, table="hid", max_attempts=1, retry_delay=0)
    finally:
        admin.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(readers))
    assert (report.embedded, report.missing, report.dead) == (2, 0, 2)
    letters = admin.execute(
        "SELECT key, last_error FROM pgsim.dead_letter WHERE embedding_id = %s ORDER BY id", [hid.id]
    ).fetchall()
    assert [key for key, _ in letters] == [{"id": 3}, {"id": 4}]
    assert all("row-level security" in error for _, error in letters)


def test_a_table_renamed_and_replaced_mid_drain_is_drained_under_its_new_name(
    admin: psycopg.Connection[Any], worker: psycopg.Connection[Any], roles: Roles, docs: Registration
) -> None:
    moving = owners_table(admin, roles, "moving", 10)
    replaced: list[bool] = []

    def rename_and_replace(report: SyncReport, total: int) -> None:
        if not replaced:  # after the first batch: the usual rename-and-replace, with the same rows
            with acting(admin, roles.owner):
                admin.execute("ALTER TABLE moving RENAME TO moved")
                admin.execute("CREATE TABLE moving (id int PRIMARY KEY, body text, embedding vector(384))")
                admin.execute("INSERT INTO moving SELECT id, body FROM moved")
                admin.execute(sql.SQL("GRANT SELECT, UPDATE ON moving TO {}").format(sql.Identifier(roles.worker)))
            replaced.append(True)

    report = sync(worker, table="moving", batch_size=5, progress=rename_and_replace)
    assert replaced
    assert (report.embedded, report.failed, report.dead, report.missing) == (10, 0, 0, 0)
    assert admin.execute("SELECT count(embedding), count(*) FROM moved").fetchone() == (10, 10)
    assert admin.execute("SELECT count(embedding) FROM moving").fetchone() == (0,)
    assert queued(admin, moving) == 0
    letters = admin.execute("SELECT count(*) FROM pgsim.dead_letter WHERE embedding_id = %s", [moving.id])
    assert letters.fetchone() == (0,)
