"""Attacks on document search over chunks (review of pgsim.knn_documents, the chunked triggers, the ORM's and
Python's document paths), on the real server: chunk vectors are written by hand (random, so numpy gives the
exact answer and no model is needed to encode), in tables whose names and composite text keys need quoting."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from chunked_docs import document_distance, engine_as, last_query, owned_database
from fixtures.roles import Roles, acting
from psycopg import sql
from sqlalchemy import String, bindparam, event, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pgsim.columns.adding import add_embedding
from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.chunking.tables import add_chunks, remove_chunks
from pgsim.columns.grants import grant
from pgsim.errors import InvalidInput
from pgsim.knn.filtered import search
from pgsim.psycopg import register
from pgsim.quality.hybrid import hybrid_search
from pgsim.sqlalchemy import embedding_column

TABLE = 'We\'ird "Docs" v2'  # a quote, a double quote, a space, capitals (pgsim reads a dot as a schema's)
COLUMN = "Emb Ed"
KEYS = ("Tenant", "doc key")  # a composite text key
RNG_SEED = 20261202


@pytest.fixture(scope="module")
def database_dsn(server_dsn: str, roles: Roles) -> Iterator[str]:
    with owned_database(server_dsn, roles, "chunk_review") as dsn:
        yield dsn


@pytest.fixture
def admin(database_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        register(conn)
        yield conn


def key_of(i: int) -> tuple[str, str]:
    """Odd text keys: quotes, a backslash, a comment opener, unicode."""
    return (f"t{i % 3}", f"d'{i}\\ --/* é\"{i}")


def make_documents(
    admin: psycopg.Connection[Any],
    roles: Roles,
    table: str,
    documents: int,
    chunks_per_document: int,
    *,
    stale: str = "keep",
    keys: tuple[str, str] = KEYS,
    partitioned: bool = False,
) -> tuple[dict[tuple[str, str], np.ndarray], str, int]:
    """``table`` (two text key columns, section, body), the owner's, chunked embedding ``COLUMN`` of ``body``;
    every document gets ``chunks_per_document`` random chunks written by hand (the owner is not under row-level
    security). The chunk vectors per key, the chunk table's name, the dimension."""
    rng = np.random.default_rng(RNG_SEED)
    ident = sql.Identifier(table)
    with acting(admin, roles.owner):
        old_chunks = sql.Identifier(f"{table}__{COLUMN}_chunks")  # a document table dropped leaves it
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {}, {} CASCADE").format(old_chunks, ident))
        admin.execute(
            sql.SQL("CREATE TABLE {} ({} text, {} text, section text, body text, PRIMARY KEY ({}, {})){}").format(
                ident,
                *map(sql.Identifier, keys),
                *map(sql.Identifier, keys),
                sql.SQL(" PARTITION BY LIST ({})").format(sql.Identifier(keys[0])) if partitioned else sql.SQL(""),
            )
        )
        for n in range(3 if partitioned else 0):  # one partition per tenant
            admin.execute(
                sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES IN (%s)")
                .format(sql.Identifier(f"{table} part{n}"), ident)
                .as_string(admin)
                .replace("%s", sql.Literal(f"t{n}").as_string(admin))
            )
        quoted = TABLE  # pgsim's Python API takes the plain name
        add_embedding(admin, quoted, COLUMN, source="body", stale=stale)
        add_chunks(admin, quoted, COLUMN, Chunks(32, 8))
        grant(admin, "worker", roles.worker, tables=[quoted])
        grant(admin, "search", roles.app, tables=[quoted])
        admin.execute(sql.SQL("GRANT INSERT, UPDATE, DELETE ON {} TO {}").format(ident, sql.Identifier(roles.app)))
        chunk_table, dimension = admin.execute(
            "SELECT k.chunk_table::regclass::text, a.atttypmod FROM pgsim.chunking k "
            "JOIN pgsim.embedding e ON e.id = k.embedding_id "
            "JOIN pg_attribute a ON a.attrelid = k.chunk_table AND a.attname = 'embedding' "
            "WHERE e.table_oid = %s::regclass",
            [ident.as_string(admin)],
        ).fetchone()
        vectors: dict[tuple[str, str], np.ndarray] = {}
        for i in range(documents):
            key = key_of(i)
            vectors[key] = rng.standard_normal((chunks_per_document, dimension)).astype(np.float32)
            admin.execute(  # with a whole-text vector: a document without one is not searched (not embedded yet)
                sql.SQL("INSERT INTO {} ({}, {}, section, body, {}) VALUES (%s, %s, %s, %s, %s)").format(
                    ident, *map(sql.Identifier, keys), sql.Identifier(COLUMN)
                ),
                [*key, "even" if i % 2 == 0 else "odd", f"document {i}", vectors[key].mean(axis=0)],
            )
            with admin.cursor() as cur:
                cur.executemany(
                    sql.SQL(
                        "INSERT INTO {} ({}, {}, chunk_no, span_start, span_end, digest, embedding) "
                        "VALUES (%s, %s, %s, %s, %s, '\\x00', %s)"
                    ).format(sql.SQL(chunk_table), *map(sql.Identifier, keys)),
                    [(*key, no, no * 10, no * 10 + 10, vector) for no, vector in enumerate(vectors[key])],
                )
        admin.execute(sql.SQL("ANALYZE {}").format(ident))
        admin.execute(sql.SQL("ANALYZE {}").format(sql.SQL(chunk_table)))
    return vectors, chunk_table, dimension


