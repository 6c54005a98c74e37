"""A deduplicating, rate-limited work queue with bounded workers (client-go's workqueue).

Watch events, timers and the resync only *add keys* here; a worker takes a key and
reconciles it against the database and the cluster. Rules, as in client-go:

- a key is queued at most once (adding it again while queued is free);
- a key is processed by at most one worker at a time; added while being processed, it
  is queued again when that worker is done (so the newest state is always looked at);
- a handler that raises puts its key back after a per-key exponential delay (capped),
  so one failing run neither spins nor blocks the others; success forgets the delay.

Nothing here is authoritative: losing the queue (a crash) loses only hints, which the
timers in PostgreSQL and the resync rebuild.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kubetask.metrics import RECONCILE_ERRORS

log = logging.getLogger("kubetask.workqueue")

Handler = Callable[[str], Awaitable[None]]


@dataclass
class Backoff:
    """Per-key exponential delay for failed work: base * 2**failures, capped, jittered."""

    base: float = 0.2
    cap: float = 30.0
    failures: dict[str, int] = field(default_factory=dict)

    def next(self, key: str) -> float:
        n = self.failures.get(key, 0)
        self.failures[key] = n + 1
        delay = min(self.cap, self.base * 2.0**n)
        return float(delay * (0.5 + random.random() / 2))  # jitter: failing keys do not march in step

    def forget(self, key: str) -> None:
        self.failures.pop(key, None)

    def count(self, key: str) -> int:
        return self.failures.get(key, 0)


class WorkQueue:
    def __init__(self, *, name: str, backoff: Backoff | None = None) -> None:
        self.name = name
        self.backoff = backoff or Backoff()
        self._order: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._processing: set[str] = set()
        #: Keys added while being processed: queued again when their worker is done.
        self._dirty: set[str] = set()
        self._delayed: dict[str, asyncio.TimerHandle] = {}
        self._closed = False
        #: Work handled and failed (read by tests and /metrics).
        self.handled = 0
        self.failed = 0

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, key: str) -> None:
        if self._closed:
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._order.put_nowait(key)

    def add_after(self, key: str, delay: float) -> None:
        """Add ``key`` after ``delay`` seconds (an earlier pending add_after wins)."""
        if self._closed:
            return
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        old = self._delayed.get(key)
        if old is not None:
            if old.when() <= loop.time() + delay:
                return
            old.cancel()

        def fire() -> None:
            self._delayed.pop(key, None)
            self.add(key)

        self._delayed[key] = loop.call_later(delay, fire)

    def add_rate_limited(self, key: str) -> None:
        self.add_after(key, self.backoff.next(key))

    def forget(self, key: str) -> None:
        self.backoff.forget(key)

    async def get(self) -> str:
        key = await self._order.get()
        self._queued.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def close(self) -> None:
        self._closed = True
        for handle in self._delayed.values():
            handle.cancel()
        self._delayed.clear()

    async def run_workers(self, handler: Handler, *, workers: int, item_timeout: float) -> None:
        """Run ``workers`` workers until cancelled. Each key's handler gets ``item_timeout``
        seconds: a handler stuck on a partitioned database or API server is cancelled and
        retried later instead of holding a worker for ever."""

        async def worker() -> None:
            while True:
                key = await self.get()
                try:
                    async with asyncio.timeout(item_timeout):
                        await handler(key)
                except asyncio.CancelledError:
                    self.done(key)
                    raise
                except Exception as e:
                    self.failed += 1
                    RECONCILE_ERRORS.labels(self.name).inc()
                    n = self.backoff.count(key)
                    # The first failures of a key are usually a blip: say so quietly.
                    level = logging.WARNING if n >= 3 else logging.INFO
                    log.log(level, "%s: %s failed (%d in a row), retrying: %r", self.name, key, n + 1, e)
                    if n >= 3:
                        log.debug("traceback", exc_info=True)
                    self.add_rate_limited(key)
                else:
                    self.handled += 1
                    self.forget(key)
                finally:
                    if key in self._processing:
                        self.done(key)

        tasks = [asyncio.create_task(worker(), name=f"{self.name}-worker-{i}") for i in range(workers)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
