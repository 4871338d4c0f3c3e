"""pgsim 0008: drop 0007's stored score samples (relevance is calibrated against the query's own neighbours).

Revision ID: pgsim_0008
Revises: pgsim_0007
"""

from pgsim.alembic.branch import upgrade_to

revision = "pgsim_0008"
down_revision = "pgsim_0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    upgrade_to("0008")


def downgrade() -> None:
    from alembic import op

    from pgsim.db.sqlfiles import sql_files

    # the score sample table and its two functions, as 0007_quality.sql created them
    text = next(file.text for file in sql_files() if file.name == "0007_quality.sql")
    start = text.index("CREATE TABLE pgsim.score_sample (")
    end = text.index("-- Hubness correction:", start)
    op.execute(text[start:end])
    op.execute("DELETE FROM pgsim.migration WHERE name = '0008_drop_score_sample.sql'")