def exact(vectors: dict[tuple[str, str], np.ndarray], query: np.ndarray, keep: Any = lambda key: True) -> list[Any]:
    """The documents by their distance over their chunks, nearest first, by numpy."""
    best = {key: document_distance(chunks, query) for key, chunks in vectors.items() if keep(key)}
    return sorted(best, key=best.__getitem__)


def knn_documents(conn: psycopg.Connection[Any], query: np.ndarray, k: int, filter: str | None, path: str) -> list:
    """pgsim.knn_documents on ``TABLE``.``COLUMN`` as the caller, forced to ``path``: (key, distance) rows."""
    thresholds = (0.0, 0.0) if path == "hnsw" else (1e9, 1.0)
    if path == "exact" and filter is None:
        filter = "true"  # without a filter the function always starts with the index
    rows = conn.execute(
        "SELECT r.row, r.distance FROM pgsim.knn_documents(%s, %s, %s, %s, %s, 100, %s, %s) AS r",
        [sql.Identifier(TABLE).as_string(conn), COLUMN, query, k, filter, *thresholds],
    ).fetchall()
    return [((row[KEYS[0]], row[KEYS[1]]), distance) for row, distance in rows]


@pytest.mark.parametrize("partitioned", [False, True], ids=["plain", "partitioned"])
@pytest.mark.parametrize("path", ["hnsw", "exact"])
@pytest.mark.parametrize("where", [None, "section = 'odd'"])
def test_odd_names_and_composite_text_keys_give_the_exact_k_documents(
    admin: psycopg.Connection[Any], roles: Roles, path: str, where: str | None, partitioned: bool
) -> None:
    """A quoted table and column name and a two-column text key with quotes, backslashes, ``--`` and ``/*``,
    the table partitioned by the key's first column or not: k distinct documents, in numpy's order, on both
    paths, with and without a filter; pgsim.knn (SQL) and pgsim.search (Python) give the same documents."""
    vectors, _, dimension = make_documents(admin, roles, TABLE, 60, 4, partitioned=partitioned)
    query = np.random.default_rng(7).standard_normal(dimension).astype(np.float32)
    keep = (lambda key: True) if where is None else (lambda key: int(key[1].rsplit('"', 1)[1]) % 2 == 1)
    expected = exact(vectors, query, keep)[:10]
    with acting(admin, roles.app):
        found = knn_documents(admin, query, 10, where, path)
    assert [key for key, _ in found] == expected
    assert [d for _, d in found] == sorted(d for _, d in found)
    if where is None:
        with acting(admin, roles.app):
            assert pgsim_knn(admin, query, 10) == expected
            hits = search(admin, TABLE, COLUMN, query.tolist(), k=10)
        assert [(hit.row[KEYS[0]], hit.row[KEYS[1]]) for hit in hits] == expected


