"""Mapping between a ``runs`` row and the engine's :class:`RunState`."""

from __future__ import annotations

from datetime import datetime

from kubetask.engine.machine import TERMINAL, Phase, RunError, RunState
from kubetask.store import tables as t


def load_state(row: t.Run) -> RunState:
    err = RunError(str(row.error.get("type", "")), str(row.error.get("message", ""))) if row.error else None
    return RunState(
        phase=Phase(row.phase),
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        next_attempt_at=row.next_attempt_at,
        error=err,
        reason=row.reason,
        message=row.message,
    )


def save_state(row: t.Run, state: RunState, *, now: datetime) -> None:
    if state.phase is Phase.RUNNING and row.started_at is None:
        row.started_at = now
    if state.phase in TERMINAL and row.finished_at is None:
        row.finished_at = now
    row.phase = state.phase.value
    row.attempt = state.attempt
    row.max_attempts = state.max_attempts
    row.next_attempt_at = state.next_attempt_at
    row.error = {"type": state.error.type, "message": state.error.message} if state.error else None
    row.reason = state.reason
    row.message = state.message[:4000]
