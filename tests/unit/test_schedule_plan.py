"""What a Schedule does at its fire times (kubetask.engine.schedules): on time or caught
up, the overlap policies, the payload and the Run names."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from kubetask.engine.cron import Cron
from kubetask.engine.schedules import CatchUp, Decision, decide, due, payload, run_name
from kubetask.spec import ScheduleSpec

MINUTELY = Cron.parse("* * * * *")
HOURLY = Cron.parse("0 * * * *")


def at(hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 3, 1, hour, minute, second, tzinfo=UTC)


def test_a_fire_time_reached_within_the_grace_runs_whatever_catch_up_says() -> None:
    catch_ups: tuple[CatchUp, ...] = ("None", "Latest", "All")
    for catch_up in catch_ups:
        found = due(
            HOURLY,
            next_fire=at(10),
            now=at(10, 0, 40),
            catch_up=catch_up,
            deadline_seconds=3600,
            grace_seconds=60,
        )
        assert (found.fires, found.missed, found.next) == ([at(10)], 0, at(11))


def test_nothing_is_due_before_the_next_fire_time() -> None:
    found = due(
        HOURLY, next_fire=at(11), now=at(10, 30), catch_up="All", deadline_seconds=60, grace_seconds=60
    )
    assert (found.fires, found.missed, found.next) == ([], 0, at(11))


@pytest.mark.parametrize(
    ("catch_up", "deadline", "fires", "missed"),
    [
        ("None", None, [], 3),
        ("Latest", None, [at(10)], 2),
        ("All", 4 * 3600, [at(8), at(9), at(10)], 0),
        ("All", 2 * 3600 + 600, [at(9), at(10)], 1),  # 08:00 is past the deadline
        ("Latest", 600, [], 3),  # the latest missed is past the deadline too
    ],
)
def test_fire_times_missed_during_an_outage_follow_catch_up(
    catch_up: CatchUp, deadline: int | None, fires: list[datetime], missed: int
) -> None:
    found = due(
        HOURLY,
        next_fire=at(8),
        now=at(10, 30),
        catch_up=catch_up,
        deadline_seconds=deadline,
        grace_seconds=60,
    )
    assert (found.fires, found.missed, found.next) == (fires, missed, at(11))


def test_a_starting_deadline_shorter_than_the_grace_wins() -> None:
    found = due(
        HOURLY, next_fire=at(10), now=at(10, 0, 40), catch_up="None", deadline_seconds=30, grace_seconds=60
    )
    assert found.fires == [] and found.missed == 1


def test_catch_up_all_runs_the_latest_hundred_of_a_long_outage() -> None:
    found = due(
        MINUTELY,
        next_fire=at(0),
        now=at(23, 0, 30),
        catch_up="All",
        deadline_seconds=86_400,
        grace_seconds=10,
    )
    assert len(found.fires) == 100 and found.fires[-1] == at(23)
    assert found.missed == 1000 - 100  # counted up to 1000 per outage


def test_allow_runs_every_fire() -> None:
    fires = [at(8), at(9)]
    assert decide(fires, policy="Allow", active=3, buffered=False).decisions == [
        Decision(at(8), "pending"),
        Decision(at(9), "pending"),
    ]


def test_skip_runs_only_when_nothing_of_the_schedule_runs() -> None:
    assert decide([at(9)], policy="Skip", active=1, buffered=False).decisions == [Decision(at(9), "skipped")]
    assert decide([at(8), at(9)], policy="Skip", active=0, buffered=False).decisions == [
        Decision(at(8), "pending"),
        Decision(at(9), "skipped"),  # the run of 08:00 (a catch-up a moment ago) is unfinished
    ]


def test_buffer_one_keeps_one_fire_waiting_and_skips_the_rest() -> None:
    assert decide([at(8), at(9)], policy="BufferOne", active=1, buffered=False).decisions == [
        Decision(at(8), "buffered"),
        Decision(at(9), "skipped"),
    ]
    assert decide([at(9)], policy="BufferOne", active=1, buffered=True).decisions == [
        Decision(at(9), "skipped")
    ]
    assert decide([at(9)], policy="BufferOne", active=0, buffered=False).decisions == [
        Decision(at(9), "pending")
    ]


def test_cancel_previous_replaces_what_runs_and_what_was_to_run() -> None:
    decided = decide([at(9)], policy="CancelPrevious", active=1, buffered=False)
    assert decided.decisions == [Decision(at(9), "pending")] and decided.cancel_previous
    decided = decide([at(8), at(9), at(10)], policy="CancelPrevious", active=0, buffered=False)
    assert decided.decisions == [
        Decision(at(8), "skipped"),
        Decision(at(9), "skipped"),
        Decision(at(10), "pending"),
    ]
    assert not decide([at(9)], policy="CancelPrevious", active=0, buffered=False).cancel_previous


def test_the_payload_is_trigger_devs_and_the_spec_cannot_fake_it() -> None:
    out = payload(
        {"region": "eu", "timestamp": "mine"},
        fire_at=at(9),
        last=at(8),
        timezone="Europe/Berlin",
        schedule_id="ns/nightly",
        upcoming=[at(10), at(11)],
    )
    assert out == {
        "region": "eu",
        "timestamp": "2026-03-01T09:00:00.000000Z",
        "lastTimestamp": "2026-03-01T08:00:00.000000Z",
        "timezone": "Europe/Berlin",
        "scheduleId": "ns/nightly",
        "upcoming": ["2026-03-01T10:00:00.000000Z", "2026-03-01T11:00:00.000000Z"],
    }
    first = payload(
        {"lastTimestamp": "x"}, fire_at=at(9), last=None, timezone="UTC", schedule_id="a/b", upcoming=[]
    )
    assert "lastTimestamp" not in first


def test_run_names_come_from_the_uid_and_the_fire_time() -> None:
    uid = "8EF67A2C-0000-4000-8000-000000000000"
    assert run_name("nightly", uid, at(9, 30)) == "nightly-8ef67-202603010930"
    assert run_name("nightly", uid, at(9, 30, 15)) == "nightly-8ef67-20260301093015"
    assert (
        run_name("nightly", uid, at(9, 30), full_uid=True)
        == "nightly-8ef67a2c000040008000000000000000-202603010930"
    )


def test_the_spec_defaults_and_rules() -> None:
    spec = ScheduleSpec.model_validate({"task": "t", "cron": "@hourly"})
    assert (spec.timezone, spec.overlap_policy, spec.catch_up, spec.paused) == (
        "UTC",
        "Allow",
        "Latest",
        False,
    )
    with pytest.raises(ValidationError, match="startingDeadlineSeconds"):
        ScheduleSpec.model_validate({"task": "t", "cron": "* * * * *", "catchUp": "All"})
    for bad in ("* * * * * *", "* * * *", "@reboot", "*/5 * * * * 2030"):
        with pytest.raises(ValidationError):
            ScheduleSpec.model_validate({"task": "t", "cron": bad})
    with pytest.raises(ValidationError):
        ScheduleSpec.model_validate({"task": "t", "cron": "* * * * *", "timezone": "../etc"})