def pgsim_knn(conn: psycopg.Connection[Any], query: np.ndarray, k: int, filter: str | None = None) -> list:
    """pgsim.knn (SQL) on ``TABLE``.``COLUMN``: the keys, nearest first."""
    rows = conn.execute(
        "SELECT r.row FROM pgsim.knn(%s, %s, %s, %s, %s) AS r",
        [sql.Identifier(TABLE).as_string(conn), COLUMN, query, k, filter],
    ).fetchall()
    return [(row[KEYS[0]], row[KEYS[1]]) for (row,) in rows]


def test_a_hidden_stale_document_is_not_found_by_its_old_chunks(admin: psycopg.Connection[Any], roles: Roles) -> None:
    vectors, _, dimension = make_documents(admin, roles, TABLE, 20, 3, stale="hide")
    target = key_of(5)
    query = vectors[target][1]  # exactly one of the document's chunks: it comes first
    with acting(admin, roles.app):
        assert pgsim_knn(admin, query, 3)[0] == target
        admin.execute(
            sql.SQL("UPDATE {} SET body = 'a new text, not chunked yet' WHERE {} = %s AND {} = %s").format(
                sql.Identifier(TABLE), *map(sql.Identifier, KEYS)
            ),
            list(target),
        )
        hidden = admin.execute(
            sql.SQL("SELECT {} IS NULL FROM {} WHERE {} = %s AND {} = %s").format(
                sql.Identifier(COLUMN), sql.Identifier(TABLE), *map(sql.Identifier, KEYS)
            ),
            list(target),
        ).fetchone()
        assert hidden == (True,)  # pgsim.hide_stale did its part
        found = pgsim_knn(admin, query, 3)
    assert target not in found  # the old text's chunks must not serve a document hidden as stale


def test_a_filter_that_closes_its_parenthesis_gives_no_duplicate_documents(
    admin: psycopg.Connection[Any], roles: Roles
) -> None:
    """The hnsw statement has the filter in ``WHERE <key match> AND (<filter>)``: a filter that closes the
    parenthesis would OR the key match away (every document for every chunk), a ``--`` comment the rest."""
    vectors, _, dimension = make_documents(admin, roles, TABLE, 30, 2)
    query = np.random.default_rng(3).standard_normal(dimension).astype(np.float32)
    with acting(admin, roles.app):
        try:
            found = knn_documents(admin, query, 10, "false) OR (true", "hnsw")
        except psycopg.errors.SyntaxError:
            # refused: pgsim.estimate_rows reads the filter first without parentheses, where no text that closes
            # them parses
            found = knn_documents(admin, query, 10, "true --\n", "hnsw")
    keys = [key for key, _ in found]
    assert len(keys) == len(set(keys)) == 10


def test_a_document_whose_key_changes_is_found_under_its_new_key(admin: psycopg.Connection[Any], roles: Roles) -> None:
    """The chunk table's foreign key moves the chunks with the key (ON UPDATE CASCADE), and the key update,
    without a change of text, queues nothing that would drop them."""
    vectors, chunk_table, _ = make_documents(admin, roles, TABLE, 20, 3)
    old, new = key_of(4), ("t9", "moved */ key ' --")
    query = vectors[old][2]
    with acting(admin, roles.app):
        admin.execute(
            sql.SQL("UPDATE {} SET {} = %s, {} = %s WHERE {} = %s AND {} = %s").format(
                sql.Identifier(TABLE), *map(sql.Identifier, KEYS), *map(sql.Identifier, KEYS)
            ),
            [*new, *old],
        )
        for path in ("hnsw", "exact"):
            found = knn_documents(admin, query, 5, None, path)
            assert found[0][0] == new and found[0][1] == pytest.approx(document_distance(vectors[old], query), abs=1e-5)
            assert old not in [key for key, _ in found]
        assert pgsim_knn(admin, query, 5)[0] == new


