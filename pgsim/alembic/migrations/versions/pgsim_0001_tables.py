"""pgsim 0001: schema pgsim, its ledger, and its tables and types (sql/0001_tables.sql).

Revision ID: pgsim_0001
Revises:
"""

from pgsim.alembic.branch import downgrade_schema, upgrade_to

revision = "pgsim_0001"
down_revision = None
branch_labels = ("pgsim",)
depends_on = None


def upgrade() -> None:
    upgrade_to("0001")


def downgrade() -> None:
    downgrade_schema()  # not while a column is registered: pgsim serves every application of the database
