"""The engine's side of durable execution: suspending, resuming, and why a resume is
not an attempt (attempt counting across resumes, infrastructure failures and retries)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from kubetask.engine import machine as m
from kubetask.spec import RetrySpec

NOW = datetime(2026, 1, 1, tzinfo=UTC)
RETRY = RetrySpec(max_attempts=3, factor=2, min_timeout_ms=1000, max_timeout_ms=60_000, randomize=False)
P = m.Phase


def go(state: m.RunState, event: m.Event) -> m.Transition:
    return m.step(state, event, now=NOW, retry=RETRY, rand=random.random, infra_limit=5)


def running(attempt: int = 1, **kw: object) -> m.RunState:
    return m.RunState(phase=P.RUNNING, attempt=attempt, max_attempts=3, **kw)  # type: ignore[arg-type]


def suspended(attempt: int, **kw: object) -> m.AttemptEnded:
    return m.AttemptEnded(attempt, m.Outcome.SUSPENDED, "Suspended", **kw)  # type: ignore[arg-type]


def test_suspending_frees_the_slot_and_sets_the_timer() -> None:
    due = NOW + timedelta(days=7)
    tr = go(running(), suspended(1, wake_at=due, waiting_for="event 'approval.received'"))
    assert tr.state.phase is P.WAITING and tr.state.resuming
    assert tr.actions == (m.ReleaseSlot(1), m.WakeAt(due))
    assert "approval.received" in tr.state.message and "no pod" in tr.state.message
    # A wait without a deadline (a child run) has no timer: the child's end wakes it.
    tr = go(running(), suspended(1, waiting_for="child run x"))
    assert tr.actions == (m.ReleaseSlot(1),)


def test_a_wait_satisfied_while_the_pod_exits_resumes_at_once() -> None:
    tr = go(running(), suspended(1, resume_now=True))
    assert tr.state.phase is P.QUEUED and tr.state.resuming
    assert tr.actions == (m.ReleaseSlot(1), m.Enqueue())


def test_a_resume_is_not_an_attempt() -> None:
    state = go(running(), suspended(1, wake_at=NOW)).state
    state = go(state, m.WaitSatisfied("sleep over")).state
    assert state.phase is P.QUEUED
    tr = go(state, m.SlotGranted())
    assert tr.state.phase is P.RUNNING and tr.state.reason == "Resumed"
    assert tr.state.attempt == 2 and tr.state.resumes == 1 and tr.state.counted_attempts == 1
    assert tr.actions == (m.CreatePod(2),)
    # The resumed attempt fails: the retry is attempt 2, with the back-off of attempt 1.
    tr = go(tr.state, m.AttemptEnded(2, m.Outcome.FAILED, "TaskFailed", m.RunError("E", "x")))
    assert tr.state.phase is P.RETRYING and not tr.state.resuming
    assert tr.state.counted_attempts == 1
    assert "attempt 2 after 1.000s" in tr.state.message


def test_a_resume_pod_that_never_starts_is_neither_a_resume_nor_an_attempt() -> None:
    state = go(running(), suspended(1, resume_now=True)).state
    state = go(state, m.SlotGranted()).state  # pod 2 resumes
    tr = go(state, m.AttemptEnded(2, m.Outcome.INFRA, "ImagePullBackOff", m.RunError("I", "pull")))
    assert tr.state.phase is P.RETRYING and tr.state.resuming
    assert (tr.state.infra_failures, tr.state.resumes, tr.state.counted_attempts) == (1, 0, 1)
    later = m.step(
        tr.state, m.BackoffElapsed(), now=NOW + timedelta(hours=1), retry=RETRY, rand=random.random
    )
    state_after = go(later.state, m.SlotGranted()).state
    assert state_after.reason == "Resumed" and state_after.attempt == 3
    assert (state_after.resumes, state_after.counted_attempts) == (1, 1)


def test_only_waiting_runs_resume_and_cancel_ends_a_waiting_run() -> None:
    for phase in (P.RUNNING, P.QUEUED, P.SUCCEEDED, P.CANCELED):
        state = m.RunState(phase=phase, attempt=1)
        assert go(state, m.WaitSatisfied()).state == state
    waiting = go(running(), suspended(1, wake_at=NOW)).state
    tr = go(waiting, m.CancelRequested())
    assert tr.state.phase is P.CANCELED
    assert not any(isinstance(a, m.DeletePod | m.ReleaseSlot) for a in tr.actions)  # holds neither


def test_a_stale_suspension_of_an_old_pod_changes_nothing() -> None:
    state = running(2)
    assert go(state, suspended(1, wake_at=NOW)).state == state


@given(st.lists(st.sampled_from(["suspend", "resume_now", "infra", "fail"]), max_size=30))
def test_counted_attempts_never_exceed_max_attempts_however_runs_suspend(script: list[str]) -> None:
    """Whatever mix of suspensions, resumes, infrastructure failures and failures: the
    attempts counted never pass maxAttempts, resumes are never negative, and every pod
    is accounted for exactly once (attempts + infrastructure failures + resumes)."""
    state = m.RunState(phase=P.QUEUED, attempt=0, max_attempts=3)
    t = NOW
    for action in script:
        if state.terminal:
            break
        if state.phase is P.RETRYING:
            t += timedelta(hours=1)
            state = m.step(state, m.BackoffElapsed(), now=t, retry=RETRY, rand=random.random).state
        if state.phase is P.WAITING:
            state = go(state, m.WaitSatisfied()).state
        if state.phase is not P.QUEUED:
            break
        state = go(state, m.SlotGranted()).state
        pod = state.attempt
        if action == "suspend":
            state = go(state, suspended(pod, wake_at=t)).state
        elif action == "resume_now":
            state = go(state, suspended(pod, resume_now=True)).state
        elif action == "infra":
            state = go(state, m.AttemptEnded(pod, m.Outcome.INFRA, "X", m.RunError("X", "x"))).state
        else:
            state = go(state, m.AttemptEnded(pod, m.Outcome.FAILED, "E", m.RunError("E", "x"))).state
        assert state.resumes >= 0
        assert 0 <= state.counted_attempts <= state.max_attempts
        assert state.counted_attempts + state.infra_failures + state.resumes == state.attempt
