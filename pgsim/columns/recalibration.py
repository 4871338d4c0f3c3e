"""After a drain, measure a column's HNSW index again (pgsim.db.calibration) when its curve is missing or no
longer describes the table: the planner ignores a stale curve, so without this a table that grew or shrank
by a fifth would go back to the fixed thresholds until someone ran ``pgsim calibrate``.

Only a session that owns the table does it (the planner trusts the curve for every role), only when nothing
is queued for the column any more (a curve measured half-way through a backfill would be stale at once),
and only on a table large enough to store a curve. A failure is logged, never raised: the rows are synced.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from pgsim.columns.registry import Registration
from pgsim.db.calibration import MIN_ROWS, Calibration, calibrate_index

log = logging.getLogger(__name__)

AUTO_SECONDS = 15.0  # a drain's own calibration: shorter than `pgsim calibrate`'s default

NEEDED = """
SELECT pg_catalog.pg_has_role(CURRENT_USER, c.relowner, 'USAGE')
   AND c.reltuples >= %(min_rows)s
   AND NOT EXISTS (SELECT 1 FROM pgsim.queue q WHERE q.embedding_id = %(id)s)
   AND pgsim.knn_calibration(c.oid, a.attnum, i.indexrelid::regclass) IS NULL
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = %(column)s
JOIN pg_catalog.pg_index i ON i.indrelid = c.oid AND i.indkey[0] = a.attnum AND i.indpred IS NULL AND i.indisvalid
JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid
JOIN pg_catalog.pg_am am ON am.oid = ic.relam AND am.amname = 'hnsw'
WHERE c.oid = %(table)s
ORDER BY ic.relname LIMIT 1
"""


def recalibrate_if_stale(conn: psycopg.Connection[Any], registration: Registration) -> Calibration | None:
    """The new calibration of ``registration``'s column, or None when none was needed or possible."""
    try:
        with conn.transaction():
            row = conn.execute(
                NEEDED,
                {"min_rows": MIN_ROWS, "id": registration.id, "column": registration.column,
                 "table": registration.table_oid},
            ).fetchone()  # fmt: skip
        if not row or not row[0]:
            return None
        log.info("measuring %s.%s's index again: its calibration is missing or stale", registration.table,
                 registration.column)  # fmt: skip
        calibration = calibrate_index(conn, registration.table, registration.column, seconds=AUTO_SECONDS)
    except (psycopg.Error, ValueError) as exc:
        if conn.broken:
            raise
        log.warning("could not calibrate %s.%s: %s", registration.table, registration.column, exc)
        return None
    return calibration if calibration.stored else None
