"""The run state machine: (state, event) -> (state, actions).

Pure: no clock, no randomness, no I/O of its own. The caller passes ``now`` and a
random source in, and carries the returned actions out (create a pod, release a slot,
wake up later, ...). Events that do not apply to the current state (a stale pod event
for an older attempt, a cancel after the end) return the state unchanged and no actions,
so replaying events after an operator restart is harmless.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from kubetask.engine.backoff import delay_ms
from kubetask.engine.errortypes import non_retryable_match
from kubetask.spec import RetrySpec


class Phase(enum.StrEnum):
    PENDING = "Pending"
    #: Resolved, but not to start before its delay (spec.delaySeconds, spec.notBefore).
    DELAYED = "Delayed"
    QUEUED = "Queued"
    RUNNING = "Running"
    RETRYING = "Retrying"
    #: Suspended on a durable wait (sleep, event, token, child run): no pod, no slot.
    WAITING = "Waiting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELED = "Canceled"
    TIMED_OUT = "TimedOut"
    #: Another run with the same idempotencyKey executes instead; this one never does.
    DEDUPLICATED = "Deduplicated"
    #: Not started before its TTL (spec.ttlSeconds) ran out; it never ran.
    EXPIRED = "Expired"


def counted_attempts(pods: int, infra_failures: int, resumes: int) -> int:
    """Attempts as the task counts them (``ctx.attempt.number``): every pod is numbered,
    but pods that never ran the task and pods that resumed an attempt after a wait are not
    attempts."""
    return pods - infra_failures - resumes


TERMINAL = frozenset(
    {Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELED, Phase.TIMED_OUT, Phase.DEDUPLICATED, Phase.EXPIRED}
)


@dataclass(frozen=True)
class RunError:
    type: str
    message: str


@dataclass(frozen=True)
class RunState:
    phase: Phase = Phase.PENDING
    #: Number of the current (Running) or last attempt; 0 before the first. Every pod
    #: gets a new number, so attempts that never started (infra_failures) are numbered too.
    attempt: int = 0
    max_attempts: int = 3
    #: Attempts that ended before the task ran (pod never started, quota, node lost):
    #: they do not count against max_attempts, up to their own limit.
    infra_failures: int = 0
    #: Pods that continued an attempt after a wait: not attempts either.
    resumes: int = 0
    #: The next pod continues the current attempt (set when the run suspends; kept if a
    #: resume pod never starts).
    resuming: bool = False
    next_attempt_at: datetime | None = None
    #: A run not started by then ends Expired (spec.ttlSeconds).
    expires_at: datetime | None = None
    error: RunError | None = None
    #: Machine-readable reason of the last transition (becomes a condition reason).
    reason: str = "Created"
    message: str = ""

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    @property
    def counted_attempts(self) -> int:
        """Attempts that count against max_attempts: pods in which the task ran, except
        those that resumed an attempt after a wait."""
        return counted_attempts(self.attempt, self.infra_failures, self.resumes)


# ---- events -------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskResolved:
    """The Task exists and the Run is valid: the run may queue for a slot (or wait for its
    delay first). ``expires_at``: when it ends Expired if it has not started."""

    max_attempts: int
    not_before: datetime | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True)
class TtlExpired:
    """The run's TTL is over: if it never started, it ends Expired."""


@dataclass(frozen=True)
class Rejected:
    """The Run can never execute (unknown Task after the grace period, payload too large, ...)."""

    reason: str
    message: str


@dataclass(frozen=True)
class TaskMissing:
    """The Task does not exist (yet): the run waits for it until ``until``."""

    until: datetime
    message: str


@dataclass(frozen=True)
class Deduplicated:
    """Another run holds the same idempotencyKey (or took this trigger of a debounce
    burst): this one ends without executing."""

    original_run_id: str
    message: str
    reason: str = "Deduplicated"


@dataclass(frozen=True)
class DelayMoved:
    """A Delayed run's start moves (a trailing debounce took another trigger)."""

    until: datetime
    message: str


@dataclass(frozen=True)
class SlotGranted:
    """Admission gave the run a slot: its next attempt's pod may be created."""


