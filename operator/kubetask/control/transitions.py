"""The one writer of a run's state: apply an engine event in one PostgreSQL transaction.

Every change of phase goes through :meth:`Transitions.apply`: it locks the run's queue
row, then the run row (the admission lock order), computes the engine's step, saves
it, carries out the queue actions (enqueue, dequeue, release) and sets or clears the
run's timer, all in the same transaction. What must happen in Kubernetes afterwards is
not done here: the run is put back on the work queue and its reconcile does it, so a
crash after commit loses nothing (the reconcile is level-triggered).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.admission import Admission
from kubetask.control.timers import RUN, clear_timer, set_timer, utcnow
from kubetask.engine import machine as m
from kubetask.spec import RetrySpec
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

    @property
    def admit(self) -> bool:
        """The queue may grant a slot now (a run joined it or a slot was freed)."""
        return any(isinstance(a, m.Enqueue | m.ReleaseSlot) for a in self.transition.actions)

    @property
    def queue_changed(self) -> bool:
        return any(isinstance(a, m.Enqueue | m.Dequeue | m.ReleaseSlot) for a in self.transition.actions)

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
        infra_limit: int,
        committed: Callable[[Applied], None],
    ) -> None:
        self.sessions = sessions
        self.admission = admission
        self.retry_for = retry_for
        self.infra_limit = infra_limit
        #: Called after each commit that changed something (enqueue work, wake timers...).
        self._committed = committed

    async def apply(self, run_id: str, event: m.Event | EventSource) -> Applied | None:
        """Apply one event to a run in one transaction.

        ``event`` may be a function that makes the event inside that transaction (with the
        queue and run rows locked) and records what caused it, so the cause and the
        transition commit together or not at all. It returns None when there is nothing
        to apply (the cause was recorded before). Returns None if nothing changed."""
        now = utcnow()
        async with self.sessions.begin() as s:
            queue = (await s.execute(select(t.Run.queue).where(t.Run.id == run_id))).scalar_one_or_none()
            if queue is None:
                return None
            async with self.admission.locked_queue(s, queue) as q:
                row = (
                    await s.execute(select(t.Run).where(t.Run.id == run_id).with_for_update())
                ).scalar_one()
                if callable(event):
                    made = await event(s, row)
                    if made is None:
                        return None
                    event = made
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
                wake: datetime | None = None
                for action in tr.actions:
                    if isinstance(action, m.Enqueue):
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
                    elif isinstance(action, m.WakeAt):
                        wake = action.at
                # The run's timer follows its state: a wait sets it, anything else clears
                # it (a later reconcile sets whatever else it needs, e.g. a pod deadline).
                if wake is not None:
                    await set_timer(s, kind=RUN, key=run_id, due_at=wake)
                elif tr.state.phase != before.phase:
                    await clear_timer(s, kind=RUN, key=run_id)
                namespace, name = row.namespace, row.name
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
        applied = Applied(run_id=run_id, queue=queue, transition=tr, before=before)
        self._committed(applied)
        return applied
