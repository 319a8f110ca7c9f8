"""The store's metadata in PostgreSQL: stores, their ledgers, and the job board.

Every table is keyed by ``store`` (the store's location as the settings name it), so one
database holds the stores of several base models.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "lamina_stores",
        sa.Column("store", sa.Text, primary_key=True),
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    # One row per ledger entry; ``entry`` is the whole entry as the file ledger writes it (seq and
    # ts included), so both backends hand readers the same dictionaries.
    op.create_table(
        "lamina_ledger",
        sa.Column("store", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("entry", JSONB, nullable=False),
    )
    op.create_table(
        "lamina_jobs",
        sa.Column("store", sa.Text, primary_key=True),
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("job", JSONB, nullable=False),
    )
    op.create_table(
        "lamina_job_examples",
        sa.Column("store", sa.Text, primary_key=True),
        sa.Column("job_id", sa.Text, primary_key=True),
        sa.Column("kind", sa.Text, primary_key=True),  # "examples" or "validation"
        sa.Column("body", sa.Text, nullable=False),  # JSON lines, as the file board writes them
    )


def downgrade() -> None:
    for table in ("lamina_job_examples", "lamina_jobs", "lamina_ledger", "lamina_stores"):
        op.drop_table(table)
