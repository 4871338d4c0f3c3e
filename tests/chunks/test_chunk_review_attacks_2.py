"""Second review of chunked embeddings (add_embedding(chunks=), the leftover chunk table drop, the soft maximum,
Python hybrid search over documents). Chunk vectors are written by hand where the test is about SQL; the model
only encodes query texts (Python's hybrid search takes text).

Tests marked ``xfail(strict=True, reason="REVIEW: ...")`` show a bug; the others prove a property holds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest
from chunked_docs import document_distance, engine_as, owned_database, sync_as_worker
from fixtures.roles import Roles, acting
from psycopg import sql
from sqlalchemy import select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pgsim.columns.adding import add_embedding
from pgsim.columns.chunking.settings import Chunks
from pgsim.columns.grants import grant
from pgsim.columns.model_change import change_embedding
from pgsim.columns.registry import chunk_table, require_registration
from pgsim.columns.worker import sync
from pgsim.encoding.encoder import Encoder
from pgsim.errors import InvalidInput
from pgsim.knn.documents import search_documents
from pgsim.psycopg import register
from pgsim.quality.hybrid import hybrid_search
from pgsim.sqlalchemy import embedding_column

LEFTOVER_NOTE = "the only copy of my notes"


@pytest.fixture(scope="module")
def database_dsn(server_dsn: str, roles: Roles) -> Iterator[str]:
    with owned_database(server_dsn, roles, "chunk_review_2") as dsn:
        yield dsn


@pytest.fixture
def admin(database_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_dsn, autocommit=True) as conn:
        register(conn)
        yield conn


def ident(*names: str) -> sql.Identifier:
    return sql.Identifier(*names)


def hand_chunked(
    admin: psycopg.Connection[Any],
    roles: Roles,
    table: str,
    chunks_by_id: dict[Any, np.ndarray],
    *,
    bodies: dict[Any, str] | None = None,
    order: list[Any] | None = None,
    column: str = "embedding",
    key: str = "id",
    key_type: str = "int",
) -> str:
    """``table`` (key, body, fts), the owner's, with chunked embedding ``column`` of body; each document's chunk
    vectors written by hand (rows inserted in ``order``); the app may search it. The chunk table's name (SQL)."""
    with acting(admin, roles.owner):
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(ident(table)))
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident(f"{table}__{column}_chunks")))
        admin.execute(
            sql.SQL(
                "CREATE TABLE {} ({} " + key_type + " PRIMARY KEY, body text, fts tsvector GENERATED ALWAYS AS "
                "(to_tsvector('english', coalesce(body, ''))) STORED)"
            ).format(ident(table), ident(key))
        )
        add_embedding(admin, table, column, source="body", chunks=Chunks(32, 8))
        grant(admin, "search", roles.app, tables=[table])
        (chunk_table,) = admin.execute(
            "SELECT k.chunk_table::regclass::text FROM pgsim.chunking k JOIN pgsim.embedding e "
            "ON e.id = k.embedding_id WHERE e.table_oid = %s::regclass",
            [ident(table).as_string(admin)],
        ).fetchone()  # type: ignore[misc]
        for doc in order or list(chunks_by_id):
            vectors = chunks_by_id[doc]
            body = (bodies or {}).get(doc, f"document {doc}")
            admin.execute(
                sql.SQL("INSERT INTO {} ({}, body, {}) VALUES (%s, %s, %s)").format(
                    ident(table), ident(key), ident(column)
                ),
                [doc, body, None if vectors is None else vectors.mean(axis=0)],
            )
            if vectors is None:
                continue
            with admin.cursor() as cur:
                cur.executemany(
                    sql.SQL(
                        "INSERT INTO {} ({}, chunk_no, span_start, span_end, digest, embedding) "
                        "VALUES (%s, %s, %s, %s, '\\x00', %s)"
                    ).format(sql.SQL(chunk_table), ident(key)),
                    [(doc, no, no * 10, no * 10 + 10, vector) for no, vector in enumerate(vectors)],
                )
        admin.execute(sql.SQL("ANALYZE {}").format(ident(table)))
        admin.execute(sql.SQL("ANALYZE {}").format(sql.SQL(chunk_table)))
    return str(chunk_table)


def drop_anything(conn: psycopg.Connection[Any], name: str) -> None:
    """Drop the relation ``name`` in public, whatever its kind."""
    row = conn.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)", [f"public.{name}"]).fetchone()
    if row is not None:
        kind = "VIEW" if row[0] == "v" else "TABLE"
        conn.execute(sql.SQL("DROP " + kind + " {} CASCADE").format(ident("public", name)))


def dimension_of(admin: psycopg.Connection[Any]) -> int:
    from pgsim.encoding.models import DEFAULT_MODEL, model_dimension

    return model_dimension(DEFAULT_MODEL)


# --- the leftover chunk table drop (pgsim.columns.chunking.tables._left_by_a_dropped_table) -----------------


