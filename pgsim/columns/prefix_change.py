"""Changing how many of a registered column's values its HNSW index holds (prefix storage, or the whole
vector) without re-embedding: the vectors stay as they are, so only the index is built again. The new index
is built beside the old one (``CONCURRENTLY`` on an autocommit connection, so writes go on) while searches
keep the old one; one short transaction then swaps the two and updates the registration.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Literal

import psycopg
from psycopg import sql

from pgsim.columns.registry import (
    Registration,
    checked_prefix,
    chunk_table,
    registration_by_id,
    require_registration,
)
from pgsim.db.catalog import pinned_path
from pgsim.db.hnsw import HNSW, create_hnsw_index
from pgsim.db.names import derived_name
from pgsim.db.standby import require_primary
from pgsim.errors import InvalidInput

# Dropping the old index waits for every query that reads the table, and queries that arrive meanwhile wait
# behind it: each try waits at most SWAP_LOCK_TIMEOUT (unless the session set a lock_timeout of its own),
# then lets them run and tries again, SWAP_TRIES times in all.
SWAP_LOCK_TIMEOUT = "2s"
SWAP_TRIES = 10
STAGING_NAMES = 5  # candidate names for the new index, for when an object of another table has the first

PrefixArgument = int | Literal[False] | None  # None: as registered; False: the index holds the whole vector


def checked_prefix_argument(prefix: Any) -> PrefixArgument:
    """``prefix=`` of a change as given (None, False or a positive whole number); else a clear InvalidInput."""
    if prefix is None or prefix is False or (isinstance(prefix, int) and not isinstance(prefix, bool) and prefix > 0):
        return prefix
    raise InvalidInput(f"prefix must be a positive number of dimensions, or False (the whole vector); got {prefix!r}.")


def staging_names(table_name: str, column: str) -> list[str]:
    """The names a new prefix index may be built under, in the order they are tried."""
    return [derived_name(table_name, column, suffix=f"hnsw_prefix{number or ''}") for number in range(STAGING_NAMES)]


def change_prefix(
    conn: psycopg.Connection[Any], table: str, column: str, prefix: int | None, *, index: HNSW | None = None
) -> Registration:
    """Index the first ``prefix`` values of ``table.column``'s vectors (a size its model was trained to be cut
    to), or the whole vectors (``prefix=None``), in place of what its index holds now; ``index`` sizes the new
    index (default: as registered). The vectors are kept: nothing is encoded again. The new index is built
    under a staging name while searches use the old one (without blocking writes when ``conn`` is in
    autocommit mode outside a transaction and the table is not partitioned), then the old index is dropped,
    the new one takes its name and the registration its prefix, in one transaction. Dropping the old index
    waits for queries that read the table, a bounded time per try (SWAP_LOCK_TIMEOUT, or the session's own
    lock_timeout); after SWAP_TRIES tries it gives up, drops the new index and changes nothing. On a
    connection in a transaction, the table stays locked until the caller commits. A column registered
    without an index gets none. Returns the registration."""
    require_primary(conn, "pgsim.change_prefix")
    old = require_registration(conn, table, column)
    refuse_during_a_change(conn, old)
    wanted = checked_prefix(prefix, old.model, old.dimension, old.dtype)
    if wanted == old.prefix:
        held = f"the first {wanted} values" if wanted is not None else "the whole vectors"
        raise InvalidInput(f"The index of {old.table}.{old.column} holds {held} already: nothing to change.")
    if chunk_table(conn, old) is not None:
        raise InvalidInput(f"{old.table}.{old.column} is chunked, and prefix storage does not take chunks yet.")
    staged, hnsw = None, index or old.index
    if hnsw is not None and old.index_name is not None:
        staged = _staging_name(conn, old)
        idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # not in a caller's transaction
        try:
            create_hnsw_index(conn, old.table, old.column, staged, hnsw, opclass=old.opclass,
                              concurrently=conn.autocommit and idle, prefix=wanted)  # fmt: skip
        except BaseException:
            _drop_quietly(conn, old, staged)  # an interrupted CONCURRENTLY build leaves an invalid index
            raise
    sized = hnsw if staged is not None else old.index
    try:
        for attempt in range(1, SWAP_TRIES + 1):
            try:
                _swap(conn, old, staged, wanted, sized)
                break
            except psycopg.errors.LockNotAvailable:
                if attempt == SWAP_TRIES or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    raise
                time.sleep(min(attempt, 5))  # let the queries that queued behind the try run
    except BaseException as exc:
        # the old index serves on; the new one is not left behind where it can be dropped now
        left = staged is not None and not _drop_quietly(conn, old, staged)
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            raise InvalidInput(
                f"The index of {old.table}.{old.column} could not be swapped: queries kept the table locked "
                f"through {attempt} tries of {SWAP_LOCK_TIMEOUT} (or the session's lock_timeout). Its index and "
                "prefix are as they were; run the change again when the table is less busy"
                + (f" (it replaces the new index {staged}, left behind: the table was still locked)." if left else ".")
            ) from None
        raise
    new = registration_by_id(conn, old.id)
    assert new is not None
    return new


def _swap(
    conn: psycopg.Connection[Any], old: Registration, staged: str | None, wanted: int | None, sized: HNSW | None
) -> None:
    with pinned_path(conn):  # one transaction; the caller's search_path is back after it (a migration's)
        own_timeout = conn.execute("SELECT current_setting('lock_timeout') <> '0'").fetchone()
        if not (own_timeout and own_timeout[0]):
            conn.execute("SELECT set_config('lock_timeout', %s, true)", [SWAP_LOCK_TIMEOUT])
        current = conn.execute(
            "SELECT prefix, index_name FROM pgsim.embedding WHERE id = %s::int4 FOR UPDATE", [old.id]
        ).fetchone()
        if current != (old.prefix, old.index_name):
            raise InvalidInput(f"{old.table}.{old.column} changed while its new index was built; nothing changed.")
        refuse_during_a_change(conn, old)  # a re-embedding started meanwhile would register the old prefix
        if staged is not None and old.index_name is not None:
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(old.schema, old.index_name)))
            conn.execute(
                sql.SQL("ALTER INDEX {} RENAME TO {}").format(
                    sql.Identifier(old.schema, staged), sql.Identifier(old.index_name)
                )
            )
        conn.execute(
            "UPDATE pgsim.embedding SET prefix = %s, index_m = %s, index_ef_construction = %s WHERE id = %s::int4",
            [wanted, sized.m if sized else None, sized.ef_construction if sized else None, old.id],
        )


def _staging_name(conn: psycopg.Connection[Any], old: Registration) -> str:
    """A name for the new index in the table's schema: free, or held by an index of this table that is not its
    registered one (left by an interrupted change: dropped here). Never another table's object."""
    names = staging_names(old.table_name, old.column)
    for name in names:
        if name == old.index_name:
            continue
        with pinned_path(conn):
            found = conn.execute(
                "SELECT c.relkind, i.indrelid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "LEFT JOIN pg_index i ON i.indexrelid = c.oid WHERE n.nspname = %s AND c.relname = %s",
                [old.schema, name],
            ).fetchone()
        if found is None:
            return name
        if found[0] == "i" and found[1] == old.table_oid:
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(old.schema, name)))
            return name
    raise InvalidInput(
        f"No free name for the new index of {old.table}.{old.column}: other objects hold "
        f"{', '.join(names)}. Rename them first."
    )


