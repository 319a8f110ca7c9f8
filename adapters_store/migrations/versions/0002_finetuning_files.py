"""The fine-tuning API's uploaded files and the progress points the server records per job, so a
file uploaded to one server is used on any and every server lists the same loss events.

Keyed by ``store`` like every other table (see 0001).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    # ``object`` is the OpenAI file object as the file store writes it; ``content`` the bytes uploaded.
    op.create_table(
        "lamina_files",
        sa.Column("store", sa.Text, primary_key=True),
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("object", JSONB, nullable=False),
        sa.Column("content", sa.LargeBinary, nullable=False),
    )
    # One row per (job, step): the first server to record a step keeps it.
    op.create_table(
        "lamina_progress_points",
        sa.Column("store", sa.Text, primary_key=True),
        sa.Column("job_id", sa.Text, primary_key=True),
        sa.Column("step", sa.BigInteger, primary_key=True),
        sa.Column("point", JSONB, nullable=False),
    )


def downgrade() -> None:
    for table in ("lamina_progress_points", "lamina_files"):
        op.drop_table(table)
