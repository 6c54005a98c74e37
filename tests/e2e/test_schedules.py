"""Schedules on the real cluster, on the wall clock (docs/schedules.md): a schedule every
minute fires on the minute with the documented payload; Skip while a run outlasts the
period; catchUp after the operator was down across fire times; a leader killed around
fire times never makes a fire run twice. Runs are counted through the API server (their
label ``kubetask.dev/schedule``), never from log lines."""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from kubetask.protocol import iso
from tests.e2e.conftest import wait_for
from tests.e2e.harness import GROUP, VERSION, Operator, Stack

pytestmark = pytest.mark.e2e

#: How late a Run may be created after its fire time (docs/schedules.md states it; the
#: creationTimestamp has whole seconds).
TOLERANCE = timedelta(seconds=5)


def source(body: str, task_id: str) -> str:
    return f"from kubetask import task\nimport time\n\n@task(id={task_id!r})\n{body}\n"


ECHO = {"source": source("def f(payload, ctx):\n    return payload", "echo")}
SLEEPER = {"source": source("def f(payload, ctx):\n    time.sleep(payload['s'])\n    return 1", "sleeper")}


def apply_schedule(stack: Stack, ns: str, name: str, **spec: Any) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Schedule", "metadata": {"name": name}, "spec": spec}
    stack.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "schedules", body)


def schedule(stack: Stack, ns: str, name: str) -> dict[str, Any]:
    return stack.custom.get_namespaced_custom_object(GROUP, VERSION, ns, "schedules", name)  # type: ignore[no-any-return]


def runs_of(stack: Stack, ns: str, name: str) -> list[dict[str, Any]]:
    """The Schedule's Runs (label selector), by fire time."""
    items = stack.custom.list_namespaced_custom_object(
        GROUP, VERSION, ns, "runs", label_selector=f"kubetask.dev/schedule={name}"
    )["items"]
    return sorted(items, key=fire_time)


def fire_time(run: dict[str, Any]) -> datetime:
    return parse(run["spec"]["payload"]["timestamp"])


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def sleep_until(at: datetime) -> None:
    time.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()))


@pytest.fixture
def db(e2e_database: str) -> Iterator[Any]:
    engine = create_engine(e2e_database, poolclass=NullPool)
    try:
        yield engine
    finally:
        engine.dispose()


def test_a_schedule_every_minute_fires_on_the_minute_with_the_documented_payload(
    stack: Stack, ns: str, operator: Operator
) -> None:
    stack.apply_task(ns, "echo", ECHO)
    zone = "Asia/Kolkata"  # +05:30: the minute is the same; the payload names the zone
    apply_schedule(
        stack, ns, "every-minute", task="echo", cron="* * * * *", timezone=zone, payload={"greeting": "hi"}
    )
    wait_for(lambda: len(runs_of(stack, ns, "every-minute")) >= 2, 150, "two fire times")
    first, second = runs_of(stack, ns, "every-minute")[:2]
    for run in (first, second):
        at = fire_time(run)
        assert at == minute(at), "fire times are whole minutes"
        created = parse(run["metadata"]["creationTimestamp"])
        assert timedelta(0) <= created - at <= TOLERANCE, (iso(at), iso(created))
        assert run["metadata"]["labels"]["kubetask.dev/schedule"] == "every-minute"
        assert run["metadata"]["annotations"]["kubetask.dev/scheduled-time"] == iso(at)
        payload = run["spec"]["payload"]
        assert payload["greeting"] == "hi"
        assert payload["timezone"] == zone
        assert payload["scheduleId"] == f"{ns}/every-minute"
        assert payload["upcoming"] == [iso(at + timedelta(minutes=k)) for k in range(1, 6)]
    assert fire_time(second) - fire_time(first) == timedelta(minutes=1)
    assert "lastTimestamp" not in first["spec"]["payload"]
    assert second["spec"]["payload"]["lastTimestamp"] == first["spec"]["payload"]["timestamp"]
    # They are ordinary runs: each ran and returned its payload.
    done = stack.wait_run(ns, first["metadata"]["name"], timeout=120)["status"]
    assert done["phase"] == "Succeeded" and done["output"] == first["spec"]["payload"]
    # The status says when it fires next and what it did last (kubectl shows it).
    wait_for(
        lambda: (
            (schedule(stack, ns, "every-minute").get("status") or {}).get("lastRun")
            in {r["metadata"]["name"] for r in runs_of(stack, ns, "every-minute")[1:]}
        ),
        30,
        "status.lastRun",
    )
    status = schedule(stack, ns, "every-minute")["status"]
    assert parse(status["nextScheduleTime"]) > parse(status["lastScheduleTime"])
    assert parse(status["nextScheduleTime"]) - parse(status["lastScheduleTime"]) == timedelta(minutes=1)
    table = stack.kubectl(ns, "get", "sched").stdout
    assert table.split("\n")[0].split() == [
        "NAME", "TASK", "CRON", "TIMEZONE", "NEXT", "RUN", "LAST", "RUN", "ACTIVE", "AGE"
    ], table  # fmt: skip
    assert "every-minute" in table and zone in table
    # And the API lists it with the same times.
    listed = operator.get(f"/api/v1/namespaces/{ns}/schedules")["items"]
    assert [s["name"] for s in listed] == ["every-minute"]
    assert listed[0]["timezone"] == zone and listed[0]["nextFireTime"] is not None


