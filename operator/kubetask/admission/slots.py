"""Slots, exact under concurrency.

Every grant and every release for a queue runs in one transaction that first locks the
queue's row (``SELECT ... FOR UPDATE``). So two operator processes, or two tasks of one
process, admitting for the same queue are serialised by PostgreSQL, and the counters
``queues.running`` / ``queue_keys.running`` are exact. A transaction that dies halfway
(connection dropped, process killed) rolls back whole: nothing is granted or leaked.

The grant itself moves the run to ``Running`` with its next attempt number, records the
attempt and deletes the queue entry in the same transaction, so a crash after commit
leaves a run that *owns* its slot and whose pod the operator creates on restart.

Lock order, everywhere: queue row -> run rows -> queue_keys rows. Callers that change a
run and its queue together (:meth:`Admission.locked_queue`) follow the same order.

Order of admission: higher priority first; among the keys whose best queued run has that
priority, the key served least recently (round-robin); within a key, first come first
served. Picking costs two index lookups whatever the queue depth.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, case, delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask import pods
from kubetask.admission.ratelimit import Bucket
from kubetask.engine.machine import Phase, RunState, SlotGranted, step
from kubetask.protocol import hash_token
from kubetask.spec import RetrySpec
from kubetask.store import tables as t
from kubetask.store.runs import load_state, save_state


@dataclass(frozen=True)
class QueueLimits:
    concurrency_limit: int | None = None
    per_key_limit: int | None = None
    paused: bool = False
    source: str = "default"
    #: spec.rateLimit: pod starts per period (None: no rate limit).
    rate_limit: int | None = None
    rate_period: float | None = None
    rate_per_key: bool = False


def bucket(q: t.Queue) -> Bucket | None:
    """The queue's rate limit, if it has one."""
    if q.rate_limit is None or not q.rate_period:
        return None
    return Bucket(q.rate_limit, q.rate_period)


@dataclass(frozen=True)
class Grant:
    """A slot granted to ``run_id`` for ``attempt``; the pod may be created now."""

    run_id: str
    attempt: int
    token: str


