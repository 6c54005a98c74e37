"""What an attempt's end means: the pod as Kubernetes reports it, plus what the runner
reported to the API (if anything), turned into an :class:`AttemptEnded` event.

Which endings count as an attempt (all of them do; each consumes one of maxAttempts):
- the runner reported success (exit 0)                       -> Succeeded
- the task raised (exit 1) or the runner could not reach the API (exit 12)
                                                             -> Failed, retried
- ``AbortRun`` or ``catch_error`` skipped (10), unloadable task (11), unserialisable
  output (13)                                                -> Failed, not retried
- the task raised an exception named by the Task's ``retry.nonRetryableErrors``
                                                             -> Failed, not retried (the
  state machine matches the reported class hierarchy)
- the pod ran past ``activeDeadlineSeconds`` (maxDurationSeconds) -> TimedOut, not retried
- OOMKilled, Evicted, the pod deleted by someone else, the node lost, any other exit
                                                             -> Failed, retried
- the container never started: unschedulable, image pull failing, container config
  errors past their timeouts (:func:`start_problem`), ``exceeded quota`` on create, the
  node lost before the container ran                         -> retried, NOT counted
  against maxAttempts (up to the operator's infrastructure retry limit)
- the image name is invalid, the pod spec is rejected        -> Failed, not retried
- the runner registered a durable wait (exit 14, or any end after the registration)
                                                             -> Waiting (not an attempt end:
  the next pod resumes the same attempt)
A success the runner reported wins over the pod's fate afterwards (the output is in
PostgreSQL already).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from kubetask.engine.machine import AttemptEnded, Outcome, RunError
from kubetask.protocol import (
    EXIT_ABORTED,
    EXIT_LOAD_ERROR,
    EXIT_OK,
    EXIT_OUTPUT_NOT_SERIALIZABLE,
)

#: The container's termination reason when the kernel killed it for exceeding its memory
#: limit (a Task's ``retry.outOfMemory`` then applies to the next attempts).
OOM_KILLED = "OOMKilled"

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
    #: The runner registered a durable wait and suspends (it reports nothing else).
    suspended: bool = False
    error_type: str | None = None
    error_message: str | None = None
    #: The exception's class hierarchy (``error.types``), most derived first.
    error_types: tuple[str, ...] = ()
    #: ``catch_error`` asked for the next attempt not before this time.
    retry_at: datetime | None = None
    #: ``catch_error`` asked for no further attempt.
    skipped: bool = False


@dataclass(frozen=True)
class PodEnd:
    """The facts about an ended attempt pod that the state machine needs."""

    exit_code: int | None
    reason: str
    message: str
    #: The task never ran (infrastructure): retried without counting as an attempt.
    infra: bool = False
    #: Can never work (invalid image name, rejected spec): not retried.
    permanent: bool = False


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
        if waiting is not None and waiting.get("reason") == "InvalidImageName":
            # No retry can fix a malformed image reference.
            return PodEnd(
                None, "InvalidImageName", str(waiting.get("message") or "invalid image name"), permanent=True
            )
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
    if not started(pod):
        # Ended before its task container ever started (the kubelet refused the pod at
        # admission, OutOfcpu or NodeAffinity say, or killed it before the start): the
        # task did not run, so the attempt is not counted.
        return PodEnd(
            None,
            reason or "NotStarted",
            status.get("message") or f"the pod {phase} before its task container started",
            infra=True,
        )
    return PodEnd(None, reason or phase, status.get("message") or f"pod {phase}")


#: Waiting reasons of a container whose image cannot be had (yet).
IMAGE_PULL_WAITING = frozenset({"ErrImageNeverPull", "ImagePullBackOff", "ErrImagePull"})
#: Waiting reasons of a container that cannot be created (a missing Secret or ConfigMap...).
CONFIG_WAITING = frozenset({"CreateContainerConfigError", "CreateContainerError"})


@dataclass(frozen=True)
class StartLimits:
    """How long a pod may take to start before its attempt ends (not counted)."""

    #: The scheduler cannot place the pod (PodScheduled=False, reason Unschedulable).
    unschedulable: timedelta
    #: The image cannot be pulled (ErrImagePull, ImagePullBackOff, ErrImageNeverPull).
    image_pull: timedelta
    #: Anything else that keeps the container from starting (config errors, slow node).
    start: timedelta
    #: A pod marked for deletion that is still there this long after its deadline
    #: (its node is gone and cannot confirm): deleted by force.
    terminating: timedelta


def started(pod: dict[str, Any]) -> bool:
    """Whether the task's container ever started (so the task may have run)."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == "task":
            state = cs.get("state") or {}
            last = cs.get("lastState") or {}
            return bool(state.get("running") or state.get("terminated") or last.get("terminated"))
    return False


