"""Durable timers in PostgreSQL, fired by one loop (the leader's).

A run's timer is the column ``runs.wake_at`` (indexed where set): a transition sets it
with the state it writes (back-off over, the unknown-Task grace period over, the TTL
of a finished run), a reconcile sets it to a pod's next start deadline. Timers of
other things (rate-limited queues, schedules) are rows of ``timers``, keyed
``<namespace>/<name>``. Either way nothing in memory is authoritative.

Firing does not clear a timer: it pushes the due time ``refire`` ahead and hands the key
to the work queue, so a timer whose reconcile is lost (the process dies) fires again,
and the reconcile that does run sets or clears it for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from sqlalchemy import delete, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.store import tables as t
from kubetask.store.journal import WAKE_CHANNEL

log = logging.getLogger("kubetask.timers")

#: The kind under which due runs are handed to ``fire``.
RUN = "run"
#: Timers of queues waiting for their rate limit (key: the queue's name).
QUEUE = "queue"


def utcnow() -> datetime:
    """The controller's one clock (timezone-aware UTC, as PostgreSQL returns times)."""
    return datetime.now(UTC)


async def set_run_timer(s: AsyncSession, run_id: str, due_at: datetime | None) -> None:
    """Set (None: clear) a run's timer inside the caller's transaction, when the run's
    row is not at hand (a transition just assigns ``row.wake_at``)."""
    await s.execute(update(t.Run).where(t.Run.id == run_id).values(wake_at=due_at))


async def set_timer(s: AsyncSession, *, kind: str, key: str, due_at: datetime) -> None:
    """Set (or move) the timer of something that is not a run."""
    stmt = pg_insert(t.Timer).values(kind=kind, key=key, due_at=due_at)
    await s.execute(
        stmt.on_conflict_do_update(index_elements=[t.Timer.kind, t.Timer.key], set_={"due_at": due_at})
    )


async def clear_timer(s: AsyncSession, *, kind: str, key: str) -> None:
    await s.execute(delete(t.Timer).where(t.Timer.kind == kind, t.Timer.key == key))


class TimerLoop:
    """Sleeps until the earliest due timer (or a wake-up), then hands due keys to
    ``fire(kind, key)``. Only the leader runs it; it holds nothing a restart needs."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        fire: Callable[[str, str], None],
        refire: timedelta = timedelta(seconds=30),
        max_sleep: float = 30.0,
        batch: int = 500,
        namespaces: list[str] | None = None,
    ) -> None:
        self._sessions = sessions
        #: Only runs and timers of these namespaces are fired (None or empty: all). One
        #: database may serve several operators: firing another's would push it 30 s ahead.
        self._namespaces = namespaces or None
        self._fire = fire
        self._refire = refire
        self._max_sleep = max_sleep
        self._batch = batch
        self._wake = asyncio.Event()
        self._next: datetime | None = None
        self._pending: datetime | None = None
        #: Timers fired (read by tests and /metrics).
        self.fired = 0

    def wake(self, due_at: datetime | None = None) -> None:
        """A timer was set for ``due_at`` (None: something may be due now). Costs no
        query: the loop only moves its next tick earlier when the time is earlier."""
        due = due_at or utcnow()
        # Remembered apart too: a wake-up during a tick must survive the tick's answer.
        self._pending = due if self._pending is None else min(self._pending, due)
        if self._next is None or due < self._next:
            self._next = due
            self._wake.set()

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen(), name="timer-listen")
        try:
            await self._loop()
        finally:
            listener.cancel()
            with contextlib.suppress(BaseException):
                await listener

    async def _listen(self) -> None:
        """``LISTEN kubetask_wake``: another process (an API replica that stored an event,
        completed a token, ...) made a run's timer due now. Each notification is a wake-up
        (coalesced); a lost one costs at most ``max_sleep``."""
        bind = self._sessions.kw["bind"]
        url = bind.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {WAKE_CHANNEL}")
                    self.wake()  # what was notified while nobody listened
                    async for _ in conn.notifies():
                        self.wake()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.info("timer loop: LISTEN %s failed (%r); polling until it is back", WAKE_CHANNEL, e)
                await asyncio.sleep(2)

    async def _loop(self) -> None:
        while True:
            last = utcnow()
            self._pending = None
            try:
                nxt = await self._tick()
                self._next = (
                    nxt
                    if self._pending is None or (nxt is not None and nxt < self._pending)
                    else self._pending
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("timer loop: %r; retrying in 2s", e)
                self._next = utcnow() + timedelta(seconds=2)
            # Sleep until the next due time, at most max_sleep after this tick; a wake-up
            # for an earlier time shortens the sleep without another query.
            while True:
                self._wake.clear()
                until = last + timedelta(seconds=self._max_sleep)
                if self._next is not None and self._next < until:
                    until = self._next
                delay = (until - utcnow()).total_seconds()
                if delay <= 0:
                    break
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    break

    def _mine(self) -> list[Any]:
        return [t.Run.namespace.in_(self._namespaces)] if self._namespaces else []

    def _mine_timers(self) -> list[Any]:
        """Timer keys start with their namespace (``<namespace>/<name>``)."""
        if not self._namespaces:
            return []
        return [func.split_part(t.Timer.key, "/", 1).in_(self._namespaces)]

    async def _tick(self) -> datetime | None:
        """Fire what is due; return the next due time (None: nothing is set)."""
        now = utcnow()
        later = now + self._refire
        async with self._sessions.begin() as s:
            # Rows a transition holds are skipped, not waited for: they fire next time.
            runs = (
                (
                    await s.execute(
                        update(t.Run)
                        .where(
                            t.Run.id.in_(
                                select(t.Run.id)
                                .where(t.Run.wake_at <= now, *self._mine())
                                .order_by(t.Run.wake_at)
                                .limit(self._batch)
                                .with_for_update(skip_locked=True)
                                .scalar_subquery()
                            )
                        )
                        .values(wake_at=later)
                        .returning(t.Run.id)
                        .execution_options(synchronize_session=False)
                    )
                )
                .scalars()
                .all()
            )
            others = (
                await s.execute(
                    update(t.Timer)
                    .where(
                        tuple_(t.Timer.kind, t.Timer.key).in_(
                            select(t.Timer.kind, t.Timer.key)
                            .where(t.Timer.due_at <= now, *self._mine_timers())
                            .order_by(t.Timer.due_at)
                            .limit(self._batch)
                            .with_for_update(skip_locked=True)
                        )
                    )
                    .values(due_at=later)
                    .returning(t.Timer.kind, t.Timer.key)
                )
            ).all()
            nxt: datetime | None = (
                await s.execute(
                    select(
                        func.least(
                            select(func.min(t.Run.wake_at))
                            .where(t.Run.wake_at.is_not(None), *self._mine())
                            .scalar_subquery(),
                            select(func.min(t.Timer.due_at)).where(*self._mine_timers()).scalar_subquery(),
                        )
                    )
                )
            ).scalar_one_or_none()
        for run_id in runs:
            self._fire(RUN, run_id)
        for kind, key in others:
            self._fire(kind, key)
        self.fired += len(runs) + len(others)
        if len(runs) >= self._batch or len(others) >= self._batch:
            return now  # more are due: tick again at once
        return nxt
