"""a run's timer is a column of its row (runs.wake_at)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 07:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("wake_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_runs_wake", "runs", ["wake_at"], postgresql_where=sa.text("wake_at IS NOT NULL"))
    # Run timers move from the timers table into the run's row.
    op.execute(
        "UPDATE runs SET wake_at = timers.due_at FROM timers WHERE timers.kind = 'run' AND timers.key = runs.id"
    )
    op.execute("DELETE FROM timers WHERE kind = 'run'")
    # Live runs are looked at once by the first leader of this version.
    op.execute("UPDATE runs SET wake_at = now() WHERE finished_at IS NULL AND wake_at IS NULL")


def downgrade() -> None:
    op.execute(
        "INSERT INTO timers (kind, key, due_at) SELECT 'run', id, wake_at FROM runs WHERE wake_at IS NOT NULL "
        "ON CONFLICT DO NOTHING"
    )
    op.drop_index("ix_runs_wake", table_name="runs")
    op.drop_column("runs", "wake_at")