@pytest.mark.parametrize(
    "columns",
    [
        "id int, chunk_no int, span_start int, span_end int, digest bytea, embedding vector(3), notes text",
        "chunk_no text, span_start text, span_end text, digest text, embedding text, notes text",
    ],
    ids=["a chunk table with a notes column", "the names only, every type wrong, no key"],
)
def test_a_users_table_that_merely_has_the_chunk_column_names_is_not_dropped(
    admin: psycopg.Connection[Any], roles: Roles, columns: str
) -> None:
    with acting(admin, roles.owner):
        admin.execute("DROP TABLE IF EXISTS lo_docs, lo_docs__embedding_chunks CASCADE")
        admin.execute(f"CREATE TABLE lo_docs__embedding_chunks ({columns})")
        admin.execute("INSERT INTO lo_docs__embedding_chunks (notes) VALUES (%s)", [LEFTOVER_NOTE])
        admin.execute("CREATE TABLE lo_docs (id int PRIMARY KEY, body text)")
        refused = False
        try:
            add_embedding(admin, "lo_docs", "embedding", source="body", chunks=Chunks(32, 8))
        except InvalidInput:
            refused = True
        kept = admin.execute("SELECT pg_catalog.to_regclass('lo_docs__embedding_chunks') IS NOT NULL").fetchone()
        notes = admin.execute(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass('lo_docs__embedding_chunks') "
            "AND attname = 'notes'"
        ).fetchone()
    assert refused  # the table is the user's: pgsim must refuse, as it does for any other table of that name
    assert kept == (True,) and notes == (1,)


@pytest.mark.parametrize("kind", ["view", "partitioned", "another owner", "foreign key"])
def test_a_lookalike_that_is_not_a_plain_leftover_is_refused_and_kept(
    admin: psycopg.Connection[Any], roles: Roles, kind: str
) -> None:
    """PASSES (property): a view, a partitioned table, a table of another role, or one with a foreign key named
    like the chunk table is refused, and stays."""
    chunk_columns = "id int, chunk_no int, span_start int, span_end int, digest bytea, embedding vector(3)"
    admin.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(ident(roles.app)))
    with acting(admin, roles.owner):
        admin.execute("DROP TABLE IF EXISTS lk_docs, lk_other CASCADE")
        drop_anything(admin, "lk_docs__embedding_chunks")
        admin.execute("CREATE TABLE lk_other (id int PRIMARY KEY)")
        if kind == "view":
            admin.execute(
                "CREATE VIEW lk_docs__embedding_chunks AS SELECT 1 AS id, 0 AS chunk_no, 0 AS span_start, "
                "0 AS span_end, '\\x00'::bytea AS digest, '[1,2,3]'::vector AS embedding"
            )
        elif kind == "partitioned":
            admin.execute(f"CREATE TABLE lk_docs__embedding_chunks ({chunk_columns}) PARTITION BY LIST (id)")
        elif kind == "foreign key":
            admin.execute(
                f"CREATE TABLE lk_docs__embedding_chunks ({chunk_columns}, FOREIGN KEY (id) REFERENCES lk_other)"
            )
    if kind == "another owner":
        with acting(admin, roles.app):
            admin.execute(f"CREATE TABLE lk_docs__embedding_chunks ({chunk_columns})")
    with acting(admin, roles.owner):
        admin.execute("CREATE TABLE lk_docs (id int PRIMARY KEY, body text)")
        with pytest.raises(InvalidInput, match="exists already"):
            add_embedding(admin, "lk_docs", "embedding", source="body", chunks=Chunks(32, 8))
    assert admin.execute("SELECT to_regclass('lk_docs__embedding_chunks') IS NOT NULL").fetchone() == (True,)
    drop_anything(admin, "lk_docs__embedding_chunks")
    admin.execute(sql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(ident(roles.app)))


def test_a_real_leftover_is_dropped_and_the_table_chunks_again(admin: psycopg.Connection[Any], roles: Roles) -> None:
    """PASSES (property): the case the drop is for. A chunked table dropped with CASCADE leaves its chunk table;
    registering a new table of that name drops it and makes a fresh one (none of the old rows)."""
    d = dimension_of(admin)
    hand_chunked(admin, roles, "cascade_docs", {1: np.ones((2, d), dtype=np.float32)})
    with acting(admin, roles.owner):
        admin.execute("DROP TABLE cascade_docs CASCADE")
        assert admin.execute("SELECT count(*) FROM cascade_docs__embedding_chunks").fetchone() == (2,)
        admin.execute("CREATE TABLE cascade_docs (id int PRIMARY KEY, body text)")
        add_embedding(admin, "cascade_docs", "embedding", source="body", chunks=Chunks(32, 8))
        assert admin.execute("SELECT count(*) FROM cascade_docs__embedding_chunks").fetchone() == (0,)
        fk = admin.execute(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'cascade_docs__embedding_chunks'::regclass "
            "AND contype = 'f'"
        ).fetchone()
    assert fk == (1,)


