"""The content-hash cache in the database (``pgsim.embedding_cache``): a text encoded once, by any table or
any earlier run, is looked up instead of encoded again.

Entries are keyed by model, model revision and the sha256 of the text as the encoder is given it (document
prefix included), so a cached vector is exactly what encoding would give, and by the role that stored them:
a role reads only its own entries and those of the roles it is a member of. Writers use it when asked:
``pgsim.ingest(..., cache=True)``, ``pgsim.sync``/``backfill``/``Worker(cache=True)``, ``--cache`` on the
command line. Storing happens in the writer's transaction: what a rolled-back batch encoded is not kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from pgsim.db.catalog import require_schema, vector_schema
from pgsim.encoding.encoder import MAX_CHARS, Encoder, Vector

Found = dict[str, Vector]  # vectors from the cache, by text

# The entries stored by this role or by a role it is a member of, by membership alone: also where row-level
# security does not apply (pgsim's owner) and for a superuser, whom pg_has_role grants every role. No other
# role can plant a vector for this role's text.
TRUSTED_LOOKUP = """
WITH RECURSIVE me(role) AS (SELECT pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER))::pg_catalog.oid),
trusted(role) AS (
    SELECT role FROM me
    UNION
    SELECT m.roleid FROM pg_catalog.pg_auth_members m JOIN trusted t ON m.member OPERATOR(pg_catalog.=) t.role
)
SELECT digest, embedding FROM pgsim.embedding_cache
WHERE model OPERATOR(pg_catalog.=) %s::pg_catalog.text AND model_revision OPERATOR(pg_catalog.=) %s::pg_catalog.text
  AND digest OPERATOR(pg_catalog.=) ANY(%s::pg_catalog.bytea[])
  AND stored_by OPERATOR(pg_catalog.=) ANY(ARRAY(SELECT role FROM trusted))
"""  # pg_catalog's operators, named: ingest runs it on the caller's search_path (the rule in pgsim.db.catalog)


def lookup(conn: psycopg.Connection[Any], encoder: Encoder, texts: Sequence[str | None]) -> Found:
    """The vectors the cache holds for ``texts`` under ``encoder``'s model."""
    digests = {_digest(encoder, text): text for text in _encodable(texts)}
    if not digests:
        return {}
    _require_table(conn)
    with conn.cursor(binary=True) as cur:
        rows = cur.execute(
            TRUSTED_LOOKUP,
            [encoder.model_name, encoder.revision, list(digests)],
        ).fetchall()
    return {digests[bytes(digest)]: vector.to_numpy().astype(np.float32) for digest, vector in rows}


def missing(texts: Sequence[str | None], found: Found) -> list[str | None]:
    """``texts`` with the cached ones blanked out: what is left to encode."""
    return [None if text in found else text for text in texts]


def merged(texts: Sequence[str | None], encoded: Sequence[Vector | None], found: Found) -> list[Vector | None]:
    """The vectors of ``texts``: from the cache where found, else as encoded."""
    return [found[text] if text in found else vector for text, vector in zip(texts, encoded, strict=True)]


def store(
    conn: psycopg.Connection[Any],
    encoder: Encoder,
    texts: Sequence[str | None],
    encoded: Sequence[Vector | None],
) -> int:
    """Add the vectors just encoded for ``texts`` (None where nothing was encoded); how many were new."""
    pairs = {_digest(encoder, text): vector for text, vector in zip(texts, encoded, strict=True)
             if vector is not None and text is not None}  # fmt: skip
    if not pairs:
        return 0
    _require_table(conn)
    with conn.transaction(), conn.cursor() as cur:
        vector_type = sql.Identifier(vector_schema(conn), "vector")  # a worker's batch pins search_path
        cur.execute(sql.SQL("CREATE TEMP TABLE pgsim_cache_new (digest bytea, embedding {})").format(vector_type))
        with cur.copy("COPY pgsim_cache_new (digest, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["bytea", "vector"])
            for digest, vector in pairs.items():
                copy.write_row((digest, vector))
        added = cur.execute(
            "INSERT INTO pgsim.embedding_cache (model, model_revision, digest, embedding) "
            "SELECT %s, %s, digest, embedding FROM pgsim_cache_new ON CONFLICT DO NOTHING",
            [encoder.model_name, encoder.revision],
        ).rowcount
        cur.execute("DROP TABLE pgsim_cache_new")
    return added


def _encodable(texts: Sequence[str | None]) -> list[str]:
    return [text for text in texts if text is not None and text.strip()]


def _digest(encoder: Encoder, text: str) -> bytes:
    return hashlib.sha256((encoder.document_prefix + text[:MAX_CHARS]).encode()).digest()


def _require_table(conn: psycopg.Connection[Any]) -> None:
    require_schema(conn, "embedding_cache", "the embedding cache (or leave the cache off)")
