"""Admission against a real PostgreSQL: limits are exact with several processes admitting
at once, processes SIGKILLed mid-burst leak nothing, and the order rules hold."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import random
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from kubetask.admission import Admission, QueueLimits
from kubetask.engine import machine as m
from kubetask.pods import pod_name
from kubetask.spec import RetrySpec
from kubetask.store import db
from kubetask.store import tables as t

pytestmark = pytest.mark.db


def retry_for(_: t.Run) -> RetrySpec:
    return RetrySpec()


def queued_run(run_id: str, queue: str, key: str, priority: int) -> t.Run:
    """A Queued run's row (its id doubles as name and uid)."""
    return t.Run(
        id=run_id,
        namespace="ns",
        name=run_id,
        uid=run_id,
        task="task",
        queue=queue,
        concurrency_key=key or None,
        priority=priority,
        tags=[],
        payload={},
        phase="Queued",
        attempt=0,
        max_attempts=3,
        reason="",
        message="",
    )


async def add_runs(
    sessions: async_sessionmaker[AsyncSession],
    admission: Admission,
    queue: str,
    specs: list[tuple[str, str, int]],
) -> None:
    """specs: (run id, concurrency key, priority), enqueued in this order."""
    async with sessions.begin() as s:
        for run_id, key, prio in specs:
            s.add(queued_run(run_id, queue, key, prio))
        await s.flush()
        async with admission.locked_queue(s, queue) as q:
            for run_id, key, prio in specs:
                await admission.enqueue(s, q, run_id=run_id, key=key, priority=prio, arrival=0)


async def finish(
    sessions: async_sessionmaker[AsyncSession], admission: Admission, queue: str, run_id: str
) -> None:
    async with sessions.begin() as s, admission.locked_queue(s, queue) as q:
        await s.execute(update(t.Run).where(t.Run.id == run_id).values(phase="Succeeded"))
        await admission.release(s, q, run_id=run_id)


def _worker(url: str, queue: str, log_path: str, seed: int) -> None:
    """A separate OS process admitting and 'running' pods until the queue is empty."""

    async def main() -> None:
        engine = create_async_engine(url, pool_size=4)
        sessions = db.session_factory(engine)
        admission = Admission(sessions, pod_name=pod_name)
        rnd = random.Random(seed)
        running: dict[str, float] = {}
        with open(log_path, "a") as log:
            idle = 0
            while idle < 30:
                # Pretend each pod runs 5-30 ms; free the slots of the ones that ended.
                now = time.monotonic()
                for run_id, until in list(running.items()):
                    if now >= until:
                        log.write(json.dumps({"run": run_id, "event": "end", "t": time.time()}) + "\n")
                        log.flush()
                        await finish(sessions, admission, queue, run_id)
                        del running[run_id]
                grants = await admission.admit(queue, retry_for=retry_for, max_grants=rnd.randint(1, 4))
                for g in grants:
                    log.write(json.dumps({"run": g.run_id, "event": "start", "t": time.time()}) + "\n")
                    log.flush()
                    running[g.run_id] = time.monotonic() + rnd.uniform(0.005, 0.03)
                async with sessions() as s:
                    left = (
                        await s.execute(
                            select(func.count()).select_from(t.QueueEntry).where(t.QueueEntry.queue == queue)
                        )
                    ).scalar_one()
                idle = idle + 1 if not grants and not running and left == 0 else 0
                await asyncio.sleep(rnd.uniform(0, 0.005))
        await engine.dispose()

    asyncio.run(main())


def max_overlap(log_files: list[Path]) -> tuple[int, set[str]]:
    events = []
    started: set[str] = set()
    for path in log_files:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            ev = json.loads(line)
            events.append((ev["t"], 0 if ev["event"] == "end" else 1, ev["run"]))
            if ev["event"] == "start":
                started.add(ev["run"])
    live, best = 0, 0
    for _, kind, _ in sorted(events):
        live += 1 if kind else -1
        best = max(best, live)
    return best, started


async def queue_row(sessions: async_sessionmaker[AsyncSession], queue: str) -> t.Queue:
    async with sessions() as s:
        q = await s.get(t.Queue, queue)
        assert q is not None
        return q