# --- Python hybrid search on a chunked column (pgsim.quality.hybrid_documents) against SQL pgsim.hybrid_search --


def unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def sql_hybrid(conn: psycopg.Connection[Any], table: str, query: Any, text: str, k: int, **options: Any) -> list:
    named = sql.SQL("").join(sql.SQL(", {} => {}").format(ident(name), sql.Placeholder(name)) for name in options)
    return conn.execute(
        sql.SQL(
            "SELECT row, score, distance, vector_rank, text_rank, relevance FROM pgsim.hybrid_search("
            "%(table)s, 'embedding', %(q)s, %(text)s, %(k)s{})"
        ).format(named),
        {"table": ident(table).as_string(conn), "q": query, "text": text, "k": k, **options},
    ).fetchall()


def test_python_and_sql_hybrid_rank_equal_text_matches_alike(
    admin: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    query = np.asarray(encoder.encode_query("alpha"), dtype=np.float32)
    rng = np.random.default_rng(5)
    noise = [unit(rng.standard_normal(query.size)) for _ in range(3)]
    # document i's one chunk: nearer the query the smaller i (vector ranks 1, 2, 3); the same words in each
    chunks = {i: unit(query + (0.3 * i) * noise[i - 1])[None, :] for i in (1, 2, 3)}
    bodies = dict.fromkeys(chunks, "alpha beta gamma delta")
    hand_chunked(admin, roles, "tie_docs", chunks, bodies=bodies, order=[3, 2, 1])  # ctid order: 3, 2, 1
    with acting(admin, roles.app):
        python = hybrid_search(admin, "tie_docs", "embedding", "alpha", k=3)
        rows = sql_hybrid(admin, "tie_docs", query, "alpha", 3)
    assert [hit.vector_rank for hit in sorted(python, key=lambda h: h.row["id"])] == [1, 2, 3]
    sql_ranks = {row["id"]: (vector_rank, text_rank) for row, _, _, vector_rank, text_rank, _ in rows}
    python_ranks = {hit.row["id"]: (hit.vector_rank, hit.text_rank) for hit in python}
    assert python_ranks == sql_ranks
    assert [hit.row["id"] for hit in python] == [row["id"] for row, *_ in rows]


def test_python_and_sql_hybrid_agree_on_a_text_only_match_and_a_document_without_vector(
    admin: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    """PASSES (property): a document whose vector is NULL is a text match with no distance, relevance or chunk in
    both; min_score drops it in both; documents, scores and distances agree otherwise."""
    query = np.asarray(encoder.encode_query("kiwi"), dtype=np.float32)
    rng = np.random.default_rng(9)
    chunks: dict[int, Any] = {i: rng.standard_normal((1 + i % 3, query.size)).astype(np.float32) for i in range(1, 7)}
    chunks[7] = None  # not embedded
    bodies = {i: f"text {i} " + ("kiwi fruit" if i in (2, 7) else "other words") for i in chunks}
    hand_chunked(admin, roles, "null_docs", chunks, bodies=bodies)
    with acting(admin, roles.app):
        python = hybrid_search(admin, "null_docs", "embedding", "kiwi", k=7, candidates=7)
        rows = sql_hybrid(admin, "null_docs", query, "kiwi", 7, candidates=7)
        python_cut = hybrid_search(admin, "null_docs", "embedding", "kiwi", k=7, candidates=7, min_score=0.0)
        rows_cut = sql_hybrid(admin, "null_docs", query, "kiwi", 7, candidates=7, min_score=0.0)
    assert [hit.row["id"] for hit in python] == [row["id"] for row, *_ in rows]
    assert [hit.score for hit in python] == pytest.approx([score for _, score, *_ in rows])
    by_id = {hit.row["id"]: hit for hit in python}
    assert by_id[7].distance is None and by_id[7].relevance is None and by_id[7].chunk_no is None
    for row, _, distance, _, _, _ in rows:
        if row["id"] != 7:
            assert distance == pytest.approx(document_distance(chunks[row["id"]], query), abs=1e-5)
            assert by_id[row["id"]].distance == pytest.approx(distance, abs=1e-6)
    assert [hit.row["id"] for hit in python_cut] == [row["id"] for row, *_ in rows_cut]
    assert 7 not in [hit.row["id"] for hit in python_cut]


# --- names with a percent sign: every statement of the document paths is executed with parameters -----------


def literal_chunked(admin: psycopg.Connection[Any], roles: Roles, table: str, column: str, count: int) -> np.ndarray:
    """As hand_chunked, with no statement of the test's own taking parameters (a name with % in it would be read
    as a placeholder): ``count`` documents of two random chunks each; their vectors."""
    d = dimension_of(admin)
    rng = np.random.default_rng(11)
    vectors = rng.standard_normal((count, 2, d)).astype(np.float32)
    chunk_table = ident(f"{table}__{column}_chunks")
    with acting(admin, roles.owner):
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(ident(table)))
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(chunk_table))
        admin.execute(
            sql.SQL(
                "CREATE TABLE {} (id int PRIMARY KEY, body text, fts tsvector GENERATED ALWAYS AS "
                "(to_tsvector('english', coalesce(body, ''))) STORED)"
            ).format(ident(table))
        )
        add_embedding(admin, table, column, source="body", chunks=Chunks(32, 8))
        grant(admin, "search", roles.app, tables=[table])

        def text(vector: np.ndarray) -> sql.Composable:
            return sql.SQL("{}::vector").format(sql.Literal("[" + ",".join(map(str, vector.tolist())) + "]"))

        for i in range(count):
            admin.execute(
                sql.SQL("INSERT INTO {} (id, body, {}) VALUES ({}, {}, {})").format(
                    ident(table), ident(column), sql.Literal(i), sql.Literal(f"document {i}"), text(vectors[i].mean(0))
                )
            )
            for no in range(2):
                admin.execute(
                    sql.SQL(
                        "INSERT INTO {} (id, chunk_no, span_start, span_end, digest, embedding) "
                        "VALUES ({}, {}, 0, 10, '\\x00', {})"
                    ).format(chunk_table, sql.Literal(i), sql.Literal(no), text(vectors[i][no]))
                )
    return vectors


