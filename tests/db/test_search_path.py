"""search_path hardening (issue 18): what pgsim's functions call resolves the same way whoever calls them.

A role that can create objects in a schema on the caller's search_path (the database owner in public, say)
could otherwise shadow a built-in that a pgsim function calls with an overload that matches the arguments
better, and have it run with the caller's rights. plpgsql functions pin ``search_path = pg_catalog,
pg_temp``; SQL functions and the view have bodies bound when the installer makes them, under that same
path. Real roles on the session's server; each shadow records its calls in a table of its owner's."""

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from fixtures.database import scratch_database
from fixtures.roles import acting
from psycopg import sql

from pgsim.db.schema import install, package_version

PINNED = "search_path=pg_catalog, pg_temp"
# Plan the caller's own filter for a search that runs under the caller's search_path, so they keep it, and
# qualify what they call themselves (pgsim.db.sqlfiles).
NOT_YET_PINNED = {"estimate_rows", "knn_plan"}

# Shadows of built-ins that pgsim's functions call, each a better match than pg_catalog's for the arguments
# pgsim passes ({table}: the searched table, whose row type pgsim.knn passes to to_jsonb). Each records its
# call, then does what the built-in does: an attack that works goes unnoticed.
SHADOWS = {
    "to_jsonb": ("public.{table}", "jsonb", "pg_catalog.to_jsonb($1)"),  # knn
    "cardinality": ("public.vector[]", "integer", "pg_catalog.cardinality($1)"),  # mmr
    "array_fill": ("double precision, integer[]", "double precision[]", "pg_catalog.array_fill($1, $2)"),  # mmr
    "unnest": ("public.vector[]", "SETOF public.vector", "pg_catalog.unnest($1)"),  # mmr, nearest_label
    "format": ("text, name, name", "text", "pg_catalog.format($1, $2, $3)"),  # near_duplicates, sync_status, ...
    "jsonb_build_object": ("text, integer", "jsonb", "pg_catalog.jsonb_build_object($1, $2)"),  # near_duplicates
    "quote_ident": ("name", "text", "pg_catalog.quote_ident($1)"),  # qualified_columns
    "obj_description": ("regclass, name", "text", "pg_catalog.obj_description($1, $2)"),  # index_ef_search
}
# Operators on argument types pg_catalog has no exact match for: (left, right, body).
OPERATORS = {
    "/": ("double precision", "bigint", "$1 OPERATOR(pg_catalog./) $2::double precision"),  # rrf
    "-": ("integer", "double precision", "$1::double precision OPERATOR(pg_catalog.-) $2"),  # cosine_similarity
}
# Ids 1, 2 and 3 point one way, 4 and 5 another, 6 a third.
DOCS = (
    "INSERT INTO public.docs VALUES "
    "(1, '[1,0,0]'), (2, '[2,0,0]'), (3, '[1,0.001,0]'), (4, '[0,1,0]'), (5, '[0,3,0.001]'), (6, '[0,0,1]')"
)
CANDIDATES = "ARRAY['[1,0,0]', '[0.99,0.01,0]', '[0,1,0]']::{vector}[]"


@contextmanager
def new_roles(server_dsn: str, *labels: str) -> Iterator[list[str]]:
    """New roles (the tests SET ROLE to them), dropped after: drop what they own first."""
    names = [f"pgsim_sp_{label}_{uuid.uuid4().hex[:8]}" for label in labels]
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        for name in names:
            admin.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))
    try:
        yield names
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            for name in names:
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def plant_shadows(conn: psycopg.Connection[Any], attacker: str, table: str) -> None:
    """As ``attacker``, in public: the shadows, and the log they write to (as their owner)."""
    shadow = sql.SQL(
        "CREATE FUNCTION public.{name}({arguments}) RETURNS {returns} "
        "LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp "
        "AS $$ INSERT INTO public.shadow_log VALUES ({label}); SELECT {body} $$"
    )
    with acting(conn, attacker):
        conn.execute("CREATE TABLE public.shadow_log (shadow text)")
        for name, (arguments, returns, body) in SHADOWS.items():
            conn.execute(
                shadow.format(
                    name=sql.Identifier(name),
                    arguments=sql.SQL(arguments.format(table=table)),
                    returns=sql.SQL(returns),
                    label=sql.Literal(name),
                    body=sql.SQL(body),
                )
            )
        for i, (operator, (left, right, body)) in enumerate(OPERATORS.items()):
            function = sql.Identifier(f"shadow_operator_{i}")
            conn.execute(
                shadow.format(
                    name=function,
                    arguments=sql.SQL(f"{left}, {right}"),
                    returns=sql.SQL("double precision"),
                    label=sql.Literal(operator),
                    body=sql.SQL(body),
                )
            )
            conn.execute(
                sql.SQL("CREATE OPERATOR public.{} (LEFTARG = {}, RIGHTARG = {}, FUNCTION = public.{})").format(
                    sql.SQL(operator), sql.SQL(left), sql.SQL(right), function
                )
            )


