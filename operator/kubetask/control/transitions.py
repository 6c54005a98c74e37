"""The one writer of a run's state: apply an engine event in one PostgreSQL transaction.

Every change of phase goes through :meth:`Transitions.apply`: it locks the run's queue
row, then the run row (the admission lock order), computes the engine's step, saves
it, carries out the queue actions (enqueue, dequeue, release) and sets or clears the
run's timer (``runs.wake_at``), all in the same transaction. What must happen in Kubernetes afterwards is
not done here: the run is put back on the work queue and its reconcile does it, so a
crash after commit loses nothing (the reconcile is level-triggered).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask import metrics
from kubetask.admission import Admission
from kubetask.admission.slots import Grant
from kubetask.control.timers import utcnow
from kubetask.engine import machine as m
from kubetask.spec import RetrySpec
from kubetask.store import journal
from kubetask.store import tables as t
from kubetask.store.runs import load_state, save_state

log = logging.getLogger("kubetask.transitions")

#: Makes a run's next event inside the transition's transaction (see Transitions.apply).
EventSource = Callable[[AsyncSession, t.Run], Awaitable[m.Event | None]]


@dataclass(frozen=True)
class Applied:
    """What a committed transition asks of the rest of the controller."""

    run_id: str
    queue: str
    transition: m.Transition
    before: m.RunState
    #: A slot granted in the same transaction (the queue had room and nobody waiting).
    grant: Grant | None = None
    #: Runs waiting in the queue when the transaction committed.
    waiting: int = 0

    @property
    def admit(self) -> bool:
        """The queue may grant a slot now: a run joined it, or a slot was freed while runs
        wait (a freed slot with nobody waiting needs no admission cycle)."""
        return any(isinstance(a, m.Enqueue) for a in self.transition.actions) or (
            self.waiting > 0 and any(isinstance(a, m.ReleaseSlot) for a in self.transition.actions)
        )

    @property
    def queue_changed(self) -> bool:
        return self.grant is not None or any(
            isinstance(a, m.Enqueue | m.Dequeue | m.ReleaseSlot) for a in self.transition.actions
        )

    @property
    def wake_at(self) -> datetime | None:
        for a in self.transition.actions:
            if isinstance(a, m.WakeAt):
                return a.at
        return None


class Transitions:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        admission: Admission,
        retry_for: Callable[[t.Run], RetrySpec],
        ttl_for: Callable[[t.Run], int | None],
        infra_limit: int,
        committed: Callable[[Applied], None],
    ) -> None:
        self.sessions = sessions
        self.admission = admission
        self.retry_for = retry_for
        #: Seconds a finished run's resource is kept (None: for ever).
        self.ttl_for = ttl_for
        self.infra_limit = infra_limit
        #: Called after each commit that changed something (enqueue work, wake timers...).
        self._committed = committed

    async def apply(self, run_id: str, event: m.Event | EventSource) -> Applied | None:
        """Apply one event to a run in one transaction.

        ``event`` may be a function that makes the event inside that transaction (with the
        queue and run rows locked) and records what caused it, so the cause and the
        transition commit together or not at all. It returns None when there is nothing
        to apply (the cause was recorded before). Returns None if nothing changed."""
        async with self.sessions.begin() as s:
            q = await self.admission.lock_queue_of(s, run_id)  # the queue first: the lock order
            if q is None:
                return None
            queue = q.name
            row = (await s.execute(select(t.Run).where(t.Run.id == run_id).with_for_update())).scalar_one()
            if callable(event):
                made = await event(s, row)
                if made is None:
                    return None
                event = made
            # Read the clock after the cause was recorded: a back-off counts from the
            # attempt's recorded end, never from a moment before it.
            now = utcnow()
            before = load_state(row)
            tr = m.step(
                before,
                event,
                now=now,
                retry=self.retry_for(row),
                rand=random.random,
                infra_limit=self.infra_limit,
            )
            if tr.state == before and not tr.actions:
                return None
            save_state(row, tr.state, now=now)
            if tr.state.terminal and not before.terminal:
                await _ended(s, row, before)
            # The run's timer follows its state, in the same UPDATE: a wait sets it, a
            # finished run's is its TTL, a move clears it (a reconcile sets whatever else
            # it needs later, e.g. a pod's start deadline; a grant sets its own).
            if (wake := next((a.at for a in tr.actions if isinstance(a, m.WakeAt)), None)) is not None:
                row.wake_at = wake
            elif tr.state.terminal and not before.terminal:
                ttl = self.ttl_for(row)
                row.wake_at = now + timedelta(seconds=ttl) if ttl is not None else None
            elif tr.state.phase != before.phase:
                row.wake_at = None
            grant: Grant | None = None
            # Each row is written once, at commit: the run and queue rows change more than
            # once here (a grant right after the move), and need not be flushed in between.
            with s.no_autoflush:
                for action in tr.actions:
                    if isinstance(action, m.Enqueue):
                        grant = await self.admission.grant_now(
                            s, q, run=row, key=row.concurrency_key or "", retry_for=self.retry_for
                        )
                        if grant is not None:
                            continue  # admitted at once: it never waits in the queue
                        await self.admission.enqueue(
                            s,
                            q,
                            run_id=run_id,
                            key=row.concurrency_key or "",
                            priority=row.priority,
                            arrival=row.arrival,
                        )
                    elif isinstance(action, m.Dequeue):
                        await self.admission.dequeue(s, q, run_id=run_id)
                    elif isinstance(action, m.ReleaseSlot):
                        await self.admission.release(s, q, run_id=run_id)
            if grant is not None:
                kept = tuple(a for a in tr.actions if not isinstance(a, m.Enqueue))
                tr = m.Transition(load_state(row), (*kept, m.CreatePod(grant.attempt)))
            namespace, name, task, waiting = row.namespace, row.name, row.task, q.queued
        if tr.state.phase != before.phase or tr.state.reason != before.reason:
            log.info(
                "run %s/%s (%s): %s -> %s (%s: %s)",
                namespace,
                name,
                run_id,
                before.phase,
                tr.state.phase,
                tr.state.reason,
                tr.state.message,
            )
        metrics.transition(namespace, task, before, tr.state, event)
        applied = Applied(
            run_id=run_id, queue=queue, transition=tr, before=before, grant=grant, waiting=waiting
        )
        self._committed(applied)
        return applied


async def _ended(s: AsyncSession, row: t.Run, before: m.RunState) -> None:
    """What a run's end changes for other runs, in the same transaction (so no crash in
    between can strand a parent or leave a child running): a parent waiting for this
    child resumes; a canceled run's children are canceled; a waiting run's wait closes."""
    if row.parent_run_id is not None:
        await journal.child_ended(s, row)
    if row.phase == m.Phase.CANCELED:
        await journal.cancel_children(s, row.id)
    if before.phase is m.Phase.WAITING:
        await journal.close_waits(s, row.id)
