"""Delays, TTLs (the engine) and rate limits (the GCRA bucket), as pure functions."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubetask.admission.ratelimit import Bucket
from kubetask.apimodels import TriggerRequest, duration_seconds
from kubetask.control.intake import start_window
from kubetask.engine import machine as m
from kubetask.spec import RetrySpec, RunSpec

NOW = datetime(2026, 1, 1, tzinfo=UTC)
P = m.Phase


def go(state: m.RunState, event: m.Event, now: datetime = NOW) -> m.Transition:
    return m.step(state, event, now=now, retry=RetrySpec(), rand=random.random)


def test_a_delayed_run_holds_nothing_until_its_time_then_queues_with_its_ttl() -> None:
    start, expiry = NOW + timedelta(minutes=5), NOW + timedelta(minutes=6)
    tr = go(m.RunState(), m.TaskResolved(3, not_before=start, expires_at=expiry))
    assert tr.state.phase is P.DELAYED and tr.actions == (m.WakeAt(start),)
    assert go(tr.state, m.BackoffElapsed(), NOW + timedelta(minutes=1)).actions == (m.WakeAt(start),)
    queued = go(tr.state, m.BackoffElapsed(), start)
    assert queued.state.phase is P.QUEUED and queued.actions == (m.Enqueue(), m.WakeAt(expiry))
    canceled = go(tr.state, m.CancelRequested())
    assert canceled.state.phase is P.CANCELED


def test_a_queued_run_not_started_by_its_ttl_expires_and_a_started_one_never_does() -> None:
    expiry = NOW + timedelta(seconds=30)
    queued = go(m.RunState(), m.TaskResolved(3, expires_at=expiry)).state
    assert go(queued, m.TtlExpired(), NOW).actions == (m.WakeAt(expiry),)  # not yet
    tr = go(queued, m.TtlExpired(), expiry)
    assert tr.state.phase is P.EXPIRED and tr.state.terminal and tr.actions == (m.Dequeue(),)
    running = go(queued, m.SlotGranted()).state
    assert go(running, m.TtlExpired(), expiry + timedelta(hours=1)).state == running
    retrying_then_queued = m.RunState(phase=P.QUEUED, attempt=1, expires_at=expiry)
    assert go(retrying_then_queued, m.TtlExpired(), expiry).state == retrying_then_queued


def test_start_window_from_the_run_spec() -> None:
    created = NOW
    assert start_window(RunSpec(task="t"), created) == (None, None)
    assert start_window(RunSpec(task="t", delay_seconds=60, ttl_seconds=10), created) == (
        NOW + timedelta(seconds=60),
        NOW + timedelta(seconds=70),
    )
    at = NOW + timedelta(hours=1)
    assert start_window(RunSpec(task="t", not_before=at), created) == (at, None)
    assert start_window(RunSpec(task="t", ttl_seconds=5), created) == (None, NOW + timedelta(seconds=5))
    with pytest.raises(ValueError, match="delaySeconds or notBefore"):
        RunSpec(task="t", delay_seconds=1, not_before=at)
    with pytest.raises(ValueError, match="time zone"):
        TriggerRequest.model_validate({"notBefore": "2026-12-01T09:00:00"})


def test_durations_for_the_client_and_the_cli() -> None:
    assert [
        duration_seconds(v, "d") for v in ("20s", "5m", "1h30m", "2d", "45", 7, timedelta(minutes=2))
    ] == [
        20,
        300,
        5400,
        172800,
        45,
        7,
        120,
    ]
    with pytest.raises(ValueError, match="not a duration"):
        duration_seconds("soon", "delay")


@given(
    limit=st.integers(1, 20),
    period=st.integers(1, 60),
    asks=st.lists(st.floats(0, 600, allow_nan=False), min_size=1, max_size=200),
)
def test_the_bucket_allows_a_burst_of_limit_then_limit_per_period(
    limit: int, period: int, asks: list[float]
) -> None:
    """However starts are asked for, those allowed obey the token bucket: in any window
    of w seconds at most limit + w / T of them (T = period / limit); and a start refused
    is allowed at the time the bucket names."""
    bucket = Bucket(limit, period)
    tat: datetime | None = None
    allowed: list[float] = []
    for ask in sorted(asks):
        now = NOW + timedelta(seconds=ask)
        new = bucket.take(tat, now)
        if new is None:
            at = bucket.allowed_at(tat, now)
            assert at > now and bucket.take(tat, at) is not None
            continue
        tat = new
        allowed.append(ask)
    interval = period / limit
    for i, start in enumerate(allowed):
        for j in range(i, len(allowed)):
            window = allowed[j] - start
            assert j - i + 1 <= limit + window / interval + 1e-6


def test_a_quiet_bucket_allows_exactly_limit_at_once() -> None:
    bucket = Bucket(5, 10)
    tat = None
    for _ in range(5):
        tat = bucket.take(tat, NOW)
        assert tat is not None
    assert bucket.take(tat, NOW) is None
    assert bucket.allowed_at(tat, NOW) == NOW + timedelta(seconds=2)
