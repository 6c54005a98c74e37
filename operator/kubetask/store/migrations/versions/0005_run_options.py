"""run options and rate limits: delays (not_before), TTLs (expires_at), debounce, GCRA buckets

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 09:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("not_before", sa.DateTime(timezone=True), nullable=True))
    op.add_column("runs", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("runs", sa.Column("debounce", postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column("queues", sa.Column("rate_limit", sa.Integer(), nullable=True))
    op.add_column("queues", sa.Column("rate_period", sa.Float(), nullable=True))
    op.add_column("queues", sa.Column("rate_per_key", sa.Boolean(), server_default="false", nullable=False))
    op.add_column("queues", sa.Column("rate_tat", sa.DateTime(timezone=True), nullable=True))
    op.add_column("queue_keys", sa.Column("rate_tat", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "debounces",
        sa.Column("namespace", sa.String(length=63), nullable=False),
        sa.Column("task", sa.String(length=63), nullable=False),
        sa.Column("key", sa.String(length=256), nullable=False),
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("triggers", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("namespace", "task", "key"),
    )


def downgrade() -> None:
    op.drop_table("debounces")
    op.drop_column("queue_keys", "rate_tat")
    op.drop_column("queues", "rate_tat")
    op.drop_column("queues", "rate_per_key")
    op.drop_column("queues", "rate_period")
    op.drop_column("queues", "rate_limit")
    op.drop_column("runs", "debounce")
    op.drop_column("runs", "expires_at")
    op.drop_column("runs", "not_before")
