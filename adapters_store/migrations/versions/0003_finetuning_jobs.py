"""The fine-tuning API's job records: the OpenAI request each job created through
``/v1/fine_tuning/jobs`` was accepted with (training file, suffix, metadata, requested
hyperparameters), so a job created on one server reads back whole on any.

Keyed by ``store`` like every other table (see 0001).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    # ``record`` is the FineTuneRecord as the file store writes it; ``job_id`` the board's job id.
    op.create_table(
        "lamina_finetuning_jobs",
        sa.Column("store", sa.Text, primary_key=True),
        sa.Column("job_id", sa.Text, primary_key=True),
        sa.Column("record", JSONB, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("lamina_finetuning_jobs")