def test_a_column_named_with_a_percent_sign_is_refused_clearly(admin: psycopg.Connection[Any], roles: Roles) -> None:
    """Was a bug (every Python search of such a column failed: psycopg reads the % in the quoted chunk table name
    as a placeholder); now add_embedding refuses the name up front and changes nothing."""
    with pytest.raises(InvalidInput, match="holds '%'"):
        literal_chunked(admin, roles, "pct_docs", "emb%(q)s", 4)
    assert admin.execute("SELECT to_regclass('\"pct_docs__emb%(q)s_chunks\"')").fetchone() == (None,)


ODD_TABLE = "Hy\"b R'id $$ x"
ODD_COLUMN = "Emb $1 Ed"
ODD_KEYS = ("Ten ant", 'doc"key')


def test_sql_hybrid_text_only_matches_on_odd_names_and_a_composite_key(
    admin: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    """PASSES (property): the new format() of pgsim.hybrid_search's text distance on a chunked column with a quoted
    table name holding $$, a column holding $1, and a two-column key with a space and a double quote: a text-only
    match (outside the vector list) gets its document distance over its chunks, as numpy computes it; Python's
    hybrid gives the same documents and distances."""
    query = np.asarray(encoder.encode_query("kiwi"), dtype=np.float32)
    rng = np.random.default_rng(13)
    table, keys = ident(ODD_TABLE), [ident(k) for k in ODD_KEYS]
    with acting(admin, roles.owner):
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(table))
        admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident(f"{ODD_TABLE}__{ODD_COLUMN}_chunks")))
        admin.execute(
            sql.SQL(
                "CREATE TABLE {} ({} text, {} int, body text, fts tsvector GENERATED ALWAYS AS "
                "(to_tsvector('english', coalesce(body, ''))) STORED, PRIMARY KEY ({}, {}))"
            ).format(table, *keys, *keys)
        )
        add_embedding(admin, ODD_TABLE, ODD_COLUMN, source="body", chunks=Chunks(32, 8))
        grant(admin, "search", roles.app, tables=[ODD_TABLE])
        (chunk_table,) = admin.execute(
            "SELECT k.chunk_table::regclass::text FROM pgsim.chunking k JOIN pgsim.embedding e "
            "ON e.id = k.embedding_id WHERE e.table_oid = %s::regclass",
            [table.as_string(admin)],
        ).fetchone()  # type: ignore[misc]
        vectors = {}
        for i in range(8):
            key = (f"t'{i % 2}", i)
            vectors[key] = rng.standard_normal((1 + i % 3, query.size)).astype(np.float32)
            if i < 4:  # the four nearest documents: the query itself in a chunk; no word of it
                vectors[key][0] = query
            body = "other words" if i < 4 else "kiwi fruit" + " melon" * i  # no equal text scores
            admin.execute(
                sql.SQL("INSERT INTO {} ({}, {}, body, {}) VALUES (%s, %s, %s, %s)").format(
                    table, *keys, ident(ODD_COLUMN)
                ),
                [*key, body, vectors[key].mean(axis=0)],
            )
            with admin.cursor() as cur:
                cur.executemany(
                    sql.SQL(
                        "INSERT INTO {} ({}, {}, chunk_no, span_start, span_end, digest, embedding) "
                        "VALUES (%s, %s, %s, 0, 1, '\\x00', %s)"
                    ).format(sql.SQL(chunk_table), *keys),
                    [(*key, no, vector) for no, vector in enumerate(vectors[key])],
                )
    with acting(admin, roles.app):
        rows = admin.execute(
            "SELECT row, distance, vector_rank, text_rank FROM pgsim.hybrid_search(%s, %s, %s, 'kiwi', 4, "
            "candidates => 4)",
            [table.as_string(admin), ODD_COLUMN, query],
        ).fetchall()
        python = hybrid_search(admin, ODD_TABLE, ODD_COLUMN, "kiwi", k=4, candidates=4)
    text_only = [(row, distance) for row, distance, vector_rank, _ in rows if vector_rank is None]
    assert len(text_only) == 2  # the two best kiwi documents, outside the vector list
    for row, distance in text_only:
        key = (row[ODD_KEYS[0]], row[ODD_KEYS[1]])
        assert distance == pytest.approx(document_distance(vectors[key], query), abs=1e-5)
    assert [(hit.row[ODD_KEYS[0]], hit.row[ODD_KEYS[1]]) for hit in python] == [
        (row[ODD_KEYS[0]], row[ODD_KEYS[1]]) for row, *_ in rows
    ]
    assert [hit.distance for hit in python] == pytest.approx([distance for _, distance, *_ in rows], abs=1e-6)