def test_skip_starts_nothing_while_the_previous_run_outlasts_the_period(
    stack: Stack, ns: str, operator: Operator
) -> None:
    stack.apply_task(ns, "sleeper", SLEEPER)
    apply_schedule(
        stack, ns, "slow", task="sleeper", cron="* * * * *", overlapPolicy="Skip", payload={"s": 70}
    )
    wait_for(lambda: len(runs_of(stack, ns, "slow")) >= 1, 90, "the first fire time")
    first = fire_time(runs_of(stack, ns, "slow")[0])
    # The next fire time comes while the first run sleeps: skipped.
    sleep_until(first + timedelta(minutes=1, seconds=8))
    assert [fire_time(r) for r in runs_of(stack, ns, "slow")] == [first]
    status = schedule(stack, ns, "slow")["status"]
    assert status["skipped"] == 1 and status["active"] == 1
    assert parse(status["lastScheduleTime"]) == first + timedelta(minutes=1)
    # The one after it, with the first run over, runs.
    stack.wait_run(ns, runs_of(stack, ns, "slow")[0]["metadata"]["name"], timeout=90)
    sleep_until(first + timedelta(minutes=2, seconds=8))
    assert [fire_time(r) for r in runs_of(stack, ns, "slow")] == [first, first + timedelta(minutes=2)]


