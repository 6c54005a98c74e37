"""Fire times of cron expressions in time zones, across daylight saving time changes and
leap days (kubetask.engine.cron; docs/schedules.md states the rule).

The property-based tests check :meth:`Cron.fires` against a brute-force reference that
walks every minute of a window with zoneinfo and matches the wall-clock time against
croniter's parse of the fields: no shortcut of the implementation is shared with it."""

from __future__ import annotations

import calendar
from bisect import bisect_right
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import cache
from itertools import islice, pairwise, takewhile
from typing import cast
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetask.engine.cron import Cron, CronError

#: Zones with one-hour DST shifts in either hemisphere, a 30-minute shift (Lord Howe),
#: odd offsets without DST (Kolkata, Kathmandu), DST abolished (Sao Paulo since 2019),
#: and the date line moved (Apia skipped 30 December 2011).
ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Sydney",
    "Australia/Lord_Howe",
    "America/Sao_Paulo",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Pacific/Chatham",
    "Pacific/Apia",
]
WITHOUT_DST = ["UTC", "Asia/Kolkata", "Asia/Kathmandu", "Asia/Tokyo"]


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def local(zone: str, when: datetime) -> str:
    return when.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M%z")


# ---- the reference --------------------------------------------------------------------------


@cache
def transitions(zone_name: str) -> tuple[list[datetime], list[tuple[timedelta, timedelta]]]:
    """Every change of the zone's UTC offset from 1995 to 2045 (to the second), with the
    offsets before and after it."""
    zone = ZoneInfo(zone_name)

    def offset(at: datetime) -> timedelta:
        found = at.astimezone(zone).utcoffset()
        assert found is not None
        return found

    times: list[datetime] = []
    offsets: list[tuple[timedelta, timedelta]] = []
    at, end = utc(1995, 1, 1), utc(2045, 1, 1)
    step = timedelta(hours=6)
    while at < end:
        before, after = offset(at), offset(at + step)
        if before != after:
            lo, hi = at, at + step
            while hi - lo > timedelta(seconds=1):
                mid = lo + (hi - lo) / 2
                lo, hi = (mid, hi) if offset(mid) == before else (lo, mid)
            times.append(hi.replace(microsecond=0))
            offsets.append((before, after))
        at += step
    return times, offsets


def matcher(expression: str) -> Callable[[datetime], bool]:
    """Whether a wall-clock time matches, from croniter's parse of the fields (standard
    cron semantics: day-of-month and day-of-week are OR-ed when both are restricted)."""
    minute, hour, dom, month, dow = (
        None if f == ["*"] else set(cast("list[int]", f))
        for f in croniter(expression, datetime(2000, 1, 1)).expanded[:5]
    )

    def match(w: datetime) -> bool:
        if (minute and w.minute not in minute) or (hour and w.hour not in hour):
            return False
        if month and w.month not in month:
            return False
        day_ok = dom is None or w.day in dom
        weekday_ok = dow is None or w.isoweekday() % 7 in dow
        if dom is not None and dow is not None:
            return day_ok or weekday_ok
        return day_ok and weekday_ok

    return match


def reference(expression: str, zone_name: str, start: datetime, end: datetime) -> list[datetime]:
    """Fire instants in (start, end], minute by minute: an instant fires when its wall-clock
    time matches (the second reading of a repeated time only if the hour field is `*`), or
    when it is where a skipped wall-clock time lands (read with the offset from before
    the jump)."""
    zone = ZoneInfo(zone_name)
    match = matcher(expression)
    hours = croniter(expression, datetime(2000, 1, 1)).expanded[1]
    every_hour = hours == ["*"] or set(range(24)) <= set(hours)
    times, offsets = transitions(zone_name)
    out = []
    at = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while at <= end:
        wall = at.astimezone(zone)
        fires = match(wall.replace(tzinfo=None)) and (wall.fold == 0 or every_hour)
        if not fires:
            # The last jump forward before `at`: the skipped wall-clock times are
            # [t + before, t + after); one of them read with `before` lands on `at`.
            i = bisect_right(times, at) - 1
            if i >= 0 and offsets[i][1] > offsets[i][0]:
                t, (before, after) = times[i], offsets[i]
                skipped = (at + before).replace(tzinfo=None)
                gap = ((t + before).replace(tzinfo=None), (t + after).replace(tzinfo=None))
                fires = gap[0] <= skipped < gap[1] and match(skipped)
        if fires:
            out.append(at)
        at += timedelta(minutes=1)
    return out


