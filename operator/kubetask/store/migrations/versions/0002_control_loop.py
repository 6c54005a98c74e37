"""control loop: timers, infrastructure failures, cancel requests, TTLs, condition times

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "timers",
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("kind", "key"),
    )
    op.create_index("ix_timers_due", "timers", ["due_at"])
    op.add_column("runs", sa.Column("infra_failures", sa.Integer(), server_default="0", nullable=False))
    op.add_column("runs", sa.Column("cancel_requested", sa.Boolean(), server_default="false", nullable=False))
    op.add_column("runs", sa.Column("ttl_seconds", sa.Integer(), nullable=True))
    op.add_column(
        "runs", sa.Column("condition_times", postgresql.JSONB(astext_type=sa.Text()), nullable=True)
    )
    op.create_index(
        "ix_runs_finished", "runs", ["finished_at"], postgresql_where=sa.text("finished_at IS NOT NULL")
    )
    op.create_index("ix_runs_live", "runs", ["namespace"], postgresql_where=sa.text("finished_at IS NULL"))
    op.create_index("ix_logs_ts", "logs", ["ts"])
    # Runs that were Running or Retrying before this version were woken by in-memory
    # timers: give each live run a due timer so the first leader reconciles it.
    op.execute(
        "INSERT INTO timers (kind, key, due_at) SELECT 'run', id, now() FROM runs WHERE finished_at IS NULL"
    )


def downgrade() -> None:
    op.drop_index("ix_logs_ts", table_name="logs")
    op.drop_index("ix_runs_live", table_name="runs")
    op.drop_index("ix_runs_finished", table_name="runs")
    op.drop_column("runs", "condition_times")
    op.drop_column("runs", "ttl_seconds")
    op.drop_column("runs", "cancel_requested")
    op.drop_column("runs", "infra_failures")
    op.drop_index("ix_timers_due", table_name="timers")
    op.drop_table("timers")
