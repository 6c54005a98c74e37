"""What a Schedule does at its fire times: plain functions, no I/O (the reconcile in
:mod:`kubetask.control.schedules` reads and writes; docs/schedules.md explains the rules).

- :func:`due` says which fire times up to now to act on: those reached on time (at most
  the grace late: a restart, a fail-over), and of those missed while no operator ran,
  what ``catchUp`` asks for, within ``startingDeadlineSeconds``.
- :func:`decide` applies ``overlapPolicy`` to them, given the schedule's unfinished runs.
- :func:`payload` and :func:`run_name` make the Run of a fire: the payload Trigger.dev
  passes to scheduled tasks, and a name derived from the schedule's uid and the fire
  time (the deduplication key a second create runs into).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from kubetask.engine.cron import Cron
from kubetask.protocol import iso

CatchUp = Literal["None", "Latest", "All"]
Overlap = Literal["Allow", "Skip", "CancelPrevious", "BufferOne"]
#: Most fire times one reconcile runs (catchUp All after a long outage runs the latest).
MAX_FIRES = 100
#: How many fire times a run's payload lists in ``upcoming`` (as Trigger.dev does).
UPCOMING = 5
#: Missed fire times are counted up to this many per outage (for status.missed).
MAX_COUNTED = 1000
_TICK = timedelta(microseconds=1)
#: The keys a schedule adds to its runs' payload.
PAYLOAD_KEYS = frozenset({"timestamp", "lastTimestamp", "timezone", "scheduleId", "upcoming"})


@dataclass(frozen=True)
class Due:
    """The fire times to act on now, in order; how many were missed and not caught up;
    and the next fire time after now (None: the expression never fires again)."""

    fires: list[datetime]
    missed: int
    next: datetime | None


def due(
    cron: Cron,
    *,
    next_fire: datetime,
    now: datetime,
    catch_up: CatchUp,
    deadline_seconds: int | None,
    grace_seconds: float,
) -> Due:
    """The fire times from ``next_fire`` (the stored next fire time) up to ``now``.

    A fire time at most ``grace_seconds`` late (``startingDeadlineSeconds`` when smaller)
    is on time and runs. Earlier ones were missed: ``catchUp`` None runs none of them,
    Latest the most recent, All each one (the latest :data:`MAX_FIRES`); never one more
    than ``startingDeadlineSeconds`` late."""
    if next_fire > now:
        return Due([], 0, next_fire)
    grace = timedelta(seconds=grace_seconds)
    if deadline_seconds is not None:
        grace = min(grace, timedelta(seconds=deadline_seconds))
    late = now - grace  # fire times before this were missed
    on_time = cron.between(max(next_fire, late), now, last=MAX_FIRES)
    caught: list[datetime] = []
    missed = 0
    if next_fire < late:
        earliest = next_fire
        if deadline_seconds is not None:
            earliest = max(earliest, now - timedelta(seconds=deadline_seconds))
        if catch_up == "Latest":
            latest = cron.latest(earliest, late - _TICK)
            caught = [latest] if latest is not None else []
        elif catch_up == "All":
            caught = cron.between(earliest, late - _TICK, last=MAX_FIRES)
        missed = max(0, len(cron.between(next_fire, late - _TICK, last=MAX_COUNTED)) - len(caught))
    fires = (caught + on_time)[-MAX_FIRES:]
    return Due(fires, missed, cron.next(after=now))


State = Literal["pending", "buffered", "skipped"]


@dataclass(frozen=True)
class Decision:
    """What comes of one fire time: ``pending`` (a Run is to be created), ``buffered``
    (BufferOne: created when the schedule's runs have ended) or ``skipped``."""

    at: datetime
    state: State


@dataclass(frozen=True)
class Decided:
    decisions: list[Decision]
    #: CancelPrevious: the unfinished runs from before are canceled (a new run replaces them).
    cancel_previous: bool = False


def decide(fires: list[datetime], *, policy: Overlap, active: int, buffered: bool) -> Decided:
    """Apply the overlap policy to ``fires`` in order, given ``active`` unfinished runs
    of the schedule and whether a fire is ``buffered`` already. Each fire is judged as
    if those before it had run (in a catch-up, a run created a moment earlier counts)."""
    out: list[Decision] = []
    cancel = False
    for at in fires:
        if policy == "Allow" or active == 0:
            out.append(Decision(at, "pending"))
            active += 1
        elif policy == "Skip":
            out.append(Decision(at, "skipped"))
        elif policy == "BufferOne":
            out.append(Decision(at, "skipped" if buffered else "buffered"))
            buffered = True
        else:  # CancelPrevious: this fire replaces what runs (and what was to run)
            out = [Decision(d.at, "skipped") if d.state == "pending" else d for d in out]
            out.append(Decision(at, "pending"))
            cancel = True
    return Decided(out, cancel)


def payload(
    base: dict[str, Any],
    *,
    fire_at: datetime,
    last: datetime | None,
    timezone: str,
    schedule_id: str,
    upcoming: list[datetime],
) -> dict[str, Any]:
    """The payload of a scheduled run: the Schedule's ``spec.payload`` with what
    Trigger.dev passes to a scheduled task (these keys replace the same keys of
    ``spec.payload``): ``timestamp`` (the fire time), ``lastTimestamp`` (the fire time of
    the schedule's previous run; absent for the first, as in Trigger.dev), ``timezone``,
    ``scheduleId`` (``namespace/name``) and ``upcoming`` (the next fire times). Times are
    ISO-8601 UTC."""
    out = {k: v for k, v in base.items() if k not in PAYLOAD_KEYS}
    out |= {
        "timestamp": iso(fire_at),
        "timezone": timezone,
        "scheduleId": schedule_id,
        "upcoming": [iso(u) for u in upcoming],
    }
    if last is not None:
        out["lastTimestamp"] = iso(last)
    return out


def uid_part(uid: str, *, full: bool = False) -> str:
    part = uid.replace("-", "").lower()
    return part if full else part[:5]


def run_name(schedule: str, uid: str, fire_at: datetime, *, full_uid: bool = False) -> str:
    """``<schedule>-<uid5>-<YYYYMMDDHHMM>`` (UTC): the same schedule and fire time always
    name the same Run, so a fire created twice (a retry, a second leader) is one Run.
    With ``full_uid`` the whole uid is used (five characters of it met another
    Schedule's Run of the same name: a Schedule deleted and created again)."""
    at = fire_at.astimezone(UTC)
    stamp = at.strftime("%Y%m%d%H%M") + (at.strftime("%S") if at.second else "")
    return f"{schedule}-{uid_part(uid, full=full_uid)}-{stamp}"