def test_row_level_security_keeps_k_when_the_nearest_documents_are_hidden(
    admin: psycopg.Connection[Any], roles: Roles
) -> None:
    """Under a policy that hides every even document (the nearest ones), both paths still give k visible
    documents, and none hidden: the hnsw path's growing fetch and its exact fallback see only what the caller
    may."""
    vectors, _, dimension = make_documents(admin, roles, TABLE, 80, 3)
    query = np.random.default_rng(11).standard_normal(dimension).astype(np.float32)
    visible = lambda key: int(key[1].rsplit('"', 1)[1]) % 2 == 1  # noqa: E731
    with acting(admin, roles.owner):
        admin.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(sql.Identifier(TABLE)))
        admin.execute(
            sql.SQL("CREATE POLICY odd_only ON {} FOR SELECT TO {} USING (section = 'odd')").format(
                sql.Identifier(TABLE), sql.Identifier(roles.app)
            )
        )
    expected = exact(vectors, query, visible)[:10]
    with acting(admin, roles.app):
        for path in ("hnsw", "exact"):
            assert [key for key, _ in knn_documents(admin, query, 10, None, path)] == expected
        chunks = admin.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(f"{TABLE}__{COLUMN}_chunks"))
        ).fetchone()
    assert chunks == (40 * 3,)  # the chunk table's policy follows the documents'


ORM_KEYS = ("Tenant", "doc_key")  # names the ORM takes from the attributes: plain str


def orm_model(explicit_names: bool = False) -> Any:
    """A mapped class for ``TABLE`` (a fresh registry each time: the table is made again per test): its key
    columns named by their attributes (``ORM_KEYS``), or named explicitly (``KEYS``), as a reflected table's
    or one declared with ``mapped_column("name", ...)`` are (SQLAlchemy makes such names ``quoted_name``)."""

    class Base(DeclarativeBase):
        pass

    if explicit_names:

        class Named(Base):
            __tablename__ = TABLE
            tenant: Mapped[str] = mapped_column(KEYS[0], String, primary_key=True)
            doc_key: Mapped[str] = mapped_column(KEYS[1], String, primary_key=True)
            section: Mapped[str | None] = mapped_column(String, nullable=True)
            body: Mapped[str | None] = mapped_column(String, nullable=True)
            emb = embedding_column(source="body", sync="worker")
            emb.column.name = COLUMN

        return Named

    class Doc(Base):
        __tablename__ = TABLE
        Tenant: Mapped[str] = mapped_column(String, primary_key=True)
        doc_key: Mapped[str] = mapped_column(String, primary_key=True)
        section: Mapped[str | None] = mapped_column(String, nullable=True)
        body: Mapped[str | None] = mapped_column(String, nullable=True)
        emb = embedding_column(source="body", sync="worker")
        emb.column.name = COLUMN

    return Doc


def test_the_orm_with_key_columns_named_explicitly(
    admin: psycopg.Connection[Any], roles: Roles, database_dsn: str
) -> None:
    vectors, _, dimension = make_documents(admin, roles, TABLE, 12, 2)
    query = np.random.default_rng(5).standard_normal(dimension).astype(np.float32)
    Named = orm_model(explicit_names=True)
    engine = engine_as(database_dsn, roles.app)
    try:
        with Session(engine) as session:
            found = session.scalars(select(Named).order_by(Named.emb.nearest(query.tolist())).limit(3))
            assert [(d.tenant, d.doc_key) for d in found] == exact(vectors, query)[:3]
    finally:
        engine.dispose()


def test_the_orm_on_odd_names_and_a_composite_text_key_with_offset_and_bound_limit(
    admin: psycopg.Connection[Any], roles: Roles, database_dsn: str
) -> None:
    """``.nearest()`` on a chunked column of a table whose name, key column and key values need quoting, under a filter
    whose literal holds a quote, ``--`` and ``/*`` (compiled to literal SQL for pgsim.knn_documents), with an
    OFFSET and a LIMIT given as a bound parameter: numpy's documents, each once."""
    vectors, _, dimension = make_documents(admin, roles, TABLE, 60, 4, keys=ORM_KEYS)
    query = np.random.default_rng(5).standard_normal(dimension).astype(np.float32)
    Doc = orm_model()
    engine = engine_as(database_dsn, roles.app)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, statement, *_: statements.append(statement))
    odd = lambda key: int(key[1].rsplit('"', 1)[1]) % 2 == 1  # noqa: E731
    try:
        with Session(engine) as session:
            nearest = Doc.emb.nearest(query.tolist())
            where = (Doc.section == "odd") & (Doc.body != "x' -- /* */ ')")
            statement = select(Doc).where(where).order_by(nearest).limit(5).offset(3)
            assert [(d.Tenant, d.doc_key) for d in session.scalars(statement)] == exact(vectors, query, odd)[3:8]
            assert "knn_documents" in last_query(statements)
            bound = select(Doc).order_by(nearest).limit(bindparam("n", type_=None)).offset(bindparam("skip"))
            found = [(d.Tenant, d.doc_key) for d in session.scalars(bound, {"n": 7, "skip": 2})]
            assert found == exact(vectors, query)[2:9]
            rows = session.execute(select(Doc.doc_key).order_by(nearest).limit(60)).all()
            assert [key for (key,) in rows] == [key for _, key in exact(vectors, query)]
    finally:
        engine.dispose()


