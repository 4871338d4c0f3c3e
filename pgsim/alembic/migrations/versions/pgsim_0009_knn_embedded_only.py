"""pgsim 0009: pgsim.knn leaves out rows whose embedding is still NULL.

Revision ID: pgsim_0009
Revises: pgsim_0008
"""

from pgsim.alembic.branch import upgrade_to

revision = "pgsim_0009"
down_revision = "pgsim_0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    upgrade_to("0009")


def downgrade() -> None:
    from alembic import op

    from pgsim.db.sqlfiles import sql_files

    # pgsim.knn as 0002_knn_plan.sql created it
    text = next(file.text for file in sql_files() if file.name == "0002_knn_plan.sql")
    function = text[text.index("CREATE FUNCTION pgsim.knn(\n") :]
    op.execute(function.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
    op.execute("DELETE FROM pgsim.migration WHERE name = '0009_knn_embedded_only.sql'")
