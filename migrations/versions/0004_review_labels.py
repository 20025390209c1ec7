"""Review labels: the concepts a reviewer says an image shows (or does not), with the verdict.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 00:00:02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Frozen copy of the model type: a migration must not change when the models do.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("review_items") as batch:
        batch.add_column(sa.Column("labels", JSONType, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("review_items") as batch:
        batch.drop_column("labels")