def test_the_orm_after_the_chunks_are_removed(admin: psycopg.Connection[Any], roles: Roles, database_dsn: str) -> None:
    vectors, _, dimension = make_documents(admin, roles, TABLE, 10, 2, keys=ORM_KEYS)
    query = np.random.default_rng(9).standard_normal(dimension).astype(np.float32)
    Doc = orm_model()
    engine = engine_as(database_dsn, roles.app)
    try:
        with Session(engine) as session:
            assert len(session.scalars(select(Doc).order_by(Doc.emb.nearest(query.tolist())).limit(3)).all()) == 3
        with acting(admin, roles.owner):
            remove_chunks(admin, TABLE, COLUMN)
        with Session(engine) as session:  # rows by their own vector now: no stale chunk table is read
            assert len(session.scalars(select(Doc).order_by(Doc.emb.nearest(query.tolist())).limit(3)).all()) == 3
    finally:
        engine.dispose()


def test_python_hybrid_search_serves_a_role_with_column_level_select(
    admin: psycopg.Connection[Any], roles: Roles
) -> None:
    vectors, chunk_table, dimension = make_documents(admin, roles, TABLE, 20, 2)
    readable = [*KEYS, "section", "body", COLUMN, "fts"]
    with acting(admin, roles.owner):
        admin.execute(sql.SQL("ALTER TABLE {} ADD COLUMN secret text DEFAULT 'salary'").format(sql.Identifier(TABLE)))
        admin.execute(
            sql.SQL(
                "ALTER TABLE {} ADD COLUMN fts tsvector GENERATED ALWAYS AS (to_tsvector('english', "
                "coalesce(body, ''))) STORED"
            ).format(sql.Identifier(TABLE))
        )
        grant(admin, "search", roles.tenant, tables=[TABLE])
        admin.execute(
            sql.SQL("REVOKE SELECT ON {} FROM {}").format(sql.Identifier(TABLE), sql.Identifier(roles.tenant))
        )
        admin.execute(
            sql.SQL("GRANT SELECT ({}) ON {} TO {}").format(
                sql.SQL(", ").join(map(sql.Identifier, readable)), sql.Identifier(TABLE), sql.Identifier(roles.tenant)
            )
        )
    query = vectors[key_of(3)][0]
    with acting(admin, roles.tenant):
        hits = search(admin, TABLE, COLUMN, query.tolist(), k=3)
        assert (hits[0].row[KEYS[0]], hits[0].row[KEYS[1]]) == key_of(3) and "secret" not in hits[0].row
        fused = hybrid_search(admin, TABLE, COLUMN, "document 3", k=3)
    assert fused and all("secret" not in hit.row for hit in fused)
    assert (fused[0].row[KEYS[0]], fused[0].row[KEYS[1]]) == key_of(3)  # its words and its chunk name it
    assert fused[0].chunk_no is not None and fused[0].span is not None