@pytest.mark.parametrize("kills", [0, 3])
async def test_two_processes_never_exceed_the_limit_and_leak_no_slot(
    sessions: async_sessionmaker[AsyncSession], test_database_url: str, tmp_path: Path, kills: int
) -> None:
    queue = f"ns/burst-{kills}"
    admission = Admission(sessions, pod_name=pod_name)
    await admission.configure(queue, QueueLimits(concurrency_limit=3))
    await add_runs(sessions, admission, queue, [(f"r{kills}-{i}", f"k{i % 4}", 0) for i in range(300)])
    ctx = mp.get_context("spawn")
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    procs = [
        ctx.Process(target=_worker, args=(test_database_url, queue, str(p), i)) for i, p in enumerate(logs)
    ]
    for p in procs:
        p.start()
    for k in range(kills):
        victim = procs[k % 2]
        # Kill it mid-burst: once it has admitted something, at a random moment after.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not logs[k % 2].exists() or not logs[k % 2].read_text()):
            await asyncio.sleep(0.05)
        await asyncio.sleep(random.uniform(0.1, 0.6))
        assert victim.pid is not None and victim.is_alive(), "the burst ended before the kill"
        os.kill(victim.pid, signal.SIGKILL)
        victim.join()
        # The killed process's "pods" die with it: a restarted operator would see them end.
        async with sessions() as s:
            orphans = (await s.execute(select(t.Slot.run_id).where(t.Slot.queue == queue))).scalars().all()
        started: set[str] = set()
        ended: set[str] = set()
        logs[k % 2].touch()  # the victim may have died before writing anything
        for line in logs[k % 2].read_text().splitlines():
            ev = json.loads(line)
            (started if ev["event"] == "start" else ended).add(ev["run"])
        with logs[k % 2].open("a") as log:
            for run_id in orphans:
                if run_id in started - ended:
                    log.write(json.dumps({"run": run_id, "event": "end", "t": time.time()}) + "\n")
                    await finish(sessions, admission, queue, run_id)
        procs[k % 2] = ctx.Process(target=_worker, args=(test_database_url, queue, str(logs[k % 2]), 10 + k))
        procs[k % 2].start()
    for p in procs:
        p.join(240)
        assert p.exitcode == 0
    # A grant whose transaction committed but whose worker died before logging it leaves a
    # Running run with a slot: start-up reconciliation finishes those.
    async with sessions() as s:
        leftover = (await s.execute(select(t.Slot.run_id).where(t.Slot.queue == queue))).scalars().all()
    for run_id in leftover:
        await finish(sessions, admission, queue, run_id)
    best, started = max_overlap(logs)
    assert best <= 3, f"{best} runs held a slot at once with a limit of 3"
    q = await queue_row(sessions, queue)
    assert (q.running, q.queued) == (0, 0)
    async with sessions() as s:
        assert (
            await s.execute(select(func.count()).select_from(t.Slot).where(t.Slot.queue == queue))
        ).scalar_one() == 0
        phases = set((await s.execute(select(t.Run.phase).where(t.Run.queue == queue))).scalars().all())
        keys = (
            await s.execute(select(func.sum(t.QueueKey.running)).where(t.QueueKey.queue == queue))
        ).scalar_one()
    assert phases == {"Succeeded"}
    assert keys == 0
    assert started | set(leftover) == {f"r{kills}-{i}" for i in range(300)}


async def grant_order(
    sessions: async_sessionmaker[AsyncSession], admission: Admission, queue: str, n: int
) -> list[str]:
    order: list[str] = []
    for _ in range(n):
        grants = await admission.admit(queue, retry_for=retry_for, max_grants=1)
        assert len(grants) == 1
        order.append(grants[0].run_id)
        await finish(sessions, admission, queue, grants[0].run_id)
    return order


