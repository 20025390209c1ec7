"""Initial schema: policies, decisions, review_items, review_events.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the model types: a migration must not change when the models do.
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "policies",
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(500), nullable=False),
        sa.Column("compat", sa.String(64), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("concepts", JSONType, nullable=False),
        sa.Column("special_concepts", JSONType, nullable=False),
        sa.Column("adjustment", sa.Float(), nullable=False),
        sa.Column("escalate", sa.String(16), nullable=True),
        sa.Column("review_band", sa.Float(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_policies")),
    )
    op.create_table(
        "decisions",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("policy_digest", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(500), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=True),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("top_concept", sa.String(200), nullable=True),
        sa.Column("margin", sa.Float(), nullable=True),
        sa.Column("fired", JSONType, nullable=False),
        sa.Column("special_hits", JSONType, nullable=False),
        sa.Column("adjustment", sa.Float(), nullable=False),
        sa.Column("cosines", sa.LargeBinary(), nullable=False),
        sa.Column("scores", sa.LargeBinary(), nullable=False),
        sa.Column("special_cosines", sa.LargeBinary(), nullable=False),
        sa.Column("special_scores", sa.LargeBinary(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=True),
        sa.Column("meta", JSONType, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("held_path", sa.String(200), nullable=True),
        sa.ForeignKeyConstraint(
            ["policy_digest"],
            ["policies.digest"],
            name=op.f("fk_decisions_policy_digest_policies"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_decisions")),
    )
    op.create_index("ix_decisions_created_at", "decisions", ["created_at"])
    op.create_index(
        "ix_decisions_policy_digest_created_at", "decisions", ["policy_digest", "created_at"]
    )
    op.create_index("ix_decisions_image_sha256", "decisions", ["image_sha256"])
    op.create_table(
        "review_items",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("decision_id", sa.String(36), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("margin", sa.Float(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
        sa.Column("claim_owner", sa.String(200), nullable=True),
        sa.Column("claim_token", sa.String(36), nullable=True),
        sa.Column("claim_expires_at", UTC, nullable=True),
        sa.Column("reviewer", sa.String(200), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("reopened_from", sa.Integer(), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'claimed', 'approved', 'rejected')",
            name=op.f("ck_review_items_status"),
        ),
        sa.ForeignKeyConstraint(
            ["decision_id"], ["decisions.id"], name=op.f("fk_review_items_decision_id_decisions")
        ),
        sa.ForeignKeyConstraint(
            ["reopened_from"],
            ["review_items.id"],
            name=op.f("fk_review_items_reopened_from_review_items"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_items")),
    )
    op.create_index(
        "ix_review_items_queue",
        "review_items",
        ["status", sa.text("priority DESC"), sa.text("margin DESC"), "created_at", "id"],
    )
    op.create_index("ix_review_items_decision_id", "review_items", ["decision_id"])
    op.create_index("ix_review_items_created_at", "review_items", ["created_at"])
    op.create_index("ix_review_items_claim_expires_at", "review_items", ["claim_expires_at"])
    op.create_table(
        "review_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("decision_id", sa.String(36), nullable=False),
        sa.Column("at", UTC, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("details", JSONType, nullable=False),
        sa.CheckConstraint(
            "event IN ('created', 'claimed', 'lease_expired', 'approved', 'rejected', 'reopened')",
            name=op.f("ck_review_events_event"),
        ),
        sa.ForeignKeyConstraint(
            ["item_id"], ["review_items.id"], name=op.f("fk_review_events_item_id_review_items")
        ),
        sa.ForeignKeyConstraint(
            ["decision_id"],
            ["decisions.id"],
            name=op.f("fk_review_events_decision_id_decisions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_events")),
    )
    op.create_index("ix_review_events_item_id", "review_events", ["item_id"])
    op.create_index("ix_review_events_decision_id", "review_events", ["decision_id"])
    op.create_index("ix_review_events_at", "review_events", ["at"])


def downgrade() -> None:
    op.drop_table("review_events")
    op.drop_table("review_items")
    op.drop_table("decisions")
    op.drop_table("policies")
