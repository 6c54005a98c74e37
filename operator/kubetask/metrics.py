"""The operator's Prometheus metrics (served at ``/metrics``; docs/observability.md).

Counters and histograms are counted where the thing happens (a committed transition, a
pod created, a reconcile that failed, a database statement). The gauges of what is live
(runs by phase, queues) are read from PostgreSQL by the leader every few seconds
(:class:`LiveGauges`): the database is the truth, so a new leader exports the same numbers
its predecessor did, and standby replicas export none.

Labels are bounded by what users create: ``namespace`` and ``task`` (one series per Task
and phase), ``queue`` (one per queue). Never a run id."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from kubetask.engine import machine as m
from kubetask.store import tables as t

log = logging.getLogger(__name__)

RUNS_FINISHED = Counter(
    "kubetask_runs_finished_total",
    "Runs that reached a terminal phase (Succeeded, Failed, Canceled, Deduplicated, Expired...).",
    ["namespace", "task", "phase"],
)
RUNS_LIVE = Gauge(
    "kubetask_runs",
    "Runs not finished yet, by phase (Pending, Delayed, Queued, Running, Waiting, Canceling...).",
    ["namespace", "task", "phase"],
)
ATTEMPTS = Counter(
    "kubetask_attempts_total",
    "Attempts that ended, by outcome (succeeded, failed, infra, suspended, ...).",
    ["namespace", "task", "outcome"],
)
START_LATENCY = Histogram(
    "kubetask_run_start_latency_seconds",
    "From a Run's creation to its first attempt's pod being created (admission, back-offs "
    "of a delay or a queue included).",
    ["namespace", "task"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
QUEUE_RUNNING = Gauge("kubetask_queue_running", "Runs holding a slot of the queue.", ["queue"])
QUEUE_QUEUED = Gauge("kubetask_queue_queued", "Runs waiting for a slot of the queue.", ["queue"])
QUEUE_LIMIT = Gauge("kubetask_queue_limit", "The queue's concurrency limit (absent: unlimited).", ["queue"])
QUEUE_PAUSED = Gauge("kubetask_queue_paused", "1 while the queue is paused.", ["queue"])
RECONCILE_ERRORS = Counter(
    "kubetask_reconcile_errors_total",
    "Reconciles that raised and were retried with back-off, by work queue (runs, queues, intake, schedules).",
    ["queue"],
)
POD_CREATE_ERRORS = Counter(
    "kubetask_pod_create_errors_total",
    "Attempt pods the API server refused to create, by HTTP status (403: a quota, 422: invalid...).",
    ["status"],
)
DB_LATENCY = Histogram(
    "kubetask_db_statement_seconds",
    "Duration of each SQL statement the operator sends to PostgreSQL.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
#: Seconds between two readings of the live gauges.
LIVE_INTERVAL = 5.0


def transition(namespace: str, task: str, before: m.RunState, after: m.RunState, event: object) -> None:
    """Count a committed transition."""
    if after.terminal and not before.terminal:
        RUNS_FINISHED.labels(namespace, task, after.phase.value).inc()
    if isinstance(event, m.AttemptEnded):
        ATTEMPTS.labels(namespace, task, event.outcome.value).inc()


def time_statements(engine: AsyncEngine) -> None:
    """Observe every statement's duration in :data:`DB_LATENCY` (SQLAlchemy's cursor
    events, on the engine's synchronous core)."""
    sync = engine.sync_engine

    @event.listens_for(sync, "before_cursor_execute")
    def _before(
        conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any, executemany: bool
    ) -> None:
        conn.info.setdefault("kubetask_started", []).append(time.perf_counter())

    @event.listens_for(sync, "after_cursor_execute")
    def _after(
        conn: Any, cursor: Any, statement: Any, parameters: Any, context: Any, executemany: bool
    ) -> None:
        started = conn.info.get("kubetask_started")
        if started:
            DB_LATENCY.observe(time.perf_counter() - started.pop())


class LiveGauges:
    """The leader's readings of live runs and queues into the gauges."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], namespaces: list[str]) -> None:
        self.sessions = sessions
        #: The namespaces this operator watches (empty: all).
        self.namespaces = namespaces
        self._exported: dict[Gauge, set[tuple[str, ...]]] = {}

    async def loop(self) -> None:
        try:
            while True:
                try:
                    await self.read()
                except Exception as e:  # a blip: the next reading catches up
                    log.info("metrics: reading live runs and queues failed: %r", e)
                await asyncio.sleep(LIVE_INTERVAL)
        finally:
            clear()  # no longer the leader: another replica exports them
            self._exported.clear()

    async def read(self) -> None:
        runs = select(t.Run.namespace, t.Run.task, t.Run.phase, func.count()).where(
            t.Run.finished_at.is_(None)
        )
        queues = select(
            t.Queue.name, t.Queue.running, t.Queue.queued, t.Queue.concurrency_limit, t.Queue.paused
        )
        if self.namespaces:
            runs = runs.where(t.Run.namespace.in_(self.namespaces))
            queues = queues.where(func.split_part(t.Queue.name, "/", 1).in_(self.namespaces))
        async with self.sessions() as s:
            live = (await s.execute(runs.group_by(t.Run.namespace, t.Run.task, t.Run.phase))).all()
            rows = (await s.execute(queues)).all()
        readings: dict[Gauge, dict[tuple[str, ...], float]] = {g: {} for g in LIVE}
        for namespace, task, phase, n in live:
            readings[RUNS_LIVE][(namespace, task, phase)] = n
        for name, running, queued, limit, paused in rows:
            readings[QUEUE_RUNNING][(name,)] = running
            readings[QUEUE_QUEUED][(name,)] = queued
            readings[QUEUE_PAUSED][(name,)] = 1 if paused else 0
            if limit is not None:
                readings[QUEUE_LIMIT][(name,)] = limit
        for gauge, values in readings.items():
            # Set the new values, then drop the series that are gone (never an empty moment).
            for labels, value in values.items():
                gauge.labels(*labels).set(value)
            for labels in self._exported.get(gauge, set()) - values.keys():
                gauge.remove(*labels)
            self._exported[gauge] = set(values)


LIVE = (RUNS_LIVE, QUEUE_RUNNING, QUEUE_QUEUED, QUEUE_LIMIT, QUEUE_PAUSED)


def clear() -> None:
    for gauge in LIVE:
        gauge.clear()