async def test_round_robin_across_keys_does_not_starve_a_small_key(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    queue = "ns/fair"
    admission = Admission(sessions, pod_name=pod_name)
    await admission.configure(queue, QueueLimits(concurrency_limit=1))
    await add_runs(sessions, admission, queue, [(f"fa{i}", "A", 0) for i in range(20)])
    await add_runs(sessions, admission, queue, [(f"fb{i}", "B", 0) for i in range(2)])
    order = await grant_order(sessions, admission, queue, 8)
    # Both of B's runs start before A's fifth; A's run first come first served.
    assert order.index("fb0") < order.index("fa4") and order.index("fb1") < order.index("fa4"), order
    assert [r for r in order if r.startswith("fa")] == [f"fa{i}" for i in range(6)], order


async def test_higher_priority_first_then_first_come_first_served(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    queue = "ns/prio"
    admission = Admission(sessions, pod_name=pod_name)
    await admission.configure(queue, QueueLimits(concurrency_limit=1))
    await add_runs(
        sessions,
        admission,
        queue,
        [("p-low1", "", 0), ("p-high", "", 5), ("p-low2", "", 0), ("p-mid", "x", 2)],
    )
    assert await grant_order(sessions, admission, queue, 4) == ["p-high", "p-mid", "p-low1", "p-low2"]


async def test_per_key_limit_and_pause(sessions: async_sessionmaker[AsyncSession]) -> None:
    queue = "ns/perkey"
    admission = Admission(sessions, pod_name=pod_name)
    await admission.configure(queue, QueueLimits(concurrency_limit=10, per_key_limit=2))
    await add_runs(
        sessions,
        admission,
        queue,
        [(f"pk-a{i}", "a", 0) for i in range(5)] + [(f"pk-b{i}", "b", 0) for i in range(5)],
    )
    grants = await admission.admit(queue, retry_for=retry_for)
    assert sorted(g.run_id for g in grants) == ["pk-a0", "pk-a1", "pk-b0", "pk-b1"]
    await admission.configure(queue, QueueLimits(concurrency_limit=10, per_key_limit=2, paused=True))
    await finish(sessions, admission, queue, "pk-a0")
    assert await admission.admit(queue, retry_for=retry_for) == []
    await admission.configure(queue, QueueLimits(concurrency_limit=10, per_key_limit=2, paused=False))
    assert [g.run_id for g in await admission.admit(queue, retry_for=retry_for)] == ["pk-a2"]
    # Lowering the limit stops grants without touching what runs.
    await admission.configure(queue, QueueLimits(concurrency_limit=2, per_key_limit=2))
    await finish(sessions, admission, queue, "pk-b0")
    assert await admission.admit(queue, retry_for=retry_for) == []
    q = await queue_row(sessions, queue)
    assert q.running == 3


async def test_grant_moves_the_run_to_running_with_its_attempt(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    queue = "ns/grant"
    admission = Admission(sessions, pod_name=pod_name)
    await add_runs(sessions, admission, queue, [("g1", "", 0)])
    [grant] = await admission.admit(queue, retry_for=retry_for)
    async with sessions() as s:
        run = await s.get(t.Run, "g1")
        att = await s.get(t.Attempt, ("g1", 1))
    assert run is not None and att is not None
    assert (run.phase, run.attempt, grant.attempt) == (m.Phase.RUNNING, 1, 1)
    assert att.pod_name == pod_name("g1", "g1", 1) and att.token_hash != grant.token
    assert run.started_at is not None and run.started_at <= datetime.now(UTC)


async def test_reconcile_releases_slots_of_runs_that_no_longer_run(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    queue = "ns/reconcile"
    admission = Admission(sessions, pod_name=pod_name)
    await add_runs(sessions, admission, queue, [("rc1", "", 0), ("rc2", "", 0)])
    await admission.admit(queue, retry_for=retry_for)
    async with sessions.begin() as s:  # a run that ended without its slot released (simulated corruption)
        await s.execute(update(t.Run).where(t.Run.id == "rc1").values(phase="Failed"))
    assert await admission.reconcile(live_runs=set()) >= 1
    q = await queue_row(sessions, queue)
    assert q.running == 1


async def _join(
    sessions: async_sessionmaker[AsyncSession], admission: Admission, queue: str, run_id: str, key: str
) -> str:
    """A run joins its queue as a transition does: the fast path first, else an entry.
    Returns "granted" or "queued"."""
    async with sessions.begin() as s:
        s.add(queued_run(run_id, queue, key, 0))
        await s.flush()
        async with admission.locked_queue(s, queue) as q:
            run = (await s.execute(select(t.Run).where(t.Run.id == run_id).with_for_update())).scalar_one()
            if await admission.grant_now(s, q, run=run, key=key, retry_for=retry_for) is not None:
                return "granted"
            await admission.enqueue(s, q, run_id=run_id, key=key, priority=0, arrival=0)
            return "queued"


async def test_a_run_joining_a_queue_with_room_and_nobody_waiting_is_granted_at_once(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    queue = "ns/fast"
    admission = Admission(sessions)
    await admission.configure(queue, QueueLimits(concurrency_limit=2, per_key_limit=1))
    assert await _join(sessions, admission, queue, "f1", "a") == "granted"
    # The key is at its per-key limit: queued, even though the queue has room.
    assert await _join(sessions, admission, queue, "f2", "a") == "queued"
    # Somebody waits now: a newcomer never passes them, whatever its key.
    assert await _join(sessions, admission, queue, "f3", "b") == "queued"
    async with sessions() as s:
        run = await s.get(t.Run, "f1")
        keys = {k.key: (k.running, k.queued) for k in (await s.execute(select(t.QueueKey))).scalars()}
    assert run is not None and (run.phase, run.attempt) == (m.Phase.RUNNING, 1)
    assert await admission.counts(queue) == (1, 2)
    assert keys["a"] == (1, 1) and keys["b"] == (0, 1)
    # The counters are the ones a full recount gives.
    assert await admission.reconcile(live_runs=set()) == 0
    assert await admission.counts(queue) == (1, 2)
    # The normal cycle then serves "b" (its key has room), not "a".
    [grant] = await admission.admit(queue, retry_for=retry_for)
    assert grant.run_id == "f3"


async def test_the_fast_path_respects_the_queue_limit_and_a_pause(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    queue = "ns/fast-limit"
    admission = Admission(sessions)
    await admission.configure(queue, QueueLimits(concurrency_limit=1))
    assert await _join(sessions, admission, queue, "l1", "") == "granted"
    assert await _join(sessions, admission, queue, "l2", "") == "queued"
    paused = "ns/fast-paused"
    await admission.configure(paused, QueueLimits(concurrency_limit=5, paused=True))
    assert await _join(sessions, admission, paused, "p1", "") == "queued"
    assert await admission.counts(queue) == (1, 1) and await admission.counts(paused) == (0, 1)


async def test_a_rate_limit_grants_a_burst_then_says_when_the_next_start_is_allowed(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    queue = "ns/rated"
    admission = Admission(sessions, pod_name=pod_name)
    await admission.configure(queue, QueueLimits(rate_limit=3, rate_period=60.0))
    await add_runs(sessions, admission, queue, [(f"rl-{i}", "", 0) for i in range(5)])
    before = datetime.now(UTC)
    grants = await admission.admit(queue, retry_for=retry_for)
    assert [g.run_id for g in grants] == ["rl-0", "rl-1", "rl-2"]  # the burst: the limit
    due = admission.rate_waits[queue]
    assert before + timedelta(seconds=19) <= due <= datetime.now(UTC) + timedelta(seconds=21)  # 60/3 s
    assert await admission.admit(queue, retry_for=retry_for) == []  # still empty, however often asked
    # Time passes (the bucket's TAT moved back by hand): one more start, one only.
    async with sessions.begin() as s:
        await s.execute(
            update(t.Queue)
            .where(t.Queue.name == queue)
            .values(rate_tat=t.Queue.rate_tat - timedelta(seconds=20))
        )
    assert [g.run_id for g in await admission.admit(queue, retry_for=retry_for)] == ["rl-3"]
    q = await queue_row(sessions, queue)
    assert (q.running, q.queued) == (4, 1)


async def test_a_per_key_rate_limit_gives_each_key_its_own_bucket(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    queue = "ns/rated-keys"
    admission = Admission(sessions, pod_name=pod_name)
    await admission.configure(queue, QueueLimits(rate_limit=2, rate_period=60.0, rate_per_key=True))
    await add_runs(
        sessions,
        admission,
        queue,
        [(f"rk-a{i}", "a", 0) for i in range(4)] + [(f"rk-b{i}", "b", 0) for i in range(4)],
    )
    grants = await admission.admit(queue, retry_for=retry_for)
    assert sorted(g.run_id for g in grants) == ["rk-a0", "rk-a1", "rk-b0", "rk-b1"]
    assert queue in admission.rate_waits
    assert await admission.admit(queue, retry_for=retry_for) == []
