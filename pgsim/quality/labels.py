"""Zero-shot labelling: each row gets the label whose description is nearest to its embedding. The label
descriptions are encoded once, with the column's model; ``pgsim.nearest_label`` compares them
with every row inside PostgreSQL."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql

from pgsim.db.names import table_identifier
from pgsim.db.standby import require_primary
from pgsim.encoding.encoder import encoder_for
from pgsim.encoding.models import DEFAULT_MODEL
from pgsim.errors import InvalidInput
from pgsim.knn.statements import Where, filter_sql
from pgsim.knn.target import read_vector_column
from pgsim.psycopg import bindable
from pgsim.quality.connections import psycopg_connection


def label_rows(
    conn: psycopg.Connection[Any] | Any,
    table: str,
    column: str,
    labels: Mapping[str, str],
    *,
    into: str,
    where: Where = None,
) -> Counter[str]:
    """Write into column ``into`` of each row (that passes ``where``) the label of ``labels`` (label ->
    description, e.g. {"libs": "shared libraries used by other programs"}) whose description is nearest to
    the row's ``column`` embedding. Rows without an embedding get NULL. Returns how many rows got each label."""
    conn = psycopg_connection(conn)
    require_primary(conn, "pgsim.label_rows")
    if not labels:
        raise InvalidInput("labels is empty: pass {label: description} for at least one label.")
    blank = [name for name, text in labels.items() if not isinstance(text, str) or not text.strip()]
    if blank:
        raise InvalidInput(f"The description of label(s) {blank} is empty; describe each label in a few words.")
    target = read_vector_column(conn, table, column)  # uncached: `into` may be a column added just now
    model = target.registration.model if target.registration else DEFAULT_MODEL
    encoder = encoder_for(model)
    if into not in target.other_columns:
        raise InvalidInput(f"Table {table!r} has no column {into!r} to write the labels into; add a text column.")
    if encoder.dimension != target.dimension:
        raise InvalidInput(
            f"Model {model!r} gives {encoder.dimension} dimensions; {table}.{column} holds {target.dimension}."
        )
    # bound as the connection can (text where pgsim's adapters are not registered: a Session's, say)
    encoded = encoder.encode(list(labels.values()), kind="query")
    vectors = [None if vector is None else bindable(conn, vector) for vector in encoded]
    cast = sql.SQL("::vector" if target.type_name == "halfvec" else "")
    counted = conn.execute(
        sql.SQL(
            "WITH labelled AS (UPDATE {table} SET {into} = pgsim.nearest_label({column}{cast}, %s, %s::vector[]) "
            "WHERE {where} "
            "RETURNING {into}) SELECT {into}, count(*) FROM labelled WHERE {into} IS NOT NULL GROUP BY 1"
        ).format(
            table=table_identifier(table),
            into=sql.Identifier(into),
            column=sql.Identifier(column),
            cast=cast,
            where=filter_sql(where),
        ),
        [list(labels), vectors],
    ).fetchall()
    return Counter(dict(counted))
