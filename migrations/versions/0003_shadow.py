"""Shadow decisions: a candidate policy's decision on live traffic, linked to the live decision.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 00:00:01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("shadow_of", sa.String(36), nullable=True))
        batch.create_foreign_key(
            op.f("fk_decisions_shadow_of_decisions"), "decisions", ["shadow_of"], ["id"]
        )
        batch.create_index(op.f("ix_decisions_shadow_of"), ["shadow_of"])


def downgrade() -> None:
    # Shadow rows are not live traffic: they go with the column that tells them apart.
    op.execute("DELETE FROM decisions WHERE shadow_of IS NOT NULL")
    with op.batch_alter_table("decisions") as batch:
        batch.drop_index(op.f("ix_decisions_shadow_of"))
        batch.drop_constraint(op.f("fk_decisions_shadow_of_decisions"), type_="foreignkey")
        batch.drop_column("shadow_of")
