"""pgsim 0007: search quality (rank fusion, MMR, zero-shot labels, near-duplicate groups, calibration, query banks).

Revision ID: pgsim_0007
Revises: pgsim_0006
"""

from pgsim.alembic.branch import upgrade_to

revision = "pgsim_0007"
down_revision = "pgsim_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    upgrade_to("0007")


def downgrade() -> None:
    from alembic import op

    op.execute(
        "DROP FUNCTION pgsim.score_background, pgsim.sample_scores, pgsim.near_duplicates, pgsim.mmr, "
        "pgsim.nearest_label, pgsim.rrf; DROP TABLE pgsim.score_sample, pgsim.query_bank; "
        "DELETE FROM pgsim.migration WHERE name = '0007_quality.sql'"
    )