# --- add_embedding(chunks=) ----------------------------------------------------------------------------------


def test_add_embedding_with_chunks_concurrently_chunks_the_rows_already_there(
    admin: psycopg.Connection[Any], roles: Roles
) -> None:
    """PASSES (property): concurrently=True queues every row after the transaction (add_chunks(queue=False) in
    it): one drain embeds and chunks both documents, and the document search finds them."""
    with acting(admin, roles.owner):
        admin.execute("DROP TABLE IF EXISTS conc_docs CASCADE")
        admin.execute("DROP TABLE IF EXISTS conc_docs__embedding_chunks")
        admin.execute("CREATE TABLE conc_docs (id int PRIMARY KEY, body text)")
        admin.execute("INSERT INTO conc_docs VALUES (1, 'Tuning PostgreSQL for writes'), (2, 'Baking sourdough')")
        add_embedding(admin, "conc_docs", "embedding", source="body", chunks=Chunks(32, 8), concurrently=True)
        grant(admin, "worker", roles.worker, tables=["conc_docs"])
        grant(admin, "search", roles.app, tables=["conc_docs"])
    sync_as_worker(admin, roles, "conc_docs")
    with acting(admin, roles.owner):
        chunked = admin.execute(
            "SELECT id, count(*) FROM conc_docs__embedding_chunks GROUP BY id ORDER BY id"
        ).fetchall()
        embedded = admin.execute("SELECT count(*) FROM conc_docs WHERE embedding IS NOT NULL").fetchone()
    assert chunked == [(1, 1), (2, 1)] and embedded == (2,)
    with acting(admin, roles.app):
        hits = search_documents(admin, "conc_docs", "embedding", "bread", k=2)
    assert [hit.row["id"] for hit in hits] == [2, 1]


# --- the hnsw path's pool of 50 and the soft maximum ------------------------------------------------------------


def sql_documents(conn: psycopg.Connection[Any], table: str, query: np.ndarray, k: int, path: str) -> list:
    params = (None, 0.0, 0.0) if path == "hnsw" else ("true", 1e9, 1.0)
    return [
        (row["id"], distance)
        for row, distance in conn.execute(
            "SELECT r.row, r.distance FROM pgsim.knn_documents(%s, 'embedding', %s, %s, %s, 100, %s, %s) AS r",
            [table, query, k, *params],
        ).fetchall()
    ]


def test_more_than_50_documents_tied_on_their_nearest_chunk(admin: psycopg.Connection[Any], roles: Roles) -> None:
    """PASSES (property, and a limit to know): 60 documents all hold the query as a chunk (a tie on the nearest
    chunk), their other chunk differs. Python and SQL agree path for path, and the exact paths give numpy's
    order. The hnsw path ranks only the 50 tied documents with the lowest keys: document 55, the nearest by the
    soft maximum (both its chunks are the query), is not among its hits, while the exact path puts it first."""
    d = dimension_of(admin)
    rng = np.random.default_rng(17)
    query = unit(rng.standard_normal(d))
    chunks = {}
    for i in range(60):
        other = unit(query + (0.2 + i / 30) * unit(rng.standard_normal(d)))
        chunks[i] = np.stack([query, query if i == 55 else other])
    hand_chunked(admin, roles, "tied_docs", chunks)
    expected = sorted(chunks, key=lambda i: (round(document_distance(chunks[i], query), 6), i))[:5]
    with acting(admin, roles.app):
        sql_hnsw = sql_documents(admin, "tied_docs", query, 5, "hnsw")
        sql_exact = sql_documents(admin, "tied_docs", query, 5, "exact")
        python_hnsw = search_documents(admin, "tied_docs", "embedding", query.tolist(), k=5)
        python_exact = search_documents(
            admin, "tied_docs", "embedding", query.tolist(), k=5, where=sql.SQL("id >= 0"), exact_below_rows=1e9
        )
    assert [i for i, _ in sql_exact] == [hit.row["id"] for hit in python_exact] == expected
    assert expected[0] == 55
    assert [i for i, _ in sql_hnsw] == [hit.row["id"] for hit in python_hnsw]
    assert [distance for _, distance in sql_hnsw] == pytest.approx([hit.distance for hit in python_hnsw], abs=1e-9)
    assert 55 not in [i for i, _ in sql_hnsw]  # the pool's limit: ties on the nearest chunk are cut by key


