"""pgsim 0006: register_embedding forgets the registrations of dropped tables (pgsim.forget_dropped).

Revision ID: pgsim_0006
Revises: pgsim_0005
"""

from pgsim.alembic.branch import upgrade_to

revision = "pgsim_0006"
down_revision = "pgsim_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    upgrade_to("0006")


def downgrade() -> None:
    from alembic import op

    from pgsim.db.sqlfiles import sql_files

    # register_embedding as 0004_registration.sql created it
    text = next(file.text for file in sql_files() if file.name == "0004_registration.sql")
    start = text.index("CREATE FUNCTION pgsim.register_embedding(")
    end = text.index("$$;", text.index("AS $$", start) + len("AS $$")) + len("$$;")
    op.execute("CREATE OR REPLACE" + text[start + len("CREATE") : end])  # noqa: S608 - pgsim's own SQL file
    op.execute("DROP FUNCTION pgsim.forget_dropped; DELETE FROM pgsim.migration WHERE name = '0006_forget_dropped.sql'")