#: What keeps a pod that has not ended from running its task (:func:`start_stage`).
TERMINATING = "terminating"
UNSCHEDULABLE = "unschedulable"
IMAGE_PULL = "image_pull"
STARTING = "starting"


def start_stage(pod: dict[str, Any]) -> str | None:
    """Which start limit a pod that has not ended is under: :data:`TERMINATING` (marked
    for deletion), :data:`UNSCHEDULABLE`, :data:`IMAGE_PULL` (its image cannot be had
    yet), :data:`STARTING` (anything else); None once its task container started."""
    if (pod.get("metadata") or {}).get("deletionTimestamp") is not None:
        return TERMINATING
    if started(pod):
        return None
    status = pod.get("status") or {}
    if _unscheduled(status) is not None:
        return UNSCHEDULABLE
    if str((_waiting(status) or {}).get("reason") or "") in IMAGE_PULL_WAITING:
        return IMAGE_PULL
    return STARTING


def start_problem(
    pod: dict[str, Any], *, now: datetime, limits: StartLimits
) -> tuple[PodEnd | None, datetime | None]:
    """For a pod that has not ended: (how its attempt ends now, or None; when to look
    again, or None). Only pods whose container never started are judged here, except a
    pod stuck terminating on a lost node."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    stage = start_stage(pod)
    if stage is None:
        return None, None
    if stage == TERMINATING:
        deadline = _time(meta["deletionTimestamp"]) or now
        deadline += limits.terminating
        if now >= deadline:
            return (
                PodEnd(
                    None,
                    "NodeLost",
                    "the pod was being deleted but its node never confirmed it (node lost?)",
                    infra=not started(pod),
                ),
                None,
            )
        return None, deadline
    created = _time(meta.get("creationTimestamp")) or now
    if stage == UNSCHEDULABLE:
        deadline = created + limits.unschedulable
        if now >= deadline:
            cond = _unscheduled(status) or {}
            msg = str(cond.get("message") or "the pod could not be scheduled")
            return PodEnd(
                None,
                "Unschedulable",
                f"not scheduled after {_secs(limits.unschedulable)}: {msg}",
                infra=True,
            ), None
        return None, deadline
    waiting = _waiting(status)
    reason = str((waiting or {}).get("reason") or "")
    limit = limits.image_pull if stage == IMAGE_PULL else limits.start
    deadline = created + limit
    if now >= deadline:
        msg = str((waiting or {}).get("message") or reason or "the container did not start")
        return (
            PodEnd(
                None,
                reason or "PodStartTimeout",
                f"the container did not start within {_secs(limit)}: {msg}",
                infra=True,
            ),
            None,
        )
    return None, deadline


def _secs(d: timedelta) -> str:
    return f"{d.total_seconds():g}s"


def _time(raw: Any) -> datetime | None:
    return datetime.fromisoformat(raw.replace("Z", "+00:00")) if isinstance(raw, str) else None


def _unscheduled(status: dict[str, Any]) -> dict[str, Any] | None:
    """The PodScheduled=False condition, if the scheduler could not place the pod."""
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return cond if isinstance(cond, dict) else None
    return None


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
    if report is not None and report.suspended:
        # The wait is in PostgreSQL and what ran before it is checkpointed: however the
        # pod ended after that (exit 14, killed, deleted), the run waits.
        return AttemptEnded(attempt, Outcome.SUSPENDED, "Suspended")
    if end.permanent:
        return AttemptEnded(attempt, Outcome.ABORTED, end.reason, RunError(end.reason, end.message))
    if end.infra and report is None:
        return AttemptEnded(attempt, Outcome.INFRA, end.reason, RunError(end.reason, end.message))
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
            return AttemptEnded(attempt, Outcome.ABORTED, "RetrySkipped" if report.skipped else err.type, err)
        # A runner that reports no hierarchy (an older one) still names the class.
        types = report.error_types or (err.type,)
        return AttemptEnded(
            attempt, Outcome.FAILED, "TaskFailed", err, error_types=types, retry_at=report.retry_at
        )
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
