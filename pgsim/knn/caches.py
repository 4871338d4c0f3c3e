"""What a search reuses for a while per database: plans, column shapes, statements (a plan follows the
table's statistics, which change slowly; a stale one costs speed, never rows).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import psycopg

if TYPE_CHECKING:
    from pgsim.knn.planner import Plan
    from pgsim.knn.target import VectorColumn

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """A small map whose entries expire: a plan follows the table's statistics, which change slowly."""

    def __init__(self, seconds: float, size: int = 1024) -> None:
        self.seconds = seconds
        self.size = size
        self.entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None or time.monotonic() - entry[0] > self.seconds:
                self.entries.pop(key, None)
                return None
            return entry[1]

    def put(self, key: K, value: V) -> V:
        with self.lock:
            self.entries[key] = (time.monotonic(), value)
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


# Plans are reused for PLAN_SECONDS per (database, table, column, k, filter, tuning): the planner's estimate
# for a given filter changes only with the statistics, and a stale plan costs speed, never rows (the hnsw
# path falls back to an exact scan when short). Column shapes are reused as long.
PLAN_SECONDS = 30.0


plan_cache: TtlCache[tuple[Any, ...], Plan] = TtlCache(PLAN_SECONDS)


column_cache: TtlCache[tuple[Any, ...], VectorColumn] = TtlCache(PLAN_SECONDS)


statement_cache: TtlCache[tuple[Any, ...], tuple[bytes, ...]] = TtlCache(PLAN_SECONDS)


def forget_plans() -> None:
    """Drop cached plans and column shapes (after ANALYZE, a new index, or ALTER TABLE)."""
    plan_cache.clear()
    column_cache.clear()
    statement_cache.clear()


def database_key(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    """What a cached entry is valid for: the database, the role whose privileges apply (``SET ROLE`` on a
    pooled connection changes it) and the search_path that resolves table names (reported by the server)."""
    return (
        conn.info.host,
        conn.info.port,
        conn.info.dbname,
        current_role(conn),
        conn.info.parameter_status("search_path"),
    )


# Connections whose session role can become no other (not a superuser, a member of no role): their current
# role is their login user, known without asking the server.
_fixed_role: weakref.WeakKeyDictionary[psycopg.Connection[Any], bool] = weakref.WeakKeyDictionary()


def current_role(conn: psycopg.Connection[Any]) -> str:
    fixed = _fixed_role.get(conn)
    if fixed is None:
        row = conn.execute(
            "SELECT NOT r.rolsuper AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m WHERE m.member = r.oid) "
            "FROM pg_catalog.pg_roles r WHERE r.rolname = session_user"
        ).fetchone()
        fixed = _fixed_role[conn] = bool(row and row[0])
    if fixed:
        return conn.info.user
    row = conn.execute("SELECT current_user").fetchone()
    return str(row[0]) if row else conn.info.user
