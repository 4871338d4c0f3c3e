"""HNSW indexes in autogenerate: their parameters as the models and the database have them, and a drop and
a create for an index whose ``m``, ``ef_construction`` or operator class changed (Alembic compares none).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from alembic.autogenerate.api import AutogenContext
from alembic.operations import ops as alembic_ops
from sqlalchemy import Column, Index, Table

from pgsim.alembic.ops import CreateHnswIndexOp, DropHnswIndexOp
from pgsim.db.hnsw import DEFAULT_EF_CONSTRUCTION, DEFAULT_M

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HnswParams:
    """An HNSW index's parameters as the database or the models have them."""

    column: str
    m: int
    ef_construction: int
    ops: str

    @classmethod
    def of(cls, column: str, options: dict[str, Any], default_ops: str) -> HnswParams:
        settings = options.get("postgresql_with") or {}
        ops = (options.get("postgresql_ops") or {}).get(column, default_ops)
        return cls(
            column,
            int(settings.get("m", DEFAULT_M)),
            int(settings.get("ef_construction", DEFAULT_EF_CONSTRUCTION)),
            ops,
        )


def is_hnsw(index: Index) -> bool:
    return str(index.dialect_options["postgresql"]["using"] or "").lower() == "hnsw"


def index_params(index: Index) -> HnswParams | None:
    """An HNSW index's parameters, or None for another index (or one on an expression)."""
    if not is_hnsw(index) or len(index.expressions) != 1 or not isinstance(index.expressions[0], Column):
        return None
    column = index.expressions[0]
    options = index.dialect_options["postgresql"]
    return HnswParams.of(
        column.name,
        {"postgresql_with": options["with"], "postgresql_ops": options["ops"]},
        default_ops(column.type),
    )


def default_ops(column_type: Any) -> str:
    """The operator class assumed for an HNSW index that names none (pgvector has no default one; pgsim's
    indexes are cosine): by the column's type, not taking sparsevec or bit for vector."""
    name = str(column_type).upper() if column_type is not None else ""
    for kind in ("HALFVEC", "SPARSEVEC"):
        if name.startswith(kind):
            return f"{kind.lower()}_cosine_ops"
    if name.startswith("BIT"):
        return "bit_hamming_ops"
    return "vector_cosine_ops"


Tables = dict[tuple[str | None, str], Table]


def rebuild_changed_indexes(
    autogen_context: AutogenContext,
    upgrade_ops: alembic_ops.UpgradeOps,
    tables: Tables,
    recreated: set[tuple[str | None, str, str]],
) -> None:
    """Drop and create the HNSW indexes whose m, ef_construction or operator class the models changed
    (not those of a column registered again: create_embedding builds its index)."""
    inspector = autogen_context.inspector
    new_tables = {(op.schema, op.table_name) for op in upgrade_ops.ops if isinstance(op, alembic_ops.CreateTableOp)}
    for (schema, name), table in tables.items():
        if (schema, name) in new_tables or not inspector.has_table(name, schema=schema):
            continue
        existing = {
            found["name"]: found
            for found in inspector.get_indexes(name, schema=schema)
            if str(found.get("dialect_options", {}).get("postgresql_using", "")).lower() == "hnsw"
        }
        for index in table.indexes:
            wanted = index_params(index)
            found = existing.get(str(index.name))
            if wanted is None or found is None or found.get("column_names") != [wanted.column]:
                continue
            if (schema, name, wanted.column) in recreated:
                continue
            kind_ops = wanted.ops.split("_", 1)[0] + "_cosine_ops"
            current = HnswParams.of(wanted.column, found["dialect_options"], kind_ops)
            if current == wanted:
                continue
            log.info("HNSW index %s changed (%s -> %s): rebuilding it", index.name, current, wanted)
            rebuild = [
                DropHnswIndexOp(str(index.name), name, schema=schema, column_name=current.column, m=current.m,
                                ef_construction=current.ef_construction, ops=current.ops),
                CreateHnswIndexOp(str(index.name), name, wanted.column, m=wanted.m,
                                  ef_construction=wanted.ef_construction, ops=wanted.ops, schema=schema),
            ]  # fmt: skip
            table_ops(upgrade_ops, name, schema).ops.extend(rebuild)


def table_ops(upgrade_ops: alembic_ops.UpgradeOps, name: str, schema: str | None) -> alembic_ops.ModifyTableOps:
    for op in upgrade_ops.ops:
        if isinstance(op, alembic_ops.ModifyTableOps) and (op.schema, op.table_name) == (schema, name):
            return op
    modify = alembic_ops.ModifyTableOps(name, [], schema=schema)
    upgrade_ops.ops.append(modify)
    return modify