def test_catch_up_after_the_operator_was_stopped_across_two_fire_times(
    stack: Stack, ns: str, start_operator: Callable[..., Operator], db: Any
) -> None:
    """One hourly Schedule per catchUp value. While no operator runs, their stored next
    fire times are put two hours back in PostgreSQL: the fire times of the last two full
    hours were missed (far more than the grace late), as if the operator had been down
    since. Then it starts."""
    now = datetime.now(UTC)
    if now.minute == 0 or now.minute >= 58:  # keep the on-time fire times out of the test
        sleep_until(
            now.replace(minute=0, second=0, microsecond=0)
            + timedelta(hours=int(now.minute >= 58), minutes=1, seconds=15)
        )
    stack.apply_task(ns, "echo", ECHO)
    op = start_operator()
    for catch_up in ("None", "Latest", "All"):
        extra = {"startingDeadlineSeconds": 3 * 3600} if catch_up == "All" else {}
        apply_schedule(
            stack, ns, f"catch-{catch_up.lower()}", task="echo", cron="0 * * * *", catchUp=catch_up, **extra
        )

    def planned(name: str) -> bool:
        return "nextScheduleTime" in (schedule(stack, ns, name).get("status") or {})

    for name in ("catch-none", "catch-latest", "catch-all"):
        wait_for(functools.partial(planned, name), 30, name)
    op.stop()
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    with db.begin() as conn:
        changed = conn.execute(
            text("UPDATE schedules SET next_fire_at = :at WHERE namespace = :ns"),
            {"at": hour - timedelta(hours=1), "ns": ns},
        ).rowcount
    assert changed == 3
    start_operator("back")
    missed = [hour - timedelta(hours=1), hour]
    wait_for(
        lambda: len(runs_of(stack, ns, "catch-all")) >= 2 and bool(runs_of(stack, ns, "catch-latest")),
        30,
        "runs",
    )
    time.sleep(3)  # anything more would have come by now
    assert [fire_time(r) for r in runs_of(stack, ns, "catch-none")] == []
    assert [fire_time(r) for r in runs_of(stack, ns, "catch-latest")] == [hour]
    assert [fire_time(r) for r in runs_of(stack, ns, "catch-all")] == missed
    status = {n: schedule(stack, ns, n)["status"] for n in ("catch-none", "catch-latest", "catch-all")}
    assert [status[n]["missed"] for n in ("catch-none", "catch-latest", "catch-all")] == [2, 1, 0]
    assert {parse(s["nextScheduleTime"]) for s in status.values()} == {hour + timedelta(hours=1)}
    # Each one's payload knows the one before it.
    (latest,) = runs_of(stack, ns, "catch-latest")
    assert "lastTimestamp" not in latest["spec"]["payload"]
    older, newer = runs_of(stack, ns, "catch-all")
    assert newer["spec"]["payload"]["lastTimestamp"] == older["spec"]["payload"]["timestamp"]


def test_a_leader_killed_around_fire_times_never_fires_one_twice(
    stack: Stack, ns: str, start_operator: Callable[..., Operator], db: Any
) -> None:
    stack.apply_task(ns, "echo", ECHO)
    ops = [start_operator("a"), start_operator("b", wait_ready=False)]
    apply_schedule(stack, ns, "tick", task="echo", cron="* * * * *")
    wait_for(
        lambda: "nextScheduleTime" in (schedule(stack, ns, "tick").get("status") or {}), 30, "the schedule"
    )
    # SIGKILL the leader just before a fire time, then just after one (mid-fire), each time
    # starting a replacement so that two operators run again.
    for n, offset in enumerate((-0.7, 0.15)):
        boundary = minute(datetime.now(UTC)) + timedelta(minutes=1)
        if (boundary - datetime.now(UTC)).total_seconds() < 3:
            boundary += timedelta(minutes=1)
        sleep_until(boundary + timedelta(seconds=offset))
        leader = next(op for op in ops if op.leading())
        leader.kill()
        follower = next(op for op in ops if op is not leader)
        wait_for(follower.leading, 30, "the follower to take over")
        ops = [follower, start_operator(f"again-{n}", wait_ready=False)]
    last = minute(datetime.now(UTC)) + timedelta(minutes=1)
    sleep_until(last + timedelta(seconds=6))
    fires = [fire_time(r) for r in runs_of(stack, ns, "tick")]
    twice = {at: n for at, n in Counter(fires).items() if n > 1}
    assert not twice, f"fire times with more than one Run: {twice}"
    # None missed either: one Run for each minute from the first to the last.
    assert fires == [fires[0] + timedelta(minutes=k) for k in range(len(fires))], [iso(f) for f in fires]
    assert fires[-1] == last
    with db.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT count(*), count(*) FILTER (WHERE state = 'created') FROM schedule_fires WHERE schedule = :k"
            ),
            {"k": f"{ns}/tick"},
        ).one()
    assert tuple(rows) == (len(fires), len(fires))