def test_ingest_in_an_older_snapshot_than_a_switch_writes_no_vector_of_the_old_source(
    admin: psycopg.Connection[Any], roles: Roles, database_dsn: str
) -> None:
    """_check_registrations reads pgsim.embedding without FOR SHARE now, after LOCK TABLE: a caller's REPEATABLE
    READ transaction whose snapshot predates a model change's switch would still see the old registration and
    write the old source's vectors into the new column (and the writer supplied them: nothing queues the row).
    FOR SHARE raised a serialization failure there; a refusal of such a transaction will do too."""
    from pgsim.columns.bulk_load import ingest
    from pgsim.columns.model_change import change_embedding
    from pgsim.columns.worker import sync

    with acting(admin, roles.owner):
        admin.execute("DROP TABLE IF EXISTS ingested CASCADE")
        admin.execute("CREATE TABLE ingested (id int PRIMARY KEY, section text, body text)")
        # no index: CREATE INDEX CONCURRENTLY at the switch would wait for the writer's snapshot
        add_embedding(admin, "ingested", "embedding", source="body", index=None)
        admin.execute(sql.SQL("GRANT SELECT, INSERT ON ingested TO {}").format(sql.Identifier(roles.app)))
        grant(admin, "search", roles.app, tables=["ingested"])
        admin.execute("INSERT INTO ingested VALUES (1, 'cooking pasta with basil', 'chess engines and openings')")
        sync(admin, table="ingested", allow_superuser=True)
    with psycopg.connect(database_dsn, autocommit=True) as writer:
        writer.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(roles.app)))
        writer.autocommit = False
        writer.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        writer.execute("SELECT count(*) FROM pgsim.embedding").fetchone()  # the transaction's snapshot
        with acting(admin, roles.owner):  # meanwhile: the embedding changes its source, fills and switches
            change_embedding(admin, "ingested", "embedding", source="section")
            switched = 0
            for _ in range(3):
                switched += sync(admin, table="ingested", allow_superuser=True).switched
            assert switched == 1
        try:
            ingest(
                writer,
                "ingested",
                [{"id": 2, "section": "cooking pasta with basil", "body": "chess engines and openings"}],
            )
            writer.commit()
        except psycopg.errors.SerializationFailure:
            writer.rollback()
            return  # refused: the caller retries in a new transaction
        except InvalidInput as exc:
            writer.rollback()
            assert "repeatable read" in str(exc)
            return
    distance = admin.execute(
        "SELECT (a.embedding <=> b.embedding) FROM ingested a, ingested b WHERE a.id = 1 AND b.id = 2"
    ).fetchone()
    assert distance is not None and distance[0] < 1e-3  # row 2's vector is its section's, as row 1's is


def test_the_orm_with_a_filter_calling_a_function_in_public(
    admin: psycopg.Connection[Any], roles: Roles, database_dsn: str
) -> None:
    vectors, _, dimension = make_documents(admin, roles, TABLE, 20, 2, keys=ORM_KEYS)
    with acting(admin, roles.owner):
        admin.execute(
            "CREATE OR REPLACE FUNCTION public.is_odd(s text) RETURNS boolean LANGUAGE sql AS $$ SELECT s = 'odd' $$"
        )
    query = np.random.default_rng(13).standard_normal(dimension).astype(np.float32)
    Doc = orm_model()
    engine = engine_as(database_dsn, roles.app)
    odd = lambda key: int(key[1].rsplit('"', 1)[1]) % 2 == 1  # noqa: E731
    try:
        with Session(engine) as session:
            statement = select(Doc).where(func.is_odd(Doc.section)).order_by(Doc.emb.nearest(query.tolist())).limit(3)
            assert [(d.Tenant, d.doc_key) for d in session.scalars(statement)] == exact(vectors, query, odd)[:3]
    finally:
        engine.dispose()


def test_the_orm_with_an_offset_past_the_largest_k(
    admin: psycopg.Connection[Any], roles: Roles, database_dsn: str
) -> None:
    vectors, _, dimension = make_documents(admin, roles, TABLE, 12, 2, keys=ORM_KEYS)
    query = np.random.default_rng(17).standard_normal(dimension).astype(np.float32)
    Doc = orm_model()
    engine = engine_as(database_dsn, roles.app)
    try:
        with Session(engine) as session:
            nearest = Doc.emb.nearest(query.tolist())
            assert session.scalars(select(Doc).order_by(nearest).limit(5).offset(10_000)).all() == []
    finally:
        engine.dispose()
