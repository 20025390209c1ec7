"""What set a decision's action, recorded at decision time (moderation.rule).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Frozen copy of the model type: a migration must not change when the models do.
NullableJSON = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql"
)


def upgrade() -> None:
    # Older rows keep NULL: their documents derive the reason from the logged scores.
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("action_reason", NullableJSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("action_reason")
