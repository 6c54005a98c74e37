"""Rate limits as a token bucket, kept by GCRA (the generic cell rate algorithm).

A bucket is one timestamp, its *theoretical arrival time* (TAT): with ``limit`` starts per
``period``, each start moves it ``T = period / limit`` ahead of ``max(TAT, now)``; a start
is allowed while ``TAT - now <= period - T``. So a quiet bucket allows a burst of
``limit`` starts at once, then one start every ``T``: in any window of ``w`` seconds at most
``limit + w / T`` starts. The TAT lives in a PostgreSQL row that admission locks (the
queue's, or the key's), so the limit is exact across replicas and restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Bucket:
    limit: int
    period_seconds: float

    @property
    def interval(self) -> timedelta:
        """``T``: how far each start moves the TAT."""
        return timedelta(seconds=self.period_seconds / self.limit)

    @property
    def tolerance(self) -> timedelta:
        """How far ahead of now the TAT may be for a start to be allowed (the burst)."""
        return timedelta(seconds=self.period_seconds) - self.interval

    def allowed_at(self, tat: datetime | None, now: datetime) -> datetime:
        """The earliest moment a start is allowed (``<= now``: now)."""
        if tat is None:
            return now
        return max(now, tat - self.tolerance)

    def take(self, tat: datetime | None, now: datetime) -> datetime | None:
        """The new TAT if a start is allowed now, else None."""
        if self.allowed_at(tat, now) > now:
            return None
        return max(tat or now, now) + self.interval
