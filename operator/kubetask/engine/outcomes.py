"""What an attempt's end means: the pod as Kubernetes reports it, plus what the runner
reported to the API (if anything), turned into an :class:`AttemptEnded` event.

Which endings count as an attempt (all of them do; each consumes one of maxAttempts):
- the runner reported success (exit 0)                       -> Succeeded
- the task raised (exit 1) or the runner could not reach the API (exit 12)
                                                             -> Failed, retried
- ``AbortRun`` (10), unloadable task (11), unserialisable output (13)
                                                             -> Failed, not retried
- the pod ran past ``activeDeadlineSeconds`` (maxDurationSeconds) -> TimedOut, not retried
- OOMKilled, Evicted, the pod deleted by someone else, the node lost, any other exit
                                                             -> Failed, retried
A success the runner reported wins over the pod's fate afterwards (the output is in
PostgreSQL already).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetask.engine.machine import AttemptEnded, Outcome, RunError

EXIT_OK = 0
EXIT_TASK_ERROR = 1
EXIT_ABORTED = 10
EXIT_LOAD_ERROR = 11
EXIT_API_UNREACHABLE = 12
EXIT_OUTPUT_NOT_SERIALIZABLE = 13

NOT_RETRYABLE_EXITS = {
    EXIT_ABORTED: "AbortRun",
    EXIT_LOAD_ERROR: "TaskLoadError",
    EXIT_OUTPUT_NOT_SERIALIZABLE: "OutputNotSerializable",
}


@dataclass(frozen=True)
class Report:
    """What the runner posted to ``/runner/v1/complete``."""

    succeeded: bool
    retryable: bool = True
    error_type: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class PodEnd:
    """The facts about an ended attempt pod that the state machine needs."""

    exit_code: int | None
    reason: str
    message: str


def pod_end(pod: dict[str, Any] | None) -> PodEnd | None:
    """Return how the pod ended, or None if it has not ended yet. ``None`` for the pod
    means it is gone (deleted before it ended)."""
    if pod is None:
        return PodEnd(None, "PodDeleted", "the attempt's pod was deleted before it finished")
    status = pod.get("status") or {}
    phase = status.get("phase")
    terminated = _terminated(status)
    if phase not in ("Succeeded", "Failed"):
        waiting = _waiting(status)
        if waiting is not None and waiting.get("reason") in FATAL_WAITING:
            # The container can never start (no registry here, a typo in the image, a
            # missing Secret): end the attempt instead of waiting for ever.
            return PodEnd(None, str(waiting["reason"]), str(waiting.get("message") or waiting["reason"]))
        return None
    reason = status.get("reason") or ""
    if reason == "DeadlineExceeded":
        return PodEnd(None, "DeadlineExceeded", status.get("message") or "maxDurationSeconds exceeded")
    if reason in ("Evicted", "NodeLost", "Shutdown", "Terminated", "UnexpectedAdmissionError"):
        return PodEnd(None, reason, status.get("message") or reason)
    if terminated is not None:
        code = terminated.get("exitCode")
        creason = terminated.get("reason") or ("Completed" if code == 0 else "Error")
        return PodEnd(code, creason, terminated.get("message") or f"container exited with code {code}")
    return PodEnd(None, reason or phase, status.get("message") or f"pod {phase}")


FATAL_WAITING = frozenset(
    {
        "ErrImageNeverPull",
        "InvalidImageName",
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)


def _waiting(status: dict[str, Any]) -> dict[str, Any] | None:
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == "task":
            waiting = (cs.get("state") or {}).get("waiting")
            return waiting if isinstance(waiting, dict) else None
    return None


def _terminated(status: dict[str, Any]) -> dict[str, Any] | None:
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == "task":
            term = (cs.get("state") or {}).get("terminated")
            return term if isinstance(term, dict) else None
    return None


def classify(*, attempt: int, end: PodEnd, report: Report | None) -> AttemptEnded:
    if report is not None and report.succeeded:
        return AttemptEnded(attempt, Outcome.SUCCEEDED, "Succeeded")
    if end.reason == "DeadlineExceeded":
        return AttemptEnded(
            attempt,
            Outcome.TIMED_OUT,
            "MaxDurationExceeded",
            RunError("MaxDurationExceeded", "the attempt exceeded maxDurationSeconds"),
        )
    if report is not None:
        err = RunError(report.error_type or "Error", report.error_message or "the task failed")
        if not report.retryable:
            return AttemptEnded(attempt, Outcome.ABORTED, err.type, err)
        return AttemptEnded(attempt, Outcome.FAILED, "TaskFailed", err)
    if end.exit_code in NOT_RETRYABLE_EXITS:
        kind = NOT_RETRYABLE_EXITS[end.exit_code]
        return AttemptEnded(attempt, Outcome.ABORTED, kind, RunError(kind, end.message))
    if end.exit_code == EXIT_OK:
        # Exit 0 without a report: the runner contract was broken (e.g. a custom image).
        return AttemptEnded(
            attempt,
            Outcome.FAILED,
            "MissingResult",
            RunError("MissingResult", "the pod exited 0 without reporting a result"),
        )
    reason = end.reason if end.reason not in ("Error", "") else "PodFailed"
    return AttemptEnded(attempt, Outcome.FAILED, reason, RunError(reason, end.message))
