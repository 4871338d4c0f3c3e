"""pgsim 0005: the content-hash cache of encoded texts.

Revision ID: pgsim_0005
Revises: pgsim_0004
"""

from pgsim.alembic.branch import upgrade_to

revision = "pgsim_0005"
down_revision = "pgsim_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    upgrade_to("0005")


def downgrade() -> None:
    from alembic import op

    op.execute("DROP TABLE pgsim.embedding_cache; DELETE FROM pgsim.migration WHERE name = '0005_embedding_cache.sql'")
