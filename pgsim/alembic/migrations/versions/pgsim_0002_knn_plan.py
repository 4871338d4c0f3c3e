"""pgsim 0002: filtered k-NN planning (pgsim.knn_plan, prepare_knn, knn).

Revision ID: pgsim_0002
Revises: pgsim_0001
"""

from pgsim.alembic.branch import upgrade_to

revision = "pgsim_0002"
down_revision = "pgsim_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    upgrade_to("0002")


def downgrade() -> None:
    from alembic import op

    op.execute(
        "DROP FUNCTION pgsim.knn, pgsim.prepare_knn, pgsim.knn_plan, pgsim.index_ef_search, pgsim.estimate_rows; "
        "DROP TYPE pgsim.knn_hit, pgsim.knn_plan; "
        "DELETE FROM pgsim.migration WHERE name = '0002_knn_plan.sql'"
    )