def fires_until(cron: Cron, start: datetime, end: datetime) -> list[datetime]:
    return list(takewhile(lambda f: f <= end, cron.fires(after=start)))


# ---- generated expressions and windows ----------------------------------------------------


def _field(low: int, high: int, *, small_hours: bool = False) -> st.SearchStrategy[str]:
    value = st.integers(low, high)
    if small_hours:  # DST changes happen at night: aim there often
        value = st.one_of(st.integers(0, 4), value)
    return st.one_of(
        st.just("*"),
        value.map(str),
        st.builds(lambda a, b: f"{min(a, b)}-{max(a, b)}", value, value),
        st.integers(1, max(1, (high - low) // 2)).map(lambda k: f"*/{k}"),
        st.lists(value, min_size=2, max_size=4, unique=True).map(lambda v: ",".join(map(str, sorted(v)))),
        st.builds(lambda a, k: f"{a}-{high}/{k}", value, st.integers(1, 7)),
    )


expressions = st.builds(
    lambda m, h, dom, mon, dow: f"{m} {h} {dom} {mon} {dow}",
    _field(0, 59),
    _field(0, 23, small_hours=True),
    st.one_of(st.just("*"), st.just("*"), _field(1, 31)),
    st.one_of(st.just("*"), st.just("*"), _field(1, 12)),
    st.one_of(st.just("*"), st.just("*"), _field(0, 6)),
)


@st.composite
def windows(draw: st.DrawFn, zones: list[str]) -> tuple[str, datetime]:
    """A zone and the start of a window: mostly just before one of its DST changes."""
    zone = draw(st.sampled_from(zones))
    times, _ = transitions(zone)
    near_a_change: bool = draw(st.booleans()) if times else False
    if near_a_change:
        around = draw(st.sampled_from(times))
        return zone, around + timedelta(minutes=draw(st.integers(-30 * 60, 6 * 60)))
    seconds = draw(st.integers(0, int((utc(2040, 1, 1) - utc(1996, 1, 1)).total_seconds())))
    return zone, utc(1996, 1, 1) + timedelta(seconds=seconds)


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, str, datetime]:
    """An expression, a zone and the start of a window; often an expression aimed at the
    skipped or repeated wall-clock hour of a DST change inside the window."""
    zone, start = draw(windows(ZONES))
    times, offsets = transitions(zone)
    i = bisect_right(times, start + timedelta(hours=36)) - 1
    if i >= 0 and times[i] > start and draw(st.booleans()):
        # The skipped or repeated wall-clock hour: the change read with the smaller offset.
        hour = (times[i] + min(offsets[i])).hour
        minute = draw(st.one_of(_field(0, 59), st.just("*/7"), st.just("30")))
        hours = draw(
            st.sampled_from([str(hour), f"{hour},{(hour + 1) % 24}", "*", f"*/{draw(st.integers(1, 3))}"])
        )
        return f"{minute} {hours} * * *", zone, start
    return draw(expressions), zone, start


# ---- properties ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_fire_times_are_the_brute_force_reference(case: tuple[str, str, datetime]) -> None:
    expression, zone, start = case
    try:
        cron = Cron.parse(expression, zone)
    except CronError:  # e.g. 31 February: never fires
        return
    end = start + timedelta(hours=36)
    expected = reference(expression, zone, start, end)
    assert fires_until(cron, start, end) == expected, [local(zone, f) for f in expected]


@settings(max_examples=150, deadline=None)
@given(expression=expressions, window=windows(WITHOUT_DST))
def test_without_dst_the_fire_times_are_croniters(expression: str, window: tuple[str, datetime]) -> None:
    zone, start = window
    try:
        cron = Cron.parse(expression, zone)
    except CronError:
        return
    theirs = croniter(expression, start.astimezone(ZoneInfo(zone)))
    expected = [theirs.get_next(datetime).astimezone(UTC) for _ in range(20)]
    assert list(islice(cron.fires(after=start), 20)) == expected


@settings(max_examples=100, deadline=None)
@given(expression=expressions, window=windows(ZONES), count=st.integers(1, 30))
def test_between_is_the_tail_of_the_fire_times(
    expression: str, window: tuple[str, datetime], count: int
) -> None:
    zone, start = window
    try:
        cron = Cron.parse(expression, zone)
    except CronError:
        return
    end = start + timedelta(hours=30)
    every = fires_until(cron, start - timedelta(microseconds=1), end)
    assert cron.between(start, end, last=count) == every[-count:]
    assert cron.latest(start, end) == (every[-1] if every else None)


@settings(max_examples=100, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    year=st.integers(1996, 2390),
    hour=st.integers(0, 23),
)
def test_a_leap_day_schedule_fires_on_each_leap_day_only(zone: str, year: int, hour: int) -> None:
    cron = Cron.parse(f"0 {hour} 29 2 *", zone)
    fires = list(islice(cron.fires(after=utc(year, 1, 1)), 3))
    years = [y for y in range(year, year + 20) if calendar.isleap(y)][:3]
    # Read in the zone (an early-morning UTC fire can be the 28th or 1st in UTC).
    assert [(f.astimezone(ZoneInfo(zone)).year, f.astimezone(ZoneInfo(zone)).day) for f in fires] == [
        (y, 29) for y in years
    ]


# ---- the documented examples ----------------------------------------------------------------


def test_spring_forward_runs_a_skipped_time_once_shifted_by_the_gap() -> None:
    # Europe/Berlin, 31 March 2024: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
    cron = Cron.parse("30 2 * * *", "Europe/Berlin")
    fires = cron.upcoming(after=utc(2024, 3, 29, 12), count=3)
    assert [local("Europe/Berlin", f) for f in fires] == [
        "2024-03-30 02:30+0100",
        "2024-03-31 03:30+0200",  # once, one hour (the gap) after it would have been
        "2024-04-01 02:30+0200",
    ]
    # New York, 10 March 2024, the same rule.
    fires = Cron.parse("30 2 * * *", "America/New_York").upcoming(after=utc(2024, 3, 9, 12), count=2)
    assert [local("America/New_York", f) for f in fires] == ["2024-03-10 03:30-0400", "2024-03-11 02:30-0400"]


def test_fall_back_runs_a_repeated_time_once_at_its_first_occurrence() -> None:
    # Europe/Berlin, 27 October 2024: 03:00 CEST goes back to 02:00 CET; 02:30 happens twice.
    fires = Cron.parse("30 2 * * *", "Europe/Berlin").upcoming(after=utc(2024, 10, 25, 12), count=3)
    assert [local("Europe/Berlin", f) for f in fires] == [
        "2024-10-26 02:30+0200",
        "2024-10-27 02:30+0200",
        "2024-10-28 02:30+0100",
    ]
    fires = Cron.parse("30 1 * * *", "America/New_York").upcoming(after=utc(2024, 11, 2, 12), count=2)
    assert [local("America/New_York", f) for f in fires] == ["2024-11-03 01:30-0400", "2024-11-04 01:30-0500"]


@pytest.mark.parametrize("start", [utc(2024, 3, 30, 23), utc(2024, 10, 26, 22)])
def test_an_every_hour_expression_keeps_its_rhythm_in_elapsed_time(start: datetime) -> None:
    fires = Cron.parse("*/15 * * * *", "Europe/Berlin").upcoming(after=start, count=24)
    assert {b - a for a, b in pairwise(fires)} == {timedelta(minutes=15)}


def test_a_thirty_minute_dst_shift() -> None:
    # Lord Howe Island, 7 April 2024: 02:00 +11 goes back to 01:30 +10:30.
    fires = Cron.parse("45 1 * * *", "Australia/Lord_Howe").upcoming(after=utc(2024, 4, 5), count=3)
    assert [local("Australia/Lord_Howe", f) for f in fires] == [
        "2024-04-06 01:45+1100",
        "2024-04-07 01:45+1100",
        "2024-04-08 01:45+1030",
    ]


def test_a_skipped_day_fires_once() -> None:
    # Pacific/Apia skipped 30 December 2011 (from -10 to +14): 09:00 on the 30th lands on
    # the 31st's 09:00, which fires once.
    fires = Cron.parse("0 9 * * *", "Pacific/Apia").upcoming(after=utc(2011, 12, 28), count=4)
    assert [local("Pacific/Apia", f) for f in fires] == [
        "2011-12-28 09:00-1000",
        "2011-12-29 09:00-1000",
        "2011-12-31 09:00+1400",
        "2012-01-01 09:00+1400",
    ]


def test_macros_and_names() -> None:
    after = utc(2024, 1, 1, 0, 30)
    assert Cron.parse("@hourly").next(after=after) == utc(2024, 1, 1, 1)
    assert Cron.parse("@daily", "Asia/Kolkata").next(after=after) == utc(2024, 1, 1, 18, 30)
    assert Cron.parse("@weekly").next(after=after) == utc(2024, 1, 7)
    assert Cron.parse("@monthly").next(after=after) == utc(2024, 2, 1)
    assert Cron.parse("@yearly").next(after=after) == Cron.parse("@annually").next(after=after)
    assert Cron.parse("0 9 * JAN MON-FRI").next(after=after) == utc(2024, 1, 1, 9)
    assert Cron.parse("  0   9 *  * * ").expression == "0 9 * * *"


def test_latest_looks_back_without_walking_every_minute() -> None:
    cron = Cron.parse("* * * * *")
    assert cron.latest(utc(2000, 1, 1), utc(2024, 6, 1, 12, 0, 30)) == utc(2024, 6, 1, 12)
    yearly = Cron.parse("0 0 1 1 *")
    assert yearly.latest(utc(2000, 1, 1), utc(2024, 6, 1)) == utc(2024, 1, 1)
    assert yearly.latest(utc(2024, 2, 1), utc(2024, 6, 1)) is None
    assert cron.between(utc(2024, 1, 1), utc(2024, 1, 1, 0, 10), last=3) == [
        utc(2024, 1, 1, 0, 8),
        utc(2024, 1, 1, 0, 9),
        utc(2024, 1, 1, 0, 10),
    ]


@pytest.mark.parametrize(
    ("expression", "zone", "says"),
    [
        ("* * * * * *", "UTC", "has 6 fields"),
        ("* * * *", "UTC", "has 4 fields"),
        ("@reboot", "UTC", "unknown macro"),
        ("61 * * * *", "UTC", "not a valid cron expression"),
        ("0 0 30 2 *", "UTC", "never fires"),
        ("* * * * *", "Mars/Olympus_Mons", "unknown time zone"),
        ("* * * * *", "localtime", "not an IANA time zone"),
        ("* * * * *", "../etc/passwd", "unknown time zone"),
    ],
)
def test_what_cannot_be_used_says_why(expression: str, zone: str, says: str) -> None:
    with pytest.raises(CronError, match=says):
        Cron.parse(expression, zone)
