"""Mapping between a ``runs`` row and the engine's :class:`RunState`, and the one JSON
view of an attempt that the Run's status and the API share."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from kubetask import protocol
from kubetask.engine.machine import TERMINAL, Phase, RunError, RunState, counted_attempts
from kubetask.store import tables as t


def load_state(row: t.Run) -> RunState:
    err = RunError(str(row.error.get("type", "")), str(row.error.get("message", ""))) if row.error else None
    return RunState(
        phase=Phase(row.phase),
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        infra_failures=row.infra_failures or 0,
        resumes=row.resumes or 0,
        resuming=bool(row.resuming),
        next_attempt_at=row.next_attempt_at,
        expires_at=row.expires_at,
        error=err,
        reason=row.reason,
        message=row.message,
    )


def counted_attempt(row: Any) -> int:
    """The run's attempt as its task counts it (``ctx.attempt.number``): pods that never
    ran the task and pods that resumed an attempt after a wait are not attempts.
    ``row.attempt`` is the number of the run's last pod."""
    return max(0, counted_attempts(int(row.attempt), int(row.infra_failures or 0), int(row.resumes or 0)))


def iso(ts: datetime | None) -> str | None:
    """:func:`kubetask.protocol.iso` (the one format), passing None through."""
    return None if ts is None else protocol.iso(ts)


#: An attempt's error message in a Run's ``status`` is cut to this many UTF-8 bytes: the
#: status lists every attempt (up to 100) and etcd stores objects of ~1.5 MiB at most.
#: The API has the whole message, and the stack.
STATUS_ERROR_MESSAGE_BYTES = 1024


def attempt_view(a: t.Attempt, *, pod_key: str, detail: bool = False) -> dict[str, Any]:
    """An attempt as JSON. The two contracts differ: the Run's ``status.attempts[]`` names
    the pod ``pod`` and its error has ``type`` and ``message`` (cut to
    :data:`STATUS_ERROR_MESSAGE_BYTES`); the API's (``detail``) names it ``podName`` and
    its error also has the ``stack`` and the class hierarchy ``types`` the runner reported."""
    error: dict[str, Any] | None = None
    if a.error is not None:
        error = {"type": a.error.get("type"), "message": a.error.get("message") or ""}
        if detail:
            reported = (a.report or {}).get("error") or {}
            # Only when the attempt's error is the one reported (not, say, the deadline
            # that ended the pod after the report).
            mine = reported.get("type") == error["type"]
            error["stack"] = reported.get("stack") if mine else None
            error["types"] = list(reported.get("types") or []) if mine else []
        else:
            error["message"] = protocol.clean_text(error["message"], STATUS_ERROR_MESSAGE_BYTES)
    return {
        "number": a.number,
        pod_key: a.pod_name,
        "createdAt": iso(a.created_at),
        "startedAt": iso(a.started_at),
        "finishedAt": iso(a.finished_at),
        "exitCode": a.exit_code,
        "reason": a.reason,
        "error": error,
        "resume": a.resume,
    }


def checkpoint_view(cp: t.Checkpoint) -> dict[str, Any]:
    """A journal entry as JSON (the API's ``checkpoints[]``)."""
    return {
        "key": cp.key,
        "name": cp.name,
        "position": cp.position,
        "kind": cp.kind,
        "status": cp.status,
        "attempt": cp.attempt,
        "startedAt": iso(cp.started_at),
        "finishedAt": iso(cp.finished_at),
        "dueAt": iso(cp.due_at),
        # A token's id is its capability: the API shows that it exists, not the secret.
        "result": None if cp.kind == "token" else cp.result,
        "error": cp.error,
        "event": cp.event_name,
        "match": cp.match,
        "ref": cp.ref if cp.kind in ("child", "trigger") else None,
    }


#: Reasons of a Pending or Failed run that mean "not accepted" (the Accepted condition).
NOT_ACCEPTED = frozenset({"TaskNotFound", "PayloadTooLarge", "InvalidSpec"})


def condition_statuses(phase: Phase, reason: str, attempt: int) -> dict[str, bool]:
    """Which conditions a run in this state shows, and their status. The status
    projection adds reasons and messages; the transition keeps their transition times."""
    out: dict[str, bool] = {}
    if reason in NOT_ACCEPTED:
        out["Accepted"] = False
    elif phase is not Phase.PENDING:
        out["Accepted"] = True
    if phase in (Phase.QUEUED, Phase.RETRYING, Phase.WAITING, Phase.DELAYED):
        out["Admitted"] = False
    elif phase is Phase.RUNNING or (phase in TERMINAL and attempt > 0):
        out["Admitted"] = True
    out["Finished"] = phase in TERMINAL
    return out


def save_state(row: t.Run, state: RunState, *, now: datetime) -> None:
    if state.phase is Phase.RUNNING and row.started_at is None:
        row.started_at = now
    if state.phase in TERMINAL and row.finished_at is None:
        row.finished_at = now
    row.phase = state.phase.value
    row.attempt = state.attempt
    row.max_attempts = state.max_attempts
    row.infra_failures = state.infra_failures
    row.resumes = state.resumes
    row.resuming = state.resuming
    times = dict(row.condition_times or {})
    for ctype, status in condition_statuses(state.phase, state.reason, state.attempt).items():
        value = "True" if status else "False"
        if (times.get(ctype) or {}).get("status") != value:
            times[ctype] = {"status": value, "time": iso(now)}
    row.condition_times = times
    row.next_attempt_at = state.next_attempt_at
    row.expires_at = state.expires_at
    row.error = {"type": state.error.type, "message": state.error.message} if state.error else None
    row.reason = state.reason
    row.message = state.message[:4000]