def _drop_quietly(conn: psycopg.Connection[Any], old: Registration, staged: str) -> bool:
    """Drop the new index after a failure, if it can be dropped now (whether it was); a later change replaces
    it otherwise (:func:`_staging_name`)."""
    if conn.info.transaction_status not in (psycopg.pq.TransactionStatus.IDLE, psycopg.pq.TransactionStatus.INTRANS):
        return False  # the caller's transaction failed: its rollback takes the index with it
    with contextlib.suppress(psycopg.Error), conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", [SWAP_LOCK_TIMEOUT])
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(old.schema, staged)))
        return True
    return False


def refuse_during_a_change(conn: psycopg.Connection[Any], old: Registration) -> None:
    """InvalidInput when ``old`` is the new column of a change, or a change of it is filling another column."""
    if old.replaces is not None:
        raise InvalidInput(f"{old.table}.{old.column} is the new column of a change still filling, not a column.")
    under_way = conn.execute(
        "SELECT column_name FROM pgsim.embedding WHERE replaces OPERATOR(pg_catalog.=) %s::pg_catalog.int4 "
        "AND table_oid OPERATOR(pg_catalog.=) %s::pg_catalog.oid",
        [old.id, old.table_oid],
    ).fetchone()  # on the caller's search_path: qualified and cast (the rule in pgsim.db.catalog)
    if under_way:
        raise InvalidInput(
            f"A change of {old.table}.{old.column} is under way (into column {under_way[0]}); let the workers "
            f"finish it, or cancel it: pgsim remove-embedding {old.table} {under_way[0]}"
        )