def test_halfvec_documents_one_chunk_and_an_opposite_chunk(admin: psycopg.Connection[Any], roles: Roles) -> None:
    """PASSES (property): halfvec chunks; a one-chunk document's distance is its chunk's; a chunk opposite the
    query (distance 2) weighs exp(-20) in the mean, without underflow or NaN; SQL, Python and numpy agree."""
    d = dimension_of(admin)
    rng = np.random.default_rng(19)
    query = unit(rng.standard_normal(d))
    near = unit(query + 0.5 * unit(rng.standard_normal(d)))
    chunks = {1: near[None, :], 2: np.stack([near, -query]), 3: np.stack([-query, -query]), 4: np.stack([query] * 5)}
    with acting(admin, roles.owner):
        admin.execute("DROP TABLE IF EXISTS half_docs CASCADE")
        admin.execute("DROP TABLE IF EXISTS half_docs__embedding_chunks")
        admin.execute("CREATE TABLE half_docs (id int PRIMARY KEY, body text)")
        add_embedding(admin, "half_docs", "embedding", source="body", dtype="halfvec", chunks=Chunks(32, 8))
        grant(admin, "search", roles.app, tables=["half_docs"])
        for i, vectors in chunks.items():
            admin.execute(
                "INSERT INTO half_docs VALUES (%s, 'x', %s::vector::halfvec)", [i, unit(vectors.mean(axis=0) + 1e-3)]
            )
            for no, vector in enumerate(vectors):
                admin.execute(
                    "INSERT INTO half_docs__embedding_chunks (id, chunk_no, span_start, span_end, digest, embedding) "
                    "VALUES (%s, %s, 0, 1, '\\x00', %s::vector::halfvec)",
                    [i, no, vector],
                )
    rounded = {i: v.astype(np.float16).astype(np.float32) for i, v in chunks.items()}
    q16 = query.astype(np.float16).astype(np.float32)
    expected = {i: document_distance(v, q16) for i, v in rounded.items()}
    with acting(admin, roles.app):
        for path in ("hnsw", "exact"):
            found = dict(sql_documents(admin, "half_docs", query, 4, path))
            assert found == pytest.approx(expected, abs=1e-4), path
        python = {hit.row["id"]: hit.distance for hit in search_documents(admin, "half_docs", "embedding", query, k=4)}
    assert python == pytest.approx(expected, abs=1e-4)
    assert expected[3] == pytest.approx(2.0, abs=1e-3) and expected[1] == pytest.approx(
        1 - q16 @ rounded[1][0] / np.linalg.norm(rounded[1][0]) / np.linalg.norm(q16), abs=1e-5
    )


def test_python_hybrid_on_a_chunked_table_named_q(
    admin: psycopg.Connection[Any], roles: Roles, encoder: Encoder
) -> None:
    query = np.asarray(encoder.encode_query("kiwi"), dtype=np.float32)
    chunks = {1: query[None, :], 2: -query[None, :]}
    hand_chunked(admin, roles, "q", chunks, bodies={1: "apple", 2: "kiwi"})
    with acting(admin, roles.app):
        rows = sql_hybrid(admin, "q", query, "kiwi", 2)
        assert sorted(row["id"] for row, *_ in rows) == [1, 2]  # SQL is fine
        python = hybrid_search(admin, "q", "embedding", "kiwi", k=2)
    assert [hit.row["id"] for hit in python] == [row["id"] for row, *_ in rows]


@pytest.mark.parametrize("key", ["chunk_no", "digest"])
def test_add_embedding_with_chunks_refused_leaves_nothing_behind(
    admin: psycopg.Connection[Any], roles: Roles, key: str
) -> None:
    """PASSES (property): a key column named like a chunk column is refused, and the one-step registration is
    undone whole: no column, no registration, no triggers, no chunk table."""
    with acting(admin, roles.owner):
        admin.execute("DROP TABLE IF EXISTS clash_docs CASCADE")
        admin.execute(sql.SQL("CREATE TABLE clash_docs ({} int PRIMARY KEY, body text)").format(ident(key)))
        with pytest.raises(InvalidInput, match=key):
            add_embedding(admin, "clash_docs", "embedding", source="body", chunks=Chunks(32, 8))
        left = admin.execute(
            "SELECT (SELECT count(*) FROM pg_attribute WHERE attrelid = 'clash_docs'::regclass AND attname = "
            "'embedding'), (SELECT count(*) FROM pgsim.embedding WHERE table_oid = 'clash_docs'::regclass), "
            "(SELECT count(*) FROM pg_trigger WHERE tgrelid = 'clash_docs'::regclass AND NOT tgisinternal), "
            "to_regclass('clash_docs__embedding_chunks')"
        ).fetchone()
    assert left == (0, 0, 0, None)


