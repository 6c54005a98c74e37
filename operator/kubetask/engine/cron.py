"""When a Schedule fires: cron expressions in an IANA time zone. Pure functions, no I/O.

An expression names *wall-clock* times: croniter matches its five fields (or a macro
such as ``@hourly``) against naive local times, and zoneinfo turns each matching
wall-clock time into instants. Daylight saving time makes that mapping uneven twice a
year, and the rule is (docs/schedules.md, "Daylight saving time"):

- a wall-clock time that exists once fires at that instant;
- a wall-clock time that does not exist (the clocks jump over it: 02:30 on the day summer
  time starts in Europe/Berlin) fires once, at the instant it would have been with the
  offset from before the jump, that is, shifted forward by the length of the jump
  (02:30 CET, which is 03:30 CEST), as RFC 5545 and java.time resolve such times; when
  that instant is a fire time of its own as well, it fires once;
- a wall-clock time that occurs twice (the clocks go back over it: 02:30 on the day
  summer time ends in Europe/Berlin) fires at its first occurrence only, unless the
  expression fires every hour (its hour field is ``*``): then at both, so that
  ``*/5 * * * *`` keeps its five-minute rhythm through the repeated hour.

So a daily ``30 2 * * *`` runs exactly once on both days, and an hourly or more frequent
expression follows elapsed time.

Instants are timezone-aware UTC :class:`~datetime.datetime` values throughout.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice, takewhile
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterBadDateError, CroniterError

#: The macros a Schedule may use instead of five fields.
MACROS = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
#: Files in a zoneinfo directory that are not IANA zone names.
_NOT_ZONES = frozenset({"localtime", "posixrules"})
_DAY = timedelta(days=1)
_TICK = timedelta(microseconds=1)


class CronError(ValueError):
    """An expression or time zone that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class Cron:
    """A parsed expression in a zone: :meth:`parse` it, then ask for fire times."""

    expression: str
    timezone: str
    zone: ZoneInfo = field(repr=False, compare=False)
    #: The hour field covers every hour: a repeated wall-clock hour fires twice.
    every_hour: bool = field(repr=False, compare=False)

    @classmethod
    def parse(cls, expression: str, timezone: str = "UTC") -> Cron:
        expr = " ".join(expression.split())
        if expr.startswith("@"):
            if expr.lower() not in MACROS:
                raise CronError(f"unknown macro {expr!r}; use one of {', '.join(sorted(MACROS))}")
            expr = expr.lower()
        elif len(expr.split(" ")) != 5:
            raise CronError(
                f"{expression!r} has {len(expr.split())} fields; a cron expression has five "
                "(minute hour day-of-month month day-of-week), e.g. '30 2 * * *', or is a macro "
                "such as @hourly"
            )
        try:
            hours = croniter(expr, datetime(2000, 1, 1)).expanded[1]
        except (CroniterError, ValueError, KeyError) as e:
            raise CronError(f"{expression!r} is not a valid cron expression: {e}") from None
        if timezone in _NOT_ZONES:
            raise CronError(f"{timezone!r} is not an IANA time zone name; use one such as Europe/Berlin")
        try:
            zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise CronError(
                f"unknown time zone {timezone!r}; use an IANA name such as UTC, Europe/Berlin or "
                "America/New_York"
            ) from None
        every_hour = hours == ["*"] or set(range(24)) <= set(hours)
        cron = cls(expr, timezone, zone, every_hour)
        if cron.next(after=datetime(2000, 1, 1, tzinfo=UTC)) is None:
            raise CronError(f"{expression!r} never fires (no date matches it)")
        return cron

    # ---- wall-clock times and instants ------------------------------------------------------

    def _instants(self, wall: datetime) -> tuple[datetime, ...]:
        """The instants a matching wall-clock time fires at (the rule above)."""
        first = wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        # fold=0 of a time that does not exist uses the offset from before the jump: the
        # shifted instant. Of a time that occurs twice it is the first occurrence.
        if second > first and self.every_hour:
            return (first, second)
        return (first,)

    def _offsets_near_wall(self, wall: datetime) -> list[timedelta]:
        out = []
        for day in (-_DAY, timedelta(0), _DAY):
            for fold in (0, 1):
                offset = (wall + day).replace(tzinfo=self.zone, fold=fold).utcoffset()
                assert offset is not None
                out.append(offset)
        return out

    def _offsets_near(self, instant: datetime) -> list[timedelta]:
        out = []
        for day in (-_DAY, timedelta(0), _DAY):
            offset = (instant + day).astimezone(self.zone).utcoffset()
            assert offset is not None
            out.append(offset)
        return out

    # ---- fire times -------------------------------------------------------------------------

    def fires(self, *, after: datetime) -> Iterator[datetime]:
        """Every fire time strictly after ``after``, in order, each once.

        Matching wall-clock times come in order, but their instants need not (a skipped
        time is shifted past the next ones, a repeated hour comes back), so instants wait
        in a heap until no later wall-clock time can fire before them."""
        after = after.astimezone(UTC)
        # A wall-clock time fires at itself minus its offset; none before this one can
        # fire after `after`.
        start = (after + min(self._offsets_near(after))).replace(tzinfo=None)
        walls = croniter(self.expression, start)
        pending: list[datetime] = []
        last = after
        while True:
            try:
                wall = walls.get_next(datetime)
            except CroniterBadDateError:  # no more matches (croniter looks decades ahead)
                break
            for instant in self._instants(wall):
                if instant > after:
                    heapq.heappush(pending, instant)
            # Later wall-clock times fire after wall - (the largest offset around it).
            bound = (wall - max(self._offsets_near_wall(wall))).replace(tzinfo=UTC)
            while pending and pending[0] <= bound:
                instant = heapq.heappop(pending)
                if instant > last:
                    last = instant
                    yield instant
        while pending:
            instant = heapq.heappop(pending)
            if instant > last:
                last = instant
                yield instant

    def next(self, *, after: datetime) -> datetime | None:
        """The first fire time after ``after`` (None: it never fires again)."""
        return next(self.fires(after=after), None)

    def upcoming(self, *, after: datetime, count: int = 5) -> list[datetime]:
        """The next ``count`` fire times after ``after``."""
        return list(islice(self.fires(after=after), count))

    def between(self, start: datetime, end: datetime, *, last: int) -> list[datetime]:
        """Fire times in [start, end], in order: the latest ``last`` of them.

        Looks back from ``end`` in growing windows, so the cost follows ``last`` and not
        the length of the period (a year of an every-minute expression is not walked)."""
        if last <= 0 or end < start:
            return []
        span = timedelta(hours=1)
        while True:
            lo = max(start, end - span)
            found = list(takewhile(lambda f: f <= end, self.fires(after=lo - _TICK)))
            if len(found) >= last or lo == start:
                return found[-last:]
            span *= 8

    def latest(self, start: datetime, end: datetime) -> datetime | None:
        """The last fire time in [start, end], if any."""
        found = self.between(start, end, last=1)
        return found[0] if found else None
