"""Encoder digest and value range: which image encoder (weights + preprocessing) embedded the
image of a decision, and how its float values were read ("0,1", "-1,1" or "both"). Rows written
before this revision keep NULL in both (not recorded then).

Revision ID: 0006
Revises: 0004 (re-chained after 0005 at merge)
Create Date: 2026-12-06 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("encoder_digest", sa.String(64), nullable=True))
        batch.add_column(sa.Column("value_range", sa.String(8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("value_range")
        batch.drop_column("encoder_digest")