class Admission:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        pod_name: Callable[[str, str, int], str] = pods.pod_name,
        start_deadline: timedelta | None = None,
    ) -> None:
        self._sessions = sessions
        self._pod_name = pod_name
        #: A granted run's timer is set this far ahead (the earliest moment its pod could
        #: be late starting), in the grant's own UPDATE: no pod event needs a query.
        self._start_deadline = start_deadline
        #: Statements issued by admit(); read by the benchmark.
        self.statements = 0
        #: Queue -> when its rate limit allows the next start, for queues whose last
        #: admission cycle stopped at the limit (the controller sets a timer for it).
        self.rate_waits: dict[str, datetime] = {}

    # ---- queue configuration ----------------------------------------------------------

    async def configure(self, queue: str, limits: QueueLimits) -> None:
        """Create or update a queue's limits. Takes effect at once; lowering a limit
        never touches running pods, it only stops new grants until ``running`` drops."""
        async with self._sessions.begin() as s:
            settings = {
                "concurrency_limit": limits.concurrency_limit,
                "per_key_limit": limits.per_key_limit,
                "paused": limits.paused,
                "source": limits.source,
                "rate_limit": limits.rate_limit,
                "rate_period": limits.rate_period,
                "rate_per_key": limits.rate_per_key,
            }
            stmt = pg_insert(t.Queue).values(name=queue, running=0, queued=0, grants=0, **settings)
            await s.execute(stmt.on_conflict_do_update(index_elements=[t.Queue.name], set_=settings))

    async def limits(self, queue: str) -> QueueLimits | None:
        async with self._sessions() as s:
            q = await s.get(t.Queue, queue)
            if q is None:
                return None
            return QueueLimits(
                q.concurrency_limit,
                q.per_key_limit,
                q.paused,
                q.source,
                q.rate_limit,
                q.rate_period,
                bool(q.rate_per_key),
            )

    @asynccontextmanager
    async def locked_queue(self, session: AsyncSession, queue: str) -> AsyncIterator[t.Queue]:
        """Lock (creating if needed) the queue row inside the caller's transaction."""
        await session.execute(
            pg_insert(t.Queue)
            .values(name=queue, running=0, queued=0, grants=0, paused=False, source="default")
            .on_conflict_do_nothing(index_elements=[t.Queue.name])
        )
        row = (
            await session.execute(select(t.Queue).where(t.Queue.name == queue).with_for_update())
        ).scalar_one()
        yield row

    async def lock_queue_of(self, session: AsyncSession, run_id: str) -> t.Queue | None:
        """Lock the queue row of ``run_id``'s queue (one statement when it exists, as it
        almost always does). None if the run does not exist."""
        by_run = select(t.Run.queue).where(t.Run.id == run_id).scalar_subquery()
        row = (
            await session.execute(select(t.Queue).where(t.Queue.name == by_run).with_for_update())
        ).scalar_one_or_none()
        if row is not None:
            return row
        queue = (await session.execute(select(t.Run.queue).where(t.Run.id == run_id))).scalar_one_or_none()
        if queue is None:
            return None
        async with self.locked_queue(session, queue) as q:
            return q

    # ---- entries and slots (inside the caller's transaction, queue row locked) ---------

    async def enqueue(
        self, s: AsyncSession, q: t.Queue, *, run_id: str, key: str, priority: int, arrival: int = 0
    ) -> None:
        res = await s.execute(
            pg_insert(t.QueueEntry)
            .values(run_id=run_id, queue=q.name, key=key, priority=priority, arrival=arrival)
            .on_conflict_do_nothing(index_elements=[t.QueueEntry.run_id])
        )
        if res.rowcount == 0:  # type: ignore[attr-defined]
            return
        q.queued += 1
        await s.execute(
            pg_insert(t.QueueKey)
            .values(queue=q.name, key=key, running=0, queued=1, last_served=0, head_priority=priority)
            .on_conflict_do_update(
                index_elements=[t.QueueKey.queue, t.QueueKey.key],
                set_={
                    "queued": t.QueueKey.queued + 1,
                    # An empty key's stale head must not outrank the new run's priority.
                    "head_priority": case(
                        (t.QueueKey.queued == 0, priority),
                        else_=func.greatest(t.QueueKey.head_priority, priority),
                    ),
                },
            )
        )

    async def dequeue(self, s: AsyncSession, q: t.Queue, *, run_id: str) -> bool:
        entry = (
            await s.execute(
                delete(t.QueueEntry).where(t.QueueEntry.run_id == run_id).returning(t.QueueEntry.key)
            )
        ).scalar_one_or_none()
        if entry is None:
            return False
        q.queued -= 1
        await self._after_dequeue(s, q.name, entry, running_delta=0)
        return True

    async def release(self, s: AsyncSession, q: t.Queue, *, run_id: str) -> bool:
        """Free the run's slot, if it holds one: the slot and its key's count in one
        statement (a data-modifying CTE)."""
        freed = (
            delete(t.Slot)
            .where(t.Slot.run_id == run_id, t.Slot.queue == q.name)
            .returning(t.Slot.key)
            .cte("freed")
        )
        released = (
            await s.execute(
                update(t.QueueKey)
                .where(t.QueueKey.queue == q.name, t.QueueKey.key == freed.c.key)
                .values(running=t.QueueKey.running - 1)
                .returning(t.QueueKey.key)
                .execution_options(synchronize_session=False)
            )
        ).scalar_one_or_none()
        if released is None:
            return False
        q.running -= 1
        return True

    async def _key_rate_wait(self, s: AsyncSession, q: t.Queue, rate: Bucket, now: datetime) -> None:
        """Every key with queued runs may be waiting for its bucket: when is the first one
        allowed again (the admission cycle's timer)?"""
        earliest = (
            await s.execute(
                select(func.min(t.QueueKey.rate_tat)).where(
                    t.QueueKey.queue == q.name,
                    t.QueueKey.queued > 0,
                    t.QueueKey.rate_tat > now + rate.tolerance,
                    *([t.QueueKey.running < q.per_key_limit] if q.per_key_limit is not None else []),
                )
            )
        ).scalar_one_or_none()
        self.statements += 1
        if earliest is not None:
            self.rate_waits[q.name] = rate.allowed_at(earliest, now)

    async def _after_dequeue(
        self,
        s: AsyncSession,
        queue: str,
        key: str,
        *,
        running_delta: int,
        served: int | None = None,
        rate: Bucket | None = None,
        now: datetime | None = None,
    ) -> None:
        # The key's new head priority is read in the same statement (the entry that left is
        # already deleted in this transaction); a key with nothing queued keeps its old one.
        head = (
            select(func.max(t.QueueEntry.priority))
            .where(t.QueueEntry.queue == queue, t.QueueEntry.key == key)
            .scalar_subquery()
        )
        values: dict[str, object] = {
            "queued": t.QueueKey.queued - 1,
            "running": t.QueueKey.running + running_delta,
            "head_priority": func.coalesce(head, t.QueueKey.head_priority),
        }
        if served is not None:
            values["last_served"] = served
        if rate is not None and now is not None:  # a start from the key's own bucket
            values["rate_tat"] = func.greatest(func.coalesce(t.QueueKey.rate_tat, now), now) + rate.interval
        await s.execute(
            update(t.QueueKey).where(t.QueueKey.queue == queue, t.QueueKey.key == key).values(**values)
        )
        self.statements += 1

    async def grant_now(
        self, s: AsyncSession, q: t.Queue, *, run: t.Run, key: str, retry_for: Callable[[t.Run], RetrySpec]
    ) -> Grant | None:
        """The fast path of a run joining its queue: when nobody is waiting in it and a
        slot is free (queue and key), grant the run at once, in the caller's transaction
        (queue row, then run row locked), instead of queueing it for the next cycle. Order
        is kept: with nothing queued there is nobody to pass. None: queue it as usual."""
        if q.paused or q.queued > 0:
            return None
        if q.concurrency_limit is not None and q.running >= q.concurrency_limit:
            return None
        rate, now = bucket(q), datetime.now(UTC)
        queue_tat = None
        if rate is not None and not q.rate_per_key:
            queue_tat = rate.take(q.rate_tat, now)
            if queue_tat is None:
                return None  # the queue's bucket is empty: the admission cycle waits for it
        served = q.grants + 1
        values: dict[str, object] = {"running": t.QueueKey.running + 1, "last_served": served}
        conds = [t.QueueKey.running < q.per_key_limit] if q.per_key_limit is not None else []
        first_tat = None
        if rate is not None and q.rate_per_key:
            # The key's bucket, in the same statement: its TAT moves only if a start is allowed.
            values["rate_tat"] = func.greatest(func.coalesce(t.QueueKey.rate_tat, now), now) + rate.interval
            conds.append((t.QueueKey.rate_tat.is_(None)) | (t.QueueKey.rate_tat <= now + rate.tolerance))
            first_tat = now + rate.interval
        upsert = pg_insert(t.QueueKey).values(
            queue=q.name,
            key=key,
            running=1,
            queued=0,
            last_served=served,
            head_priority=run.priority,
            rate_tat=first_tat,
        )
        stmt = upsert.on_conflict_do_update(
            index_elements=[t.QueueKey.queue, t.QueueKey.key],
            set_=values,
            where=and_(*conds) if conds else None,
        ).returning(t.QueueKey.running)
        if (await s.execute(stmt)).scalar_one_or_none() is None:
            return None  # the key is at its limit (concurrency or rate)
        self.statements += 1
        if queue_tat is not None:
            q.rate_tat = queue_tat
        q.grants = served
        return await self._grant_locked(s, q, run=run, key=key, retry_for=retry_for)

    # ---- the admission cycle ------------------------------------------------------------

    async def admit(
        self, queue: str, *, retry_for: Callable[[t.Run], RetrySpec], max_grants: int = 64
    ) -> list[Grant]:
        """Grant as many slots as the queue's limits allow now (at most ``max_grants``)."""
        grants: list[Grant] = []
        async with self._sessions.begin() as s:
            q = (
                await s.execute(select(t.Queue).where(t.Queue.name == queue).with_for_update())
            ).scalar_one_or_none()
            self.statements += 1
            if q is None or q.paused:
                return grants
            # The queue row's counters change on every grant; flush them once, at commit,
            # not before each SELECT of the loop (autoflush would write the row twice a grant).
            rate, now = bucket(q), datetime.now(UTC)
            self.rate_waits.pop(queue, None)
            with s.no_autoflush:
                while len(grants) < max_grants and q.queued > 0:
                    if q.concurrency_limit is not None and q.running >= q.concurrency_limit:
                        break
                    tat = None
                    if rate is not None and not q.rate_per_key:
                        tat = rate.take(q.rate_tat, now)
                        if tat is None:  # the queue's bucket is empty until then
                            self.rate_waits[queue] = rate.allowed_at(q.rate_tat, now)
                            break
                    pick = select(t.QueueKey.key).where(t.QueueKey.queue == queue, t.QueueKey.queued > 0)
                    if q.per_key_limit is not None:
                        pick = pick.where(t.QueueKey.running < q.per_key_limit)
                    if rate is not None and q.rate_per_key:
                        pick = pick.where(
                            (t.QueueKey.rate_tat.is_(None)) | (t.QueueKey.rate_tat <= now + rate.tolerance)
                        )
                    key = (
                        await s.execute(
                            pick.order_by(t.QueueKey.head_priority.desc(), t.QueueKey.last_served).limit(1)
                        )
                    ).scalar_one_or_none()
                    self.statements += 1
                    if key is None:
                        if rate is not None and q.rate_per_key:
                            await self._key_rate_wait(s, q, rate, now)
                        break  # every key with queued runs is at its per-key limit (or rate)
                    if tat is not None:
                        q.rate_tat = tat  # the queue's bucket gives this start
                    run_id = (
                        await s.execute(
                            delete(t.QueueEntry)
                            .where(
                                t.QueueEntry.run_id
                                == (
                                    select(t.QueueEntry.run_id)
                                    .where(t.QueueEntry.queue == queue, t.QueueEntry.key == key)
                                    .order_by(
                                        t.QueueEntry.priority.desc(), t.QueueEntry.arrival, t.QueueEntry.seq
                                    )
                                    .limit(1)
                                    .scalar_subquery()
                                )
                            )
                            .returning(t.QueueEntry.run_id)
                        )
                    ).scalar_one()
                    self.statements += 1
                    q.queued -= 1
                    q.grants += 1
                    await self._after_dequeue(
                        s,
                        queue,
                        key,
                        running_delta=1,
                        served=q.grants,
                        rate=rate if q.rate_per_key else None,
                        now=now,
                    )
                    grant = await self._grant(s, q, run_id=run_id, key=key, retry_for=retry_for)
                    if grant is not None:
                        grants.append(grant)
            self.statements += 1  # the queue row's counters, flushed at commit
        return grants

    async def _grant(
        self, s: AsyncSession, q: t.Queue, *, run_id: str, key: str, retry_for: Callable[[t.Run], RetrySpec]
    ) -> Grant | None:
        run = (
            await s.execute(select(t.Run).where(t.Run.id == run_id).with_for_update())
        ).scalar_one_or_none()
        self.statements += 1
        if run is None or run.phase != Phase.QUEUED:
            # Not waiting any more (canceled in between): the entry was stale; undo the count.
            await s.execute(
                update(t.QueueKey)
                .where(t.QueueKey.queue == q.name, t.QueueKey.key == key)
                .values(running=t.QueueKey.running - 1)
            )
            return None
        return await self._grant_locked(s, q, run=run, key=key, retry_for=retry_for)

    async def _grant_locked(
        self, s: AsyncSession, q: t.Queue, *, run: t.Run, key: str, retry_for: Callable[[t.Run], RetrySpec]
    ) -> Grant:
        """Grant ``run`` (Queued, its row locked) a slot: move it to Running with its next
        attempt, record the slot and the attempt. The key's counters are the caller's."""
        run_id = run.id
        now = datetime.now(UTC)
        before = load_state(run)
        tr = step(before, SlotGranted(), now=now, retry=retry_for(run), rand=lambda: 0.0)
        state: RunState = tr.state
        save_state(run, state, now=now)
        run.wake_at = now + self._start_deadline if self._start_deadline is not None else None
        token = secrets.token_urlsafe(32)
        await s.execute(insert(t.Slot).values(run_id=run_id, queue=q.name, key=key, attempt=state.attempt))
        await s.execute(
            insert(t.Attempt).values(
                run_id=run_id,
                number=state.attempt,
                pod_name=self._pod_name(run.name, run.uid, state.attempt),
                token_hash=hash_token(token),
                resume=before.resuming,  # this pod continues an attempt after a wait
            )
        )
        q.running += 1
        self.statements += 3
        return Grant(run_id=run_id, attempt=state.attempt, token=token)

    # ---- start-up and inspection ----------------------------------------------------------

    async def reconcile(self, *, live_runs: set[str]) -> int:
        """Release slots whose run is not Running any more, and recompute every queue's
        counters from the slots and entries that exist. Returns slots released."""
        released = 0
        async with self._sessions.begin() as s:
            names = (await s.execute(select(t.Queue.name).order_by(t.Queue.name))).scalars().all()
            for name in names:
                async with self.locked_queue(s, name) as q:
                    stale = (
                        (
                            await s.execute(
                                select(t.Slot.run_id)
                                .join(t.Run, t.Run.id == t.Slot.run_id, isouter=True)
                                .where(t.Slot.queue == name)
                                .where(
                                    (t.Run.id.is_(None))
                                    | (t.Run.phase != Phase.RUNNING)
                                    | (t.Run.attempt != t.Slot.attempt)
                                )
                            )
                        )
                        .scalars()
                        .all()
                    )
                    for run_id in stale:
                        await s.execute(delete(t.Slot).where(t.Slot.run_id == run_id))
                        released += 1
                    await self._recount(s, q)
        return released

    async def _recount(self, s: AsyncSession, q: t.Queue) -> None:
        q.running = (
            await s.execute(select(func.count()).select_from(t.Slot).where(t.Slot.queue == q.name))
        ).scalar_one()
        q.queued = (
            await s.execute(
                select(func.count()).select_from(t.QueueEntry).where(t.QueueEntry.queue == q.name)
            )
        ).scalar_one()
        await s.execute(
            update(t.QueueKey)
            .where(t.QueueKey.queue == q.name)
            .values(
                running=select(func.count())
                .select_from(t.Slot)
                .where(t.Slot.queue == q.name, t.Slot.key == t.QueueKey.key)
                .scalar_subquery(),
                queued=select(func.count())
                .select_from(t.QueueEntry)
                .where(t.QueueEntry.queue == q.name, t.QueueEntry.key == t.QueueKey.key)
                .scalar_subquery(),
                head_priority=func.coalesce(
                    select(func.max(t.QueueEntry.priority))
                    .where(t.QueueEntry.queue == q.name, t.QueueEntry.key == t.QueueKey.key)
                    .scalar_subquery(),
                    0,
                ),
            )
        )

    async def queues_with_waiting(self) -> list[str]:
        async with self._sessions() as s:
            return list((await s.execute(select(t.Queue.name).where(t.Queue.queued > 0))).scalars().all())

    async def counts(self, queue: str) -> tuple[int, int]:
        async with self._sessions() as s:
            q = await s.get(t.Queue, queue)
            return (q.running, q.queued) if q else (0, 0)
