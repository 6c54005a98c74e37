"""The run state machine as a table of (state, event) -> (state, actions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kubetask.engine import machine as m
from kubetask.spec import RetrySpec

NOW = datetime(2026, 1, 1, tzinfo=UTC)
RETRY = RetrySpec(max_attempts=3, factor=2, min_timeout_ms=1000, max_timeout_ms=60_000, randomize=False)
ERR = m.RunError("ValueError", "boom")


def S(phase: m.Phase, attempt: int = 0, **kw: object) -> m.RunState:
    return m.RunState(phase=phase, attempt=attempt, max_attempts=3, **kw)  # type: ignore[arg-type]


def ended(attempt: int, outcome: m.Outcome, reason: str = "TaskFailed") -> m.AttemptEnded:
    return m.AttemptEnded(attempt, outcome, reason, ERR if outcome is not m.Outcome.SUCCEEDED else None)


P = m.Phase
TABLE: list[tuple[str, m.RunState, m.Event, m.Phase, tuple[type, ...]]] = [
    ("resolved task queues the run", S(P.PENDING), m.TaskResolved(3), P.QUEUED, (m.Enqueue,)),
    (
        "unknown task fails a pending run",
        S(P.PENDING),
        m.Rejected("TaskNotFound", "no"),
        P.FAILED,
        (m.Dequeue,),
    ),
    ("slot starts attempt 1", S(P.QUEUED), m.SlotGranted(), P.RUNNING, (m.CreatePod,)),
    ("slot starts attempt 3", S(P.QUEUED, 2), m.SlotGranted(), P.RUNNING, (m.CreatePod,)),
    (
        "success ends the run",
        S(P.RUNNING, 1),
        ended(1, m.Outcome.SUCCEEDED, "Succeeded"),
        P.SUCCEEDED,
        (m.ReleaseSlot,),
    ),
    ("failure backs off", S(P.RUNNING, 1), ended(1, m.Outcome.FAILED), P.RETRYING, (m.ReleaseSlot, m.WakeAt)),
    ("last failure fails", S(P.RUNNING, 3), ended(3, m.Outcome.FAILED), P.FAILED, (m.ReleaseSlot,)),
    (
        "abort does not retry",
        S(P.RUNNING, 1),
        ended(1, m.Outcome.ABORTED, "AbortRun"),
        P.FAILED,
        (m.ReleaseSlot,),
    ),
    (
        "timeout ends TimedOut",
        S(P.RUNNING, 1),
        ended(1, m.Outcome.TIMED_OUT, "MaxDurationExceeded"),
        P.TIMED_OUT,
        (m.ReleaseSlot,),
    ),
    (
        "backoff over queues again",
        S(P.RETRYING, 1, next_attempt_at=NOW),
        m.BackoffElapsed(),
        P.QUEUED,
        (m.Enqueue,),
    ),
    (
        "early wake-up waits on",
        S(P.RETRYING, 1, next_attempt_at=NOW + timedelta(seconds=1)),
        m.BackoffElapsed(),
        P.RETRYING,
        (m.WakeAt,),
    ),
    (
        "cancel while running deletes the pod",
        S(P.RUNNING, 2),
        m.CancelRequested(),
        P.CANCELED,
        (m.DeletePod,),
    ),
    (
        "canceled run's pod end frees the slot",
        S(P.CANCELED, 2),
        ended(2, m.Outcome.FAILED, "PodDeleted"),
        P.CANCELED,
        (m.ReleaseSlot,),
    ),
    ("cancel while queued leaves the queue", S(P.QUEUED, 1), m.CancelRequested(), P.CANCELED, (m.Dequeue,)),
    ("cancel while pending", S(P.PENDING), m.CancelRequested(), P.CANCELED, (m.Dequeue,)),
    (
        "cancel in back-off",
        S(P.RETRYING, 1, next_attempt_at=NOW),
        m.CancelRequested(),
        P.CANCELED,
        (m.Dequeue,),
    ),
    # Events that do not apply change nothing: replays after a restart are harmless.
    ("stale attempt end is ignored", S(P.RUNNING, 2), ended(1, m.Outcome.FAILED), P.RUNNING, ()),
    ("end after the end is ignored", S(P.SUCCEEDED, 1), ended(1, m.Outcome.FAILED), P.SUCCEEDED, ()),
    ("second slot is ignored", S(P.RUNNING, 1), m.SlotGranted(), P.RUNNING, ()),
    ("cancel after the end is ignored", S(P.FAILED, 3), m.CancelRequested(), P.FAILED, ()),
    ("resolve twice is ignored", S(P.QUEUED), m.TaskResolved(3), P.QUEUED, ()),
    ("backoff elapsed while running is ignored", S(P.RUNNING, 1), m.BackoffElapsed(), P.RUNNING, ()),
    ("reject after queueing is ignored", S(P.QUEUED), m.Rejected("X", "y"), P.QUEUED, ()),
]


@pytest.mark.parametrize(
    ("state", "event", "phase", "actions"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_transition_table(
    state: m.RunState, event: m.Event, phase: m.Phase, actions: tuple[type, ...]
) -> None:
    tr = m.step(state, event, now=NOW, retry=RETRY, rand=lambda: 0.0)
    assert tr.state.phase is phase
    assert tuple(type(a) for a in tr.actions) == actions


def test_failure_schedules_the_next_attempt_after_the_backoff() -> None:
    tr = m.step(S(P.RUNNING, 2), ended(2, m.Outcome.FAILED), now=NOW, retry=RETRY, rand=lambda: 0.0)
    assert tr.state.next_attempt_at == NOW + timedelta(milliseconds=2000)
    assert m.WakeAt(NOW + timedelta(milliseconds=2000)) in tr.actions
    assert tr.state.error == ERR


def test_retries_exhausted_keeps_the_last_error() -> None:
    tr = m.step(S(P.RUNNING, 3), ended(3, m.Outcome.FAILED), now=NOW, retry=RETRY, rand=lambda: 0.0)
    assert tr.state.reason == "RetriesExhausted"
    assert tr.state.error == ERR
    assert "boom" in tr.state.message


def test_slot_grant_creates_the_pod_of_the_next_attempt() -> None:
    tr = m.step(S(P.QUEUED, 1), m.SlotGranted(), now=NOW, retry=RETRY, rand=lambda: 0.0)
    assert tr.actions == (m.CreatePod(2),)
    assert tr.state.attempt == 2


def test_max_attempts_comes_from_the_resolved_task() -> None:
    tr = m.step(S(P.PENDING), m.TaskResolved(max_attempts=7), now=NOW, retry=RETRY, rand=lambda: 0.0)
    assert tr.state.max_attempts == 7


def test_terminal_phases() -> None:
    assert {P.SUCCEEDED, P.FAILED, P.CANCELED, P.TIMED_OUT, P.DEDUPLICATED, P.EXPIRED} == m.TERMINAL


def step(state: m.RunState, event: m.Event, limit: int = 10) -> m.Transition:
    return m.step(state, event, now=NOW, retry=RETRY, rand=lambda: 0.0, infra_limit=limit)


def test_a_duplicate_ends_at_once_and_nothing_promotes_it() -> None:
    tr = step(S(P.PENDING), m.Deduplicated("run_orig", "same key"))
    assert tr.state.phase is P.DEDUPLICATED and tr.state.terminal
    for later in (m.TaskResolved(3), m.SlotGranted(), m.BackoffElapsed(), m.Rejected("X", "y")):
        assert step(tr.state, later).state == tr.state


def test_a_missing_task_waits_with_a_timer_and_stays_pending() -> None:
    until = NOW + timedelta(seconds=30)
    tr = step(S(P.PENDING), m.TaskMissing(until, "waiting"))
    assert tr.state.phase is P.PENDING and tr.actions == (m.WakeAt(until),)


def test_infrastructure_failures_do_not_use_up_attempts() -> None:
    state = S(P.RUNNING, 3)  # attempts 1 and 2 failed in the task
    tr = step(state, ended(3, m.Outcome.INFRA, "Unschedulable"))
    assert tr.state.phase is P.RETRYING and tr.state.infra_failures == 1
    assert tr.state.counted_attempts == 2  # attempt 3 never ran: a third real attempt remains
    queued = m.step(
        tr.state, m.BackoffElapsed(), now=tr.state.next_attempt_at or NOW, retry=RETRY, rand=lambda: 0.0
    ).state
    running = step(queued, m.SlotGranted()).state
    assert running.attempt == 4 and running.counted_attempts == 3
    assert step(running, ended(4, m.Outcome.FAILED)).state.reason == "RetriesExhausted"


def test_infrastructure_failures_have_their_own_limit() -> None:
    state = m.RunState(phase=P.RUNNING, attempt=3, max_attempts=3, infra_failures=2)
    tr = step(state, ended(3, m.Outcome.INFRA, "QuotaExceeded"), limit=2)
    assert (tr.state.phase, tr.state.reason) == (P.FAILED, "InfrastructureFailures")
    assert any(isinstance(a, m.ReleaseSlot) for a in tr.actions)


# ---- failure handling by error type (docs/retries.md) -------------------------------------

#: What the runner reports for ``class Declined(billing.errors.PaymentError)``.
DECLINED = (
    "billing.errors.Declined",
    "billing.errors.PaymentError",
    "builtins.Exception",
    "builtins.BaseException",
)


def raised(
    attempt: int, types: tuple[str, ...] = DECLINED, retry_at: datetime | None = None
) -> m.AttemptEnded:
    err = m.RunError(types[0].rsplit(".", 1)[-1], "card declined")
    return m.AttemptEnded(attempt, m.Outcome.FAILED, "TaskFailed", err, error_types=types, retry_at=retry_at)


def with_non_retryable(*names: str) -> RetrySpec:
    return RETRY.model_copy(update={"non_retryable_errors": list(names)})


@pytest.mark.parametrize(
    "entry",
    ["Declined", "billing.errors.Declined", "errors.Declined", "PaymentError", "billing.errors.PaymentError"],
)
def test_an_error_named_in_non_retryable_errors_fails_the_run_after_one_attempt(entry: str) -> None:
    tr = m.step(
        S(P.RUNNING, 1), raised(1), now=NOW, retry=with_non_retryable("KeyError", entry), rand=lambda: 0.0
    )
    assert (tr.state.phase, tr.state.reason) == (P.FAILED, "NonRetryableError")
    assert tr.actions == (m.ReleaseSlot(1),)
    assert tr.state.error == m.RunError("Declined", "card declined")
    assert repr(entry) in tr.state.message and "card declined" in tr.state.message


@pytest.mark.parametrize("entry", ["Decline", "rors.Declined", "other.errors.Declined", "ValueError"])
def test_names_that_do_not_name_the_class_or_a_base_leave_the_run_retrying(entry: str) -> None:
    tr = m.step(S(P.RUNNING, 1), raised(1), now=NOW, retry=with_non_retryable(entry), rand=lambda: 0.0)
    assert tr.state.phase is P.RETRYING


def test_non_retryable_errors_only_judge_reported_exceptions_not_pod_endings() -> None:
    oom = m.AttemptEnded(1, m.Outcome.FAILED, "OOMKilled", m.RunError("OOMKilled", "killed"))
    tr = m.step(S(P.RUNNING, 1), oom, now=NOW, retry=with_non_retryable("OOMKilled"), rand=lambda: 0.0)
    assert tr.state.phase is P.RETRYING


def test_retry_at_replaces_the_backoff_delay() -> None:
    at = NOW + timedelta(seconds=42)
    tr = m.step(S(P.RUNNING, 1), raised(1, retry_at=at), now=NOW, retry=RETRY, rand=lambda: 0.0)
    assert tr.state.phase is P.RETRYING
    assert tr.state.next_attempt_at == at  # not NOW + minTimeoutMs (1 s)
    assert m.WakeAt(at) in tr.actions
    assert "catch_error" in tr.state.message and "42.000s" in tr.state.message
    # The back-off wake-up before that time waits on; at that time the run queues again.
    early = m.step(
        tr.state, m.BackoffElapsed(), now=NOW + timedelta(seconds=41), retry=RETRY, rand=lambda: 0.0
    )
    assert early.state.phase is P.RETRYING and early.actions == (m.WakeAt(at),)
    due = m.step(tr.state, m.BackoffElapsed(), now=at, retry=RETRY, rand=lambda: 0.0)
    assert due.state.phase is P.QUEUED


def test_retry_at_shorter_than_the_backoff_is_honoured_too() -> None:
    slow = RETRY.model_copy(update={"min_timeout_ms": 3_600_000, "max_timeout_ms": 3_600_000})
    at = NOW + timedelta(seconds=1)
    tr = m.step(S(P.RUNNING, 1), raised(1, retry_at=at), now=NOW, retry=slow, rand=lambda: 0.0)
    assert tr.state.next_attempt_at == at


def test_retry_at_in_the_past_is_clamped_to_now() -> None:
    tr = m.step(
        S(P.RUNNING, 1), raised(1, retry_at=NOW - timedelta(hours=1)), now=NOW, retry=RETRY, rand=lambda: 0.0
    )
    assert tr.state.next_attempt_at == NOW
    assert m.WakeAt(NOW) in tr.actions


def test_retry_at_does_not_add_attempts_beyond_max_attempts() -> None:
    tr = m.step(
        S(P.RUNNING, 3),
        raised(3, retry_at=NOW + timedelta(seconds=5)),
        now=NOW,
        retry=RETRY,
        rand=lambda: 0.0,
    )
    assert (tr.state.phase, tr.state.reason) == (P.FAILED, "RetriesExhausted")


def test_non_retryable_errors_win_over_a_retry_time_from_catch_error() -> None:
    ev = raised(1, retry_at=NOW + timedelta(seconds=5))
    tr = m.step(S(P.RUNNING, 1), ev, now=NOW, retry=with_non_retryable("PaymentError"), rand=lambda: 0.0)
    assert (tr.state.phase, tr.state.reason) == (P.FAILED, "NonRetryableError")