@pytest.mark.parametrize("how", ["PARTITION OF archive FOR VALUES IN (1)", "() INHERITS (archive)"])
def test_a_partition_of_a_users_table_named_like_the_chunk_table_is_not_dropped(
    admin: psycopg.Connection[Any], roles: Roles, how: str
) -> None:
    d = dimension_of(admin)
    partitioned = how.startswith("PARTITION")
    with acting(admin, roles.owner):
        admin.execute("DROP TABLE IF EXISTS part_docs, archive CASCADE")
        drop_anything(admin, "part_docs__embedding_chunks")
        admin.execute(
            f"CREATE TABLE archive (id int NOT NULL, chunk_no int NOT NULL, span_start int NOT NULL, "
            f"span_end int NOT NULL, digest bytea NOT NULL, embedding vector({d}) NOT NULL)"
            + (" PARTITION BY LIST (id)" if partitioned else "")
        )
        admin.execute(f"CREATE TABLE part_docs__embedding_chunks {how}")
        admin.execute(
            "INSERT INTO archive VALUES (1, 0, 0, 1, '\\x00', %s)", [np.ones(d, dtype=np.float32)]
        ) if partitioned else admin.execute(
            "INSERT INTO part_docs__embedding_chunks VALUES (1, 0, 0, 1, '\\x00', %s)", [np.ones(d, dtype=np.float32)]
        )
        admin.execute("CREATE TABLE part_docs (id int PRIMARY KEY, body text)")
        refused = False
        try:
            add_embedding(admin, "part_docs", "embedding", source="body", chunks=Chunks(32, 8))
        except (InvalidInput, psycopg.Error):
            refused = True
        archived = admin.execute("SELECT count(*) FROM archive").fetchone()
    assert refused and archived == (1,)


def test_two_registrations_whose_chunk_table_names_collide(admin: psycopg.Connection[Any], roles: Roles) -> None:
    with acting(admin, roles.owner):
        admin.execute('DROP TABLE IF EXISTS "nc__b", "nc" CASCADE')
        drop_anything(admin, "nc__b__c_chunks")
        admin.execute('CREATE TABLE "nc__b" (id int PRIMARY KEY, body text)')
        admin.execute('CREATE TABLE "nc" (id int PRIMARY KEY, body text)')
        add_embedding(admin, "nc__b", "c", source="body", chunks=Chunks(32, 8))
        add_embedding(admin, "nc", "b__c", source="body", chunks=Chunks(32, 8))
        tables = admin.execute(
            "SELECT count(DISTINCT k.chunk_table) FROM pgsim.chunking k JOIN pgsim.embedding e "
            "ON e.id = k.embedding_id WHERE e.table_oid IN ('nc__b'::regclass, 'nc'::regclass)"
        ).fetchone()
        assert tables == (2,)  # the second takes a name with a hash of its table and column
        second = chunk_table(admin, require_registration(admin, "nc", "b__c"))
        assert second is not None and second.name != "nc__b__c_chunks"
        # a change of its chunks switches to a new chunk table, which takes that name, not the first's
        change_embedding(admin, "nc", "b__c", chunks=Chunks(48, 8))
        sync(admin, table="nc", allow_superuser=True)
        switched = chunk_table(admin, require_registration(admin, "nc", "b__c"))
        first = chunk_table(admin, require_registration(admin, "nc__b", "c"))
    assert switched is not None and (switched.name, switched.tokens) == (second.name, 48)
    assert first is not None and first.name == "nc__b__c_chunks"


# --- errors: a chunked column's searches should fail as an unchunked column's do -------------------------------


@pytest.fixture
def err_docs(admin: psycopg.Connection[Any], roles: Roles) -> np.ndarray:
    d = dimension_of(admin)
    query = unit(np.random.default_rng(23).standard_normal(d))
    for table, chunked in (("err_docs", True), ("err_plain", False)):
        if chunked:
            hand_chunked(admin, roles, table, {1: query[None, :], 2: -query[None, :]})
            continue
        with acting(admin, roles.owner):
            admin.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(ident(table)))
            admin.execute(
                sql.SQL(
                    "CREATE TABLE {} (id int PRIMARY KEY, body text, fts tsvector GENERATED ALWAYS AS "
                    "(to_tsvector('english', coalesce(body, ''))) STORED)"
                ).format(ident(table))
            )
            add_embedding(admin, table, "embedding", source="body")
            grant(admin, "search", roles.app, tables=[table])
            admin.execute(sql.SQL("INSERT INTO {} VALUES (1, 'kiwi', DEFAULT, %s)").format(ident(table)), [query])
    return query


