"""After a drain, measure a column's HNSW index again (pgsim.db.calibration) when its curve is missing or no
longer describes the table: the planner ignores a stale curve, so without this a table that grew or shrank
by a fifth would go back to the fixed thresholds until someone ran ``pgsim calibrate``.

Only a session that owns the table does it (the planner trusts the curve for every role; a superuser or
BYPASSRLS session never measures another role's table, whose code ANALYZE would run), only when nothing is
queued for the column any more (a curve measured half-way through a backfill would be stale at once), only
on a table large enough to store a curve, and not again in this process until the table's row count has
moved by a fifth since the last try (a table whose rows the session cannot all see may never store one).
A failure is logged, never raised: the rows are synced.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg

from pgsim.columns.registry import Registration
from pgsim.db.calibration import MIN_ROWS, Calibration, calibrate_index
from pgsim.db.calibration_inputs import FULL_COSINE_INDEX
from pgsim.db.catalog import pin_search_path

log = logging.getLogger(__name__)

AUTO_SECONDS = 15.0  # a drain's own calibration: shorter than `pgsim calibrate`'s default
STALE_SHARE = 0.2  # as pgsim.knn_calibration judges a curve

# Everything by OID, under a pinned search_path: no name or operator of the session's path takes part.
NEEDED = """
SELECT pgsim.analysed_rows(c.oid)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = %(column)s::pg_catalog.name
JOIN pg_catalog.pg_roles r ON r.rolname = CURRENT_USER
CROSS JOIN LATERAL ({index}) AS i(index)
WHERE c.oid = %(table)s::pg_catalog.oid
  AND pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE')
  AND (c.relowner = r.oid OR NOT (r.rolsuper OR r.rolbypassrls))
  AND pgsim.analysed_rows(c.oid) >= %(min_rows)s::pg_catalog.float8
  AND NOT EXISTS (SELECT 1 FROM pgsim.queue q WHERE q.embedding_id = %(id)s::pg_catalog.int4)
  AND pgsim.knn_calibration(c.oid, a.attnum, i.index::pg_catalog.regclass) IS NULL
""".replace("{index}", FULL_COSINE_INDEX)


class _Stopped(Exception):
    """The worker was asked to stop while it measured: the measurement is dropped, nothing stored."""


_tried: dict[tuple[int, str], float] = {}  # (table OID, column): its row count at this process's last try
_tried_lock = threading.Lock()


def recalibrate_if_stale(
    conn: psycopg.Connection[Any], registration: Registration, stop: threading.Event | None = None
) -> Calibration | None:
    """The new calibration of ``registration``'s column, or None when none was needed or possible, or
    ``stop`` was set while it measured (checked after each level: a stopping worker does not wait out the
    budget)."""

    def stopping(_: float) -> None:
        if stop is not None and stop.is_set():
            raise _Stopped

    key = (registration.table_oid, registration.column)
    try:
        with conn.transaction():
            pin_search_path(conn)
            row = conn.execute(
                NEEDED,
                {"min_rows": MIN_ROWS, "id": registration.id, "column": registration.column,
                 "table": registration.table_oid},
            ).fetchone()  # fmt: skip
        if row is None:
            return None
        rows = float(row[0])
        with _tried_lock:
            last = _tried.get(key)
            if last is not None and abs(rows - last) <= STALE_SHARE * max(last, 1.0):
                return None
            _tried[key] = rows
        log.info("measuring %s.%s's index again: its calibration is missing or stale", registration.table,
                 registration.column)  # fmt: skip
        calibration = calibrate_index(
            conn, registration.table_oid, registration.column, seconds=AUTO_SECONDS, progress=stopping
        )
    except _Stopped:
        log.info("stopped measuring %s.%s's index: nothing stored", registration.table, registration.column)
        return None
    except (psycopg.Error, ValueError) as exc:
        if conn.broken:
            raise
        log.warning("could not calibrate %s.%s: %s", registration.table, registration.column, exc)
        return None
    return calibration if calibration.stored else None
