"""durable execution: checkpoints (steps, waits, tokens, children), events, resumes

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("parent_run_id", sa.String(length=40), nullable=True))
    op.add_column("runs", sa.Column("resumes", sa.Integer(), server_default="0", nullable=False))
    op.add_column("runs", sa.Column("resuming", sa.Boolean(), server_default="false", nullable=False))
    op.add_column("runs", sa.Column("wait_key", sa.String(length=300), nullable=True))
    op.create_index(
        "ix_runs_parent", "runs", ["parent_run_id"], postgresql_where=sa.text("parent_run_id IS NOT NULL")
    )
    op.add_column("attempts", sa.Column("resume", sa.Boolean(), server_default="false", nullable=False))
    op.create_table(
        "checkpoints",
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("result", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("namespace", sa.String(length=63), nullable=True),
        sa.Column("event_name", sa.String(length=256), nullable=True),
        sa.Column("match", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("ref", sa.String(length=64), nullable=True),
        sa.Column("token_hash", sa.String(length=64), nullable=True),
        sa.Column("event_id", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "key"),
    )
    op.create_index(
        "ix_checkpoints_event",
        "checkpoints",
        ["namespace", "event_name"],
        postgresql_where=sa.text("kind = 'event' AND status = 'waiting'"),
    )
    op.create_index(
        "ix_checkpoints_ref", "checkpoints", ["ref"], postgresql_where=sa.text("status = 'waiting'")
    )
    op.create_index(
        "ix_checkpoints_token",
        "checkpoints",
        ["token_hash"],
        unique=True,
        postgresql_where=sa.text("token_hash IS NOT NULL"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("namespace", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("data", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("delivered", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_events_name", "events", ["namespace", "name", "received_at"])


def downgrade() -> None:
    op.drop_index("ix_events_name", table_name="events")
    op.drop_table("events")
    op.drop_index("ix_checkpoints_token", table_name="checkpoints")
    op.drop_index("ix_checkpoints_ref", table_name="checkpoints")
    op.drop_index("ix_checkpoints_event", table_name="checkpoints")
    op.drop_table("checkpoints")
    op.drop_column("attempts", "resume")
    op.drop_index("ix_runs_parent", table_name="runs")
    op.drop_column("runs", "wait_key")
    op.drop_column("runs", "resuming")
    op.drop_column("runs", "resumes")
    op.drop_column("runs", "parent_run_id")