@pytest.mark.parametrize("how", ["search"])
def test_a_filter_on_a_missing_column_is_an_input_error_on_a_chunked_column(
    admin: psycopg.Connection[Any], roles: Roles, err_docs: np.ndarray, how: str
) -> None:
    from pgsim.knn.filtered import search

    where = sql.SQL("no_such_column = 1")
    with acting(admin, roles.app):
        for table in ("err_plain", "err_docs"):  # the unchunked one first: InvalidInput
            with pytest.raises(InvalidInput):
                if how == "search":
                    search(admin, table, "embedding", err_docs.tolist(), k=1, where=where)
                else:
                    hybrid_search(admin, table, "embedding", "kiwi", k=1, where=where)


def test_hybrid_search_with_a_filter_on_a_missing_column_is_an_input_error_on_a_chunked_column(
    admin: psycopg.Connection[Any], roles: Roles, err_docs: np.ndarray
) -> None:
    """PASSES (property): Python hybrid search says InvalidInput on both kinds of column."""
    with acting(admin, roles.app):
        for table in ("err_plain", "err_docs"):
            with pytest.raises(InvalidInput):
                hybrid_search(admin, table, "embedding", "kiwi", k=1, where=sql.SQL("no_such_column = 1"))


# --- the ORM's two document paths --------------------------------------------------------------------------------


def orm_nearest(admin: psycopg.Connection[Any], roles: Roles, database_dsn: str, limit: int | None) -> tuple:
    """Documents of one to four chunks where the nearest chunk alone would rank them otherwise; the ids
    .nearest() gives (with ``limit`` or none), numpy's soft-maximum order, and the order of the whole-text vectors."""
    d = dimension_of(admin)
    rng = np.random.default_rng(29)
    query = unit(rng.standard_normal(d))
    chunks = {}
    for i in range(1, 9):
        near = unit(query + (0.6 + 0.05 * i) * unit(rng.standard_normal(d)))  # one near chunk, nearer the lower i
        rest = [unit(query + (0.9 - 0.1 * j) * unit(rng.standard_normal(d))) for j in range(i % 4)]
        chunks[i] = np.stack([near, *rest])
    hand_chunked(admin, roles, "orm_docs", chunks)  # each document's own vector: the mean of its chunks
    expected = sorted(chunks, key=lambda i: document_distance(chunks[i], query))
    by_nearest_chunk = sorted(chunks, key=lambda i: float(1 - (chunks[i] @ query).max()))
    assert expected != by_nearest_chunk  # the soft maximum matters here
    by_own_vector = sorted(chunks, key=lambda i: document_distance(chunks[i].mean(axis=0)[None, :], query))

    class Base(DeclarativeBase):
        pass

    class Doc(Base):
        __tablename__ = "orm_docs"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str | None]
        embedding = embedding_column(source="body", sync="worker", chunks=Chunks(32, 8))

    engine = engine_as(database_dsn, roles.app)
    try:
        with Session(engine) as session:
            statement = select(Doc).order_by(Doc.embedding.nearest(query.tolist()))
            if limit is not None:
                statement = statement.limit(limit)
            found = [doc.id for doc in session.scalars(statement)]
    finally:
        engine.dispose()
    return found, expected, by_own_vector


def test_the_orm_with_a_limit_ranks_documents_by_the_soft_maximum(
    admin: psycopg.Connection[Any], roles: Roles, database_dsn: str
) -> None:
    """PASSES (property): .nearest() with a LIMIT (pgsim.knn_documents) gives numpy's soft-maximum order."""
    found, expected, _ = orm_nearest(admin, roles, database_dsn, 5)
    assert found == expected[:5]


def test_the_orm_without_a_limit_ranks_documents_by_the_soft_maximum(
    admin: psycopg.Connection[Any], roles: Roles, database_dsn: str
) -> None:
    found, expected, by_own_vector = orm_nearest(admin, roles, database_dsn, None)
    assert found == expected, f"ordered by the documents' own vectors instead: {found == by_own_vector}"


def test_python_document_search_with_a_key_named_distance(admin: psycopg.Connection[Any], roles: Roles) -> None:
    d = dimension_of(admin)
    query = unit(np.random.default_rng(31).standard_normal(d))
    hand_chunked(admin, roles, "dist_docs", {1: query[None, :], 2: -query[None, :]}, key="distance")
    with acting(admin, roles.app):
        rows = admin.execute(
            "SELECT r.row FROM pgsim.knn_documents('dist_docs', 'embedding', %s, 1) AS r", [query]
        ).fetchall()
        assert rows[0][0]["distance"] == 1  # SQL is fine
        hits = search_documents(admin, "dist_docs", "embedding", query.tolist(), k=1)
    assert hits[0].row["distance"] == 1
