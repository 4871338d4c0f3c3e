"""pgsim 0003: registered embedding columns, their queue, dead letters and triggers.

Revision ID: pgsim_0003
Revises: pgsim_0002
"""

from pgsim.alembic.branch import upgrade_to

revision = "pgsim_0003"
down_revision = "pgsim_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    upgrade_to("0003")


def downgrade() -> None:
    from alembic import op

    # CASCADE: the triggers of registered columns go with pgsim.enqueue
    op.execute(
        "DROP VIEW pgsim.sync_status; DROP FUNCTION pgsim.expect_model, pgsim.requeue_dead_letters; "
        "DROP FUNCTION pgsim.enqueue CASCADE; DROP TABLE pgsim.dead_letter, pgsim.queue, pgsim.embedding; "
        "DELETE FROM pgsim.migration WHERE name = '0003_sync.sql'"
    )
