"""Views: which square views (and frames) an image was judged on, and which one fired per concept.

Also widens `decisions.held_path` to TEXT: it holds the held original's full path.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Frozen copy of the model type: a migration must not change when the models do.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("views", JSONType, nullable=True))
        batch.add_column(sa.Column("concept_views", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("special_views", sa.LargeBinary(), nullable=True))
        batch.alter_column(
            "held_path", type_=sa.Text(), existing_type=sa.String(200), existing_nullable=True
        )


def downgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        # A path longer than the old column is cut rather than failing the downgrade; the file
        # itself stays in the held folder under its content address.
        batch.alter_column(
            "held_path",
            type_=sa.String(200),
            existing_type=sa.Text(),
            existing_nullable=True,
            postgresql_using="left(held_path, 200)",
        )
        batch.drop_column("special_views")
        batch.drop_column("concept_views")
        batch.drop_column("views")
