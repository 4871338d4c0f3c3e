"""pgsim 0004: registering an embedding column as SQL functions (also for migrations rendered offline).

Revision ID: pgsim_0004
Revises: pgsim_0003
"""

from pgsim.alembic.branch import upgrade_to

revision = "pgsim_0004"
down_revision = "pgsim_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    upgrade_to("0004")


def downgrade() -> None:
    from alembic import op

    op.execute(
        "DROP FUNCTION pgsim.remove_embedding, pgsim.unregister_embedding, pgsim.register_embedding, "
        "pgsim.queue_rows, pgsim.create_triggers, pgsim.qualified_columns; "
        "DELETE FROM pgsim.migration WHERE name = '0004_registration.sql'"
    )
