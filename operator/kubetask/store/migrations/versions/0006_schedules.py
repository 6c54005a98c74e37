"""schedules: one row per Schedule, and one per fire time (the deduplication key)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("key", sa.String(length=127), nullable=False),
        sa.Column("namespace", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("uid", sa.String(length=64), nullable=False),
        sa.Column("cron", sa.String(length=200), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("next_fire_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_fire_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_run_fire_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_run_name", sa.String(length=253), nullable=True),
        sa.Column("last_run_id", sa.String(length=40), nullable=True),
        sa.Column("skipped", sa.Integer(), nullable=False),
        sa.Column("missed", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "schedule_fires",
        sa.Column("schedule_uid", sa.String(length=64), nullable=False),
        sa.Column("fire_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("schedule", sa.String(length=127), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("manual", sa.Boolean(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("run_name", sa.String(length=253), nullable=True),
        sa.Column("run_id", sa.String(length=40), nullable=True),
        sa.Column("open", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("schedule_uid", "fire_at"),
    )
    op.create_index(
        "ix_schedule_fires_open", "schedule_fires", ["schedule_uid"], postgresql_where=sa.text("open")
    )
    op.create_index(
        "ix_schedule_fires_run", "schedule_fires", ["run_id"], postgresql_where=sa.text("run_id IS NOT NULL")
    )
    op.create_index("ix_schedule_fires_created", "schedule_fires", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_schedule_fires_created", table_name="schedule_fires")
    op.drop_index("ix_schedule_fires_run", table_name="schedule_fires")
    op.drop_index("ix_schedule_fires_open", table_name="schedule_fires")
    op.drop_table("schedule_fires")
    op.drop_table("schedules")