def shadows_run(conn: psycopg.Connection[Any]) -> list[str]:
    return [name for (name,) in conn.execute("SELECT DISTINCT shadow FROM public.shadow_log ORDER BY 1")]


def docs_table(conn: psycopg.Connection[Any], vector: str = "vector") -> None:
    """Table public.docs (DOCS), with an HNSW index for cosine distance (pgsim.near_duplicates needs one)."""
    conn.execute(f"CREATE TABLE public.docs (id integer PRIMARY KEY, embedding {vector}(3))")
    conn.execute(DOCS)
    conn.execute(f"CREATE INDEX docs_hnsw ON public.docs USING hnsw (embedding {vector}_cosine_ops)")


def searches_work(conn: psycopg.Connection[Any], vector: str = "vector") -> None:
    """pgsim.knn, mmr, near_duplicates, nearest_label and cosine_similarity on public.docs give the right
    answers."""
    hits = conn.execute(
        "SELECT (r.row ->> 'id')::integer, r.distance FROM pgsim.knn('public.docs', 'embedding', '[1,0,0]', 3) AS r"
    ).fetchall()
    assert sorted(id for id, _ in hits) == [1, 2, 3]
    assert [distance for _, distance in hits] == sorted(distance for _, distance in hits)
    assert hits[-1] == (3, pytest.approx(5e-7, abs=1e-6))
    picked = conn.execute(f"SELECT pgsim.mmr('[1,0,0]', {CANDIDATES.format(vector=vector)}, 2, 0.3)").fetchone()
    assert picked == ([1, 3],)  # the second is nearly the first: diversity picks the third
    groups = conn.execute(
        "SELECT (key ->> 'id')::integer, group_id, group_size "
        "FROM pgsim.near_duplicates('public.docs', 'embedding', 0.99) ORDER BY 1"
    ).fetchall()
    assert groups == [(1, 1, 3), (2, 1, 3), (3, 1, 3), (4, 2, 2), (5, 2, 2)]
    label = conn.execute(
        f"SELECT pgsim.nearest_label('[1,0.1,0]', ARRAY['y', 'x'], ARRAY['[0,1,0]', '[1,0,0]']::{vector}[])"
    )
    assert label.fetchone() == ("x",)
    similarity = conn.execute("SELECT pgsim.cosine_similarity('[1,0,0]', '[2,0,0]')").fetchone()
    assert similarity == (pytest.approx(1.0),)


def test_every_pgsim_function_pins_search_path_or_has_a_bound_body(conn: psycopg.Connection[Any]) -> None:
    install(conn)
    functions = conn.execute(
        "SELECT proname, oid::regprocedure::text, proconfig, prosqlbody IS NOT NULL FROM pg_proc "
        "WHERE pronamespace = 'pgsim'::regnamespace ORDER BY 2"
    ).fetchall()
    assert functions
    unpinned = [
        signature
        for name, signature, config, bound in functions
        if name not in NOT_YET_PINNED and not bound and PINNED not in (config or [])
    ]
    assert unpinned == []


def test_sql_functions_called_per_row_are_still_inlined(conn: psycopg.Connection[Any]) -> None:
    """An SQL-standard body with no SET clause is inlined into the calling query (and keeps its attributes)."""
    install(conn)
    plan = "\n".join(
        line
        for (line,) in conn.execute(
            "EXPLAIN VERBOSE SELECT pgsim.rrf(g), pgsim.cosine_similarity(v, '[1,0,0]') "
            "FROM generate_series(1::bigint, 3) AS g, LATERAL (SELECT ('[' || g || ',1,0]')::vector AS v) AS s"
        )
    )
    assert "pgsim." not in plan and "CASE WHEN" in plan and "<=>" in plan
    attributes = conn.execute(
        "SELECT proname, provolatile, proisstrict, proparallel, proconfig FROM pg_proc "
        "WHERE pronamespace = 'pgsim'::regnamespace AND proname IN ('rrf', 'cosine_similarity') ORDER BY 1"
    ).fetchall()
    assert attributes == [("cosine_similarity", "i", True, "s", None), ("rrf", "i", False, "s", None)]


