"""pgsim 0002: pgsim's functions and views (sql/functions/), each file applied again when its text changes.

Revision ID: pgsim_0002
Revises: pgsim_0001
"""

from pgsim.alembic.branch import downgrade_functions, upgrade_to

revision = "pgsim_0002"
down_revision = "pgsim_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    upgrade_to(None, after="0001")


def downgrade() -> None:
    downgrade_functions()