class Outcome(enum.StrEnum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"  # retryable failure
    ABORTED = "Aborted"  # not retryable: AbortRun, load error, unserialisable output
    TIMED_OUT = "TimedOut"
    #: The task never ran (pod never started, quota exceeded, node lost before start):
    #: retried without using up an attempt, up to the infrastructure retry limit.
    INFRA = "Infrastructure"
    #: The task suspended on a durable wait (the runner registered it and exited).
    SUSPENDED = "Suspended"


@dataclass(frozen=True)
class AttemptEnded:
    attempt: int
    outcome: Outcome
    reason: str
    error: RunError | None = None
    #: SUSPENDED: the wait was satisfied before the pod ended (resume at once), else
    #: when its timer is due (a sleep's end, a wait's timeout), and what it waits for.
    resume_now: bool = False
    wake_at: datetime | None = None
    waiting_for: str = ""
    #: The raised exception's class hierarchy (``module.QualifiedName``, most derived
    #: first) as the runner reported it; matched against ``retry.nonRetryableErrors``.
    error_types: tuple[str, ...] = ()
    #: The task's ``catch_error`` asked for the next attempt not before this time: it
    #: replaces the back-off delay (never earlier than now; maxAttempts still applies).
    retry_at: datetime | None = None


@dataclass(frozen=True)
class WaitSatisfied:
    """The wait of a Waiting run was satisfied or timed out: it resumes (queues again)."""

    message: str = "the wait is over"


@dataclass(frozen=True)
class BackoffElapsed:
    """A wake-up for a run in back-off; it only acts once ``next_attempt_at`` is reached."""


@dataclass(frozen=True)
class CancelRequested:
    reason: str = "Canceled"
    message: str = "the run was canceled"


Event = (
    TaskResolved
    | TaskMissing
    | Deduplicated
    | Rejected
    | SlotGranted
    | AttemptEnded
    | BackoffElapsed
    | CancelRequested
    | WaitSatisfied
    | TtlExpired
    | DelayMoved
)


# ---- actions ------------------------------------------------------------------------


@dataclass(frozen=True)
class Enqueue:
    """Put the run in its queue to wait for a slot."""


@dataclass(frozen=True)
class Dequeue:
    """Take the run out of its queue (it no longer wants a slot)."""


@dataclass(frozen=True)
class CreatePod:
    attempt: int


@dataclass(frozen=True)
class DeletePod:
    attempt: int


@dataclass(frozen=True)
class ReleaseSlot:
    attempt: int


@dataclass(frozen=True)
class WakeAt:
    at: datetime


Action = Enqueue | Dequeue | CreatePod | DeletePod | ReleaseSlot | WakeAt


@dataclass(frozen=True)
class Transition:
    state: RunState
    actions: tuple[Action, ...] = field(default_factory=tuple)

    @property
    def changed(self) -> bool:
        return bool(self.actions)


def _to(state: RunState, **changes: object) -> RunState:
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


def step(
    state: RunState,
    event: Event,
    *,
    now: datetime,
    retry: RetrySpec,
    rand: Callable[[], float],
    infra_limit: int = 10,
) -> Transition:
    """Apply one event. See the module docstring for the contract. ``infra_limit`` is
    how many attempts may end before the task ran (Outcome.INFRA) without failing the run."""
    unchanged = Transition(state)
    match event:
        case TaskResolved(max_attempts=max_attempts, not_before=not_before, expires_at=expires_at):
            if state.phase is not Phase.PENDING:
                return unchanged
            if not_before is not None and now < not_before:
                return Transition(
                    _to(
                        state,
                        phase=Phase.DELAYED,
                        max_attempts=max_attempts,
                        next_attempt_at=not_before,
                        expires_at=expires_at,
                        reason="Delayed",
                        message=f"delayed until {not_before.isoformat()}",
                    ),
                    (WakeAt(not_before),),
                )
            return Transition(
                _to(
                    state,
                    phase=Phase.QUEUED,
                    max_attempts=max_attempts,
                    expires_at=expires_at,
                    reason="WaitingForSlot",
                    message="waiting for a slot in the queue",
                ),
                (Enqueue(), WakeAt(expires_at)) if expires_at is not None else (Enqueue(),),
            )
        case TtlExpired():
            if state.phase is not Phase.QUEUED or state.attempt > 0 or state.expires_at is None:
                return unchanged
            if now < state.expires_at:
                return Transition(state, (WakeAt(state.expires_at),))
            return Transition(
                _to(
                    state,
                    phase=Phase.EXPIRED,
                    reason="Expired",
                    message=f"not started before its TTL ran out at {state.expires_at.isoformat()}",
                ),
                (Dequeue(),),
            )
        case TaskMissing(until=until, message=message):
            if state.phase is not Phase.PENDING:
                return unchanged
            return Transition(_to(state, reason="TaskNotFound", message=message), (WakeAt(until),))
        case Deduplicated(message=message, reason=reason):
            if state.phase is not Phase.PENDING:
                return unchanged
            return Transition(
                _to(state, phase=Phase.DEDUPLICATED, reason=reason, message=message), (Dequeue(),)
            )
        case DelayMoved(until=until, message=message):
            if state.phase is not Phase.DELAYED:
                return unchanged
            return Transition(_to(state, next_attempt_at=until, message=message), (WakeAt(until),))
        case Rejected(reason=reason, message=message):
            if state.phase is not Phase.PENDING:
                return unchanged
            return Transition(
                _to(
                    state,
                    phase=Phase.FAILED,
                    reason=reason,
                    message=message,
                    error=RunError(type=reason, message=message),
                ),
                (Dequeue(),),
            )
        case SlotGranted():
            if state.phase is not Phase.QUEUED:
                return unchanged
            attempt = state.attempt + 1
            resumes = state.resumes + 1 if state.resuming else state.resumes
            counted = counted_attempts(attempt, state.infra_failures, resumes)
            what = f"attempt {counted} of {state.max_attempts}"
            return Transition(
                _to(
                    state,
                    phase=Phase.RUNNING,
                    attempt=attempt,
                    resumes=resumes,
                    next_attempt_at=None,
                    reason="Resumed" if state.resuming else "PodCreated",
                    message=(f"{what} resumed" if state.resuming else f"{what} is running")
                    + (f" (pod {attempt})" if attempt != counted else ""),
                ),
                (CreatePod(attempt),),
            )
        case AttemptEnded(
            attempt=attempt,
            outcome=outcome,
            reason=reason,
            error=error,
            resume_now=resume_now,
            wake_at=wake_at,
            waiting_for=waiting_for,
            error_types=types,
            retry_at=retry_at,
        ):
            if state.phase is Phase.CANCELED and attempt == state.attempt and attempt > 0:
                # The canceled run's pod is gone now: only then is its slot free, so a
                # watcher never sees the queue's limit exceeded while the pod terminates.
                return Transition(state, (ReleaseSlot(attempt),))
            if state.phase is not Phase.RUNNING or attempt != state.attempt:
                return unchanged
            release = ReleaseSlot(attempt)
            if outcome is Outcome.SUSPENDED:
                counted = state.counted_attempts
                if resume_now:
                    return Transition(
                        _to(
                            state,
                            phase=Phase.QUEUED,
                            resuming=True,
                            reason="Resuming",
                            message=f"attempt {counted} resumes: {waiting_for or 'its wait'} is over",
                        ),
                        (release, Enqueue()),
                    )
                deadline = f" until {wake_at.isoformat()}" if wake_at is not None else ""
                return Transition(
                    _to(
                        state,
                        phase=Phase.WAITING,
                        resuming=True,
                        reason="Waiting",
                        message=f"attempt {counted} waits for {waiting_for or 'a durable wait'}{deadline}; "
                        "it holds no pod and no slot",
                    ),
                    (release, WakeAt(wake_at)) if wake_at is not None else (release,),
                )
            if state.resuming and outcome is not Outcome.INFRA:
                # The resumed attempt ended: whatever comes next is a new attempt.
                state = _to(state, resuming=False)
            if outcome is Outcome.SUCCEEDED:
                return Transition(
                    _to(
                        state,
                        phase=Phase.SUCCEEDED,
                        error=None,
                        reason="Succeeded",
                        message=f"attempt {attempt} succeeded",
                    ),
                    (release,),
                )
            if outcome is Outcome.TIMED_OUT:
                err = error or RunError("MaxDurationExceeded", "the attempt exceeded maxDurationSeconds")
                return Transition(
                    _to(state, phase=Phase.TIMED_OUT, error=err, reason=reason, message=err.message),
                    (release,),
                )
            err = error or RunError(reason, f"attempt {attempt} failed: {reason}")
            if outcome is Outcome.INFRA:
                failures = state.infra_failures + 1
                if state.resuming:
                    # A resume pod that never ran: neither a resume nor an attempt; the
                    # next pod resumes again.
                    state = _to(state, resumes=state.resumes - 1)
                if failures > infra_limit:
                    return Transition(
                        _to(
                            state,
                            phase=Phase.FAILED,
                            infra_failures=failures,
                            error=err,
                            reason="InfrastructureFailures",
                            message=f"{failures} attempts could not start (limit {infra_limit}); "
                            f"last: {err.message}",
                        ),
                        (release,),
                    )
                wait = timedelta(milliseconds=delay_ms(retry, failed_attempt=failures, rand=rand))
                at = now + wait
                return Transition(
                    _to(
                        state,
                        phase=Phase.RETRYING,
                        infra_failures=failures,
                        error=err,
                        next_attempt_at=at,
                        reason=reason,
                        message=f"attempt {attempt} could not start ({err.message}); it does not count; "
                        f"next try after {wait.total_seconds():.3f}s",
                    ),
                    (release, WakeAt(at)),
                )
            if outcome is Outcome.ABORTED:
                return Transition(
                    _to(
                        state,
                        phase=Phase.FAILED,
                        error=err,
                        reason=reason,
                        message=f"attempt {attempt} failed and is not retried: {err.message}",
                    ),
                    (release,),
                )
            matched = non_retryable_match(retry.non_retryable_errors, types)
            if matched is not None:
                pattern, name = matched
                return Transition(
                    _to(
                        state,
                        phase=Phase.FAILED,
                        error=err,
                        reason="NonRetryableError",
                        message=f"attempt {attempt} failed and is not retried: {name} matches "
                        f"retry.nonRetryableErrors entry {pattern!r}: {err.message}",
                    ),
                    (release,),
                )
            if state.counted_attempts >= state.max_attempts:
                return Transition(
                    _to(
                        state,
                        phase=Phase.FAILED,
                        error=err,
                        reason="RetriesExhausted",
                        message=f"all {state.max_attempts} attempts failed; last: {err.message}",
                    ),
                    (release,),
                )
            counted = state.counted_attempts
            if retry_at is not None:
                # The task's own choice wins over the back-off, but never points back in time.
                at, source = max(retry_at, now), " (the time catch_error chose)"
            else:
                at, source = (
                    now + timedelta(milliseconds=delay_ms(retry, failed_attempt=counted, rand=rand)),
                    "",
                )
            return Transition(
                _to(
                    state,
                    phase=Phase.RETRYING,
                    error=err,
                    next_attempt_at=at,
                    reason=reason,
                    message=f"attempt {counted} failed ({err.message}); attempt {counted + 1} "
                    f"after {(at - now).total_seconds():.3f}s{source}",
                ),
                (release, WakeAt(at)),
            )
        case BackoffElapsed():
            if state.phase is Phase.DELAYED:
                if state.next_attempt_at is not None and now < state.next_attempt_at:
                    return Transition(state, (WakeAt(state.next_attempt_at),))
                expires = state.expires_at
                return Transition(
                    _to(
                        state,
                        phase=Phase.QUEUED,
                        next_attempt_at=None,
                        reason="WaitingForSlot",
                        message="its delay is over: waiting for a slot in the queue",
                    ),
                    (Enqueue(), WakeAt(expires)) if expires is not None else (Enqueue(),),
                )
            if state.phase is not Phase.RETRYING:
                return unchanged
            if state.next_attempt_at is not None and now < state.next_attempt_at:
                return Transition(state, (WakeAt(state.next_attempt_at),))
            return Transition(
                _to(
                    state,
                    phase=Phase.QUEUED,
                    next_attempt_at=None,
                    reason="WaitingForSlot",
                    message=f"attempt {state.counted_attempts + 1} is waiting for a slot",
                ),
                (Enqueue(),),
            )
        case WaitSatisfied(message=message):
            if state.phase is not Phase.WAITING:
                return unchanged
            return Transition(
                _to(
                    state,
                    phase=Phase.QUEUED,
                    reason="Resuming",
                    message=f"attempt {state.counted_attempts} resumes: {message}",
                ),
                (Enqueue(),),
            )
        case CancelRequested(reason=reason, message=message):
            if state.terminal:
                return unchanged
            actions: list[Action] = []
            if state.phase is Phase.RUNNING:
                # The slot is released when the pod's end is observed (AttemptEnded above).
                actions.append(DeletePod(state.attempt))
            elif state.phase in (Phase.QUEUED, Phase.PENDING, Phase.DELAYED):
                actions.append(Dequeue())
            return Transition(
                _to(state, phase=Phase.CANCELED, next_attempt_at=None, reason=reason, message=message),
                tuple(actions) or (Dequeue(),),
            )
    raise TypeError(f"unknown event {event!r}")
