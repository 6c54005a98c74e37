"""Durable timers: rows of ``timers`` with a due time, fired by one loop (the leader's).

A reconcile that needs to look at its run again later (back-off, the unknown-Task
grace period, a pod that has not started, a TTL) sets the run's timer in the same
transaction as whatever it decided; a reconcile with nothing to wait for clears it.
Firing does not delete the row: it pushes ``due_at`` forward by ``refire`` and adds the
key to the work queue, so a timer whose reconcile is lost (the process dies) fires
again, and a reconcile that ran sets or clears it for real.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.store import tables as t

log = logging.getLogger("kubetask.timers")

RUN = "run"


def utcnow() -> datetime:
    """The controller's one clock (timezone-aware UTC, as PostgreSQL returns times)."""
    return datetime.now(UTC)


async def set_timer(s: AsyncSession, *, kind: str, key: str, due_at: datetime) -> None:
    """Set (or move) the timer of ``key`` inside the caller's transaction."""
    stmt = pg_insert(t.Timer).values(kind=kind, key=key, due_at=due_at)
    await s.execute(
        stmt.on_conflict_do_update(index_elements=[t.Timer.kind, t.Timer.key], set_={"due_at": due_at})
    )


async def clear_timer(s: AsyncSession, *, kind: str, key: str) -> None:
    await s.execute(delete(t.Timer).where(t.Timer.kind == kind, t.Timer.key == key))


class TimerLoop:
    """Sleeps until the earliest due timer (or a wake-up), then hands due keys to
    ``fire``. Only the leader runs it; it holds nothing that a restart would need."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        fire: Callable[[str, str], None],
        refire: timedelta = timedelta(seconds=30),
        max_sleep: float = 30.0,
        batch: int = 500,
    ) -> None:
        self._sessions = sessions
        self._fire = fire
        self._refire = refire
        self._max_sleep = max_sleep
        self._batch = batch
        self._wake = asyncio.Event()
        self._next: datetime | None = None

    def wake(self, due_at: datetime | None = None) -> None:
        """A timer was set: look again now if it is earlier than what the loop sleeps for."""
        if due_at is None or self._next is None or due_at < self._next:
            self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                sleep = await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("timer loop: %r; retrying in 2s", e)
                sleep = 2.0
            self._wake.clear()
            try:
                async with asyncio.timeout(sleep):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _tick(self) -> float:
        now = utcnow()
        async with self._sessions.begin() as s:
            due = (
                await s.execute(
                    update(t.Timer)
                    .where(
                        tuple_(t.Timer.kind, t.Timer.key).in_(
                            select(t.Timer.kind, t.Timer.key)
                            .where(t.Timer.due_at <= now)
                            .order_by(t.Timer.due_at)
                            .limit(self._batch)
                        ),
                        t.Timer.due_at <= now,
                    )
                    .values(due_at=now + self._refire)
                    .returning(t.Timer.kind, t.Timer.key)
                )
            ).all()
            nxt = (await s.execute(select(func.min(t.Timer.due_at)))).scalar_one_or_none()
        for kind, key in due:
            self._fire(kind, key)
        if len(due) >= self._batch:
            return 0.0
        self._next = nxt
        if nxt is None:
            return self._max_sleep
        return max(0.0, min(self._max_sleep, (nxt - utcnow()).total_seconds()))