def test_shadows_in_public_never_run_inside_pgsim_functions(conn: psycopg.Connection[Any], server_dsn: str) -> None:
    """The database owner's kind of attack: shadows planted in public after install, then pgsim's functions
    called by an application role and by a superuser (registration maintenance)."""
    with new_roles(server_dsn, "attacker", "app") as (attacker, app):
        try:
            install(conn)
            docs_table(conn)
            conn.execute("COMMENT ON INDEX public.docs_hnsw IS 'pgsim: ef_search=123'")
            conn.execute("CREATE TABLE public.notes (id integer PRIMARY KEY, body text)")
            registration = conn.execute(
                "SELECT pgsim.register_embedding('public.notes', 'embedding', 'body', 'some-model', 'r1', 3)"
            ).fetchone()
            assert registration is not None
            conn.execute(
                "INSERT INTO pgsim.dead_letter (embedding_id, key, reason, attempts, enqueued_at) "
                "VALUES (%s, '{\"id\": 1}', 'insert', 5, now())",
                registration,
            )
            for grant in (
                "GRANT CREATE ON SCHEMA public TO {attacker}",
                "GRANT USAGE ON SCHEMA pgsim TO {app}",
                "GRANT SELECT ON ALL TABLES IN SCHEMA pgsim TO {app}",
                "GRANT SELECT ON public.docs, public.notes TO {app}",  # sync_status shows the tables one may read
            ):
                conn.execute(sql.SQL(grant).format(attacker=sql.Identifier(attacker), app=sql.Identifier(app)))
            plant_shadows(conn, attacker, "docs")

            with acting(conn, app):
                searches_work(conn)
                columns = conn.execute("SELECT pgsim.qualified_columns('OLD', ARRAY['a', 'B c']::name[])")
                assert columns.fetchone() == ('OLD.a, OLD."B c"',)
                ef_search = conn.execute("SELECT pgsim.index_ef_search('public.docs_hnsw', 40)").fetchone()
                assert ef_search == (123,)
                assert conn.execute("SELECT pgsim.rrf(2)").fetchone() == (pytest.approx(1 / 62),)
                assert conn.execute("SELECT pgsim.version()").fetchone() == (package_version(),)
                status = conn.execute(
                    "SELECT table_name, dead_letters FROM pgsim.sync_status WHERE id = %s", registration
                )
                assert status.fetchone() == ("public.notes", 1)
            assert shadows_run(conn) == []
            assert conn.execute("SELECT pgsim.requeue_dead_letters(%s)", registration).fetchone() == (1,)
            conn.execute("SELECT pgsim.remove_embedding('public.notes', 'embedding')")
            assert conn.execute("SELECT count(*) FROM pgsim.embedding").fetchone() == (0,)
            assert conn.execute("SELECT to_regclass('public.notes') IS NOT NULL").fetchone() == (True,)

            assert shadows_run(conn) == []
        finally:
            for name in (attacker, app):
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            conn.execute("DROP TABLE IF EXISTS public.docs, public.notes")


def test_shadows_made_before_install_are_not_what_pgsim_binds_to(server_dsn: str) -> None:
    """SQL-standard bodies and views bind names when they are made: the installer makes them with
    search_path pg_catalog, pg_temp, not the installing role's path, where the database owner's shadows
    would win."""
    with new_roles(server_dsn, "owner") as (owner,):
        with (
            scratch_database(server_dsn, "shadowed", owner=owner) as dsn,
            psycopg.connect(dsn, autocommit=True) as conn,
        ):
            conn.execute("CREATE EXTENSION vector")
            docs_table(conn)
            conn.execute("COMMENT ON INDEX public.docs_hnsw IS 'pgsim: ef_search=123'")
            plant_shadows(conn, owner, "docs")
            install(conn)

            assert conn.execute("SELECT pgsim.rrf(2)").fetchone() == (pytest.approx(1 / 62),)
            assert conn.execute("SELECT pgsim.index_ef_search('public.docs_hnsw', 40)").fetchone() == (123,)
            columns = conn.execute("SELECT pgsim.qualified_columns('OLD', ARRAY['a', 'B c']::name[])")
            assert columns.fetchone() == ('OLD.a, OLD."B c"',)
            searches_work(conn)
            assert conn.execute("SELECT count(*) FROM pgsim.sync_status").fetchone() == (0,)
            # nothing pgsim made refers to an object in public but pgvector's
            foreign = conn.execute(
                "SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid) || ' -> ' "
                "|| pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid) "
                "FROM pg_depend d JOIN pg_identify_object(d.refclassid, d.refobjid, 0) AS o ON true "
                "WHERE o.schema = 'public' AND (d.classid, d.objid) IN ("
                "  SELECT 'pg_proc'::regclass, p.oid FROM pg_proc p WHERE p.pronamespace = 'pgsim'::regnamespace"
                "  UNION ALL SELECT 'pg_rewrite'::regclass, r.oid FROM pg_rewrite r"
                "  JOIN pg_class c ON c.oid = r.ev_class WHERE c.relnamespace = 'pgsim'::regnamespace) "
                "AND NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = d.refclassid AND x.objid = d.refobjid "
                "  AND x.deptype = 'e' AND x.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'vector'))"
            ).fetchall()
            assert foreign == []
            assert shadows_run(conn) == []


def test_the_vector_extension_may_live_in_any_schema(server_dsn: str) -> None:
    """pgsim's functions name pgvector's objects in the extension's schema, which need not be on the
    caller's search_path."""
    with scratch_database(server_dsn, "vector_schema") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "Vectors"')
        conn.execute('CREATE EXTENSION vector SCHEMA "Vectors"')
        install(conn)
        docs_table(conn, vector='"Vectors".vector')
        searches_work(conn, vector='"Vectors".vector')
        made = conn.execute("SELECT objects FROM pgsim.migration WHERE name = 'functions/mmr.sql'").fetchone()
        assert made == (['function pgsim.mmr("Vectors".vector,"Vectors".vector[],integer,double precision)'],)
