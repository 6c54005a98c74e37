"""The controller: the leader's work, wired together.

- Watch events (kopf's Run/Task/Queue/Schedule handlers, the pod watch) only put keys on
  work queues: run ids on ``runs``, queue names on ``queues``, Run uids on ``intake``,
  Schedule keys on ``schedules`` (:mod:`.schedules` fires them from their timers).
- A worker reconciles one run (:meth:`Controller.reconcile`): it reads the row and the
  pod and applies what the state calls for, through the engine's transitions
  (:mod:`.transitions`), the attempts (:mod:`.attempts`) or intake (:mod:`.intake`).
  Any error puts the run back with a capped back-off; nothing is fire-and-forget.
- Timers in PostgreSQL (:mod:`.timers`) and the periodic resync (:mod:`.resync`) add
  keys too, so a lost event or a lost process costs time, never a run.

One Controller lives for one leadership term (:meth:`run` until cancelled); a replica
that is not the leader has none and ignores events (the next leader's first resync
looks at everything).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask import metrics, pods
from kubetask.admission import Admission
from kubetask.control.attempts import Attempts
from kubetask.control.catalogue import Catalogue, pinned
from kubetask.control.intake import Intake
from kubetask.control.podindex import PodIndex
from kubetask.control.resync import TERMINAL_NAMES, Resync
from kubetask.control.schedules import SCHEDULE, Schedules
from kubetask.control.status import StatusSync
from kubetask.control.timers import QUEUE, RUN, TimerLoop, clear_timer, set_run_timer, set_timer, utcnow
from kubetask.control.transitions import Applied, Transitions
from kubetask.control.workqueue import WorkQueue
from kubetask.engine import machine as m
from kubetask.kube import Kube
from kubetask.settings import Settings
from kubetask.spec import RetrySpec, TaskSpec
from kubetask.store import journal
from kubetask.store import tables as t

log = logging.getLogger("kubetask.controller")


class Controller:
    def __init__(self, *, sessions: async_sessionmaker[AsyncSession], kube: Kube, settings: Settings) -> None:
        self.sessions = sessions
        self.kube = kube
        self.settings = settings
        #: A granted run's timer: the earliest moment its pod could be late starting.
        self.start_deadline = timedelta(
            seconds=min(
                settings.unschedulable_timeout_seconds,
                settings.image_pull_timeout_seconds,
                settings.pod_start_timeout_seconds,
            )
        )
        self.admission = Admission(sessions, start_deadline=self.start_deadline)
        self.runs = WorkQueue(name="runs")
        self.queues = WorkQueue(name="queues")
        self.intake_queue = WorkQueue(name="intake")
        self.catalogue = Catalogue(
            kube=kube, admission=self.admission, settings=settings, queue_changed=self.queues.add
        )
        self.status = StatusSync(
            sessions=sessions,
            kube=kube,
            admission=self.admission,
            queue_known=lambda ns, name: (ns, name) in self.catalogue.queues,
        )
        self.transitions = Transitions(
            sessions=sessions,
            admission=self.admission,
            retry_for=self.retry_for,
            ttl_for=self.ttl_for,
            infra_limit=settings.infra_retry_limit,
            committed=self._committed,
        )
        self.index = PodIndex(mine=self.mine, changed=self.runs.add, scopes=self.kube.scopes)
        self.attempts = Attempts(
            sessions=sessions,
            kube=kube,
            settings=settings,
            catalogue=self.catalogue,
            index=self.index,
            apply=self.transitions.apply,
            wake=lambda due: self.timers.wake(due),
        )
        self.intake = Intake(
            sessions=sessions,
            catalogue=self.catalogue,
            settings=settings,
            apply=self.transitions.apply,
            later=self.runs.add_after,
        )
        self.timers = TimerLoop(sessions, fire=self._fire, namespaces=settings.namespaces)
        self.schedules = Schedules(
            sessions=sessions,
            kube=kube,
            settings=settings,
            intake=self.intake,
            apply=self.transitions.apply,
            run_recorded=self.runs.add,
            wake=lambda due: self.timers.wake(due),
        )
        self.resync = Resync(self)
        #: Run uid -> (run id, generation handled): a watch event of a Run whose spec did
        #: not change (our own status patch, echoed) costs no database query.
        self._uids: dict[str, tuple[str, Any]] = {}
        #: Latest event body per Run uid waiting on the intake queue.
        self._bodies: dict[str, tuple[str, dict[str, Any]]] = {}
        #: Runs whose timer fired and whose reconcile has not run yet.
        self._fired: set[str] = set()
        #: Queues whose rate-limit timer fired (admission clears or moves it).
        self._fired_queues: set[str] = set()
        self.ready = asyncio.Event()

    # ---- small helpers -------------------------------------------------------------------

    def mine(self, namespace: str) -> bool:
        """Whether this operator watches ``namespace`` (all of them when none are set)."""
        return not self.settings.namespaces or namespace in self.settings.namespaces

    def retry_for(self, row: t.Run) -> RetrySpec:
        """The retry policy of the Task version the run resolved against (a Task edited
        since does not change it), else of the Task as it is."""
        info = self.catalogue.tasks.get((row.namespace, row.task))
        current = info.spec if info else TaskSpec()
        return pinned(row.task_version, current, self.settings.runner_image).spec.retry

    def ttl_for(self, row: t.Run) -> int | None:
        """ttlSecondsAfterFinished: the Run's, else its Task's, else the operator's."""
        if row.ttl_seconds is not None:
            return row.ttl_seconds
        info = self.catalogue.tasks.get((row.namespace, row.task))
        if info is not None and info.spec.ttl_seconds_after_finished is not None:
            return info.spec.ttl_seconds_after_finished
        return self.settings.ttl_seconds_after_finished

    def remember(self, uid: str, run_id: str, generation: Any) -> None:
        self._uids.setdefault(uid, (run_id, generation))

    def _fire(self, kind: str, key: str) -> None:
        if kind == RUN:
            self._fired.add(key)
            self.runs.add(key)
        elif kind == QUEUE:  # a rate-limited queue may start a run again
            self._fired_queues.add(key)
            self.queues.add(key)
        elif kind == SCHEDULE and self.mine(key.split("/", 1)[0]):
            self.schedules.queue.add(key)

    def _committed(self, applied: Applied) -> None:
        tr = applied.transition
        if applied.queue_changed:
            self.status.touch_queue(applied.queue)
        if applied.admit:
            self.queues.add(applied.queue)
        if applied.wake_at is not None:
            self.timers.wake(applied.wake_at)
        self.status.touch(applied.run_id)
        if tr.state.terminal and not applied.before.terminal:
            self.schedules.run_ended(applied.run_id)
        if applied.grant is not None:
            self.attempts.tokens[(applied.run_id, applied.grant.attempt)] = applied.grant.token
            self.timers.wake(utcnow() + self.start_deadline)
        if applied.grant is not None or any(isinstance(a, m.DeletePod) for a in tr.actions):
            # Kubernetes has to follow (create or delete a pod): the reconcile does it. An
            # ended attempt's pod is deleted by the reconcile that recorded the end; the
            # TTL is the run's timer, set by the transition.
            self.runs.add(applied.run_id)

    # ---- the leader's term ---------------------------------------------------------------

    async def run(self) -> None:
        """Everything the leader does, until cancelled (leadership lost or shutdown)."""
        watch = asyncio.create_task(
            self.kube.watch_pods(pods.POD_SELECTOR, self.index.on_event, self.index.on_relist),
            name="pod-watch",
        )
        parts: list[asyncio.Task[Any]] = [watch]
        try:
            while not self.index.synced:  # the first list of pods, before judging any attempt
                if watch.done():
                    watch.result()
                await asyncio.sleep(0.05)
            await self.resync.once(initial=True)
            timeout = self.settings.work_timeout_seconds
            parts += [
                asyncio.create_task(
                    self.runs.run_workers(self.reconcile, workers=self.settings.workers, item_timeout=timeout)
                ),
                asyncio.create_task(self.queues.run_workers(self.admit, workers=2, item_timeout=timeout)),
                asyncio.create_task(
                    self.intake_queue.run_workers(self._intake, workers=4, item_timeout=timeout)
                ),
                asyncio.create_task(self.status.run(workers=4, item_timeout=timeout)),
                asyncio.create_task(
                    self.schedules.queue.run_workers(
                        self.schedules.reconcile, workers=2, item_timeout=timeout
                    )
                ),
                asyncio.create_task(self.timers.run(), name="timers"),
                asyncio.create_task(self.resync.loop(), name="resync"),
                asyncio.create_task(
                    metrics.LiveGauges(self.sessions, list(self.settings.namespaces)).loop(), name="metrics"
                ),
            ]
            self.ready.set()
            log.info(
                "leading: %d live attempt pod(s) known, resync every %.0fs",
                len(self.index),
                self.settings.resync_seconds,
            )
            await asyncio.gather(*parts)
        finally:
            self.ready.clear()
            for q in (self.runs, self.queues, self.intake_queue, self.schedules.queue):
                q.close()
            self.status.close()
            for part in parts:
                part.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*parts, return_exceptions=True)

    # ---- events (handlers call these) ----------------------------------------------------

    async def on_run_event(self, kind: str, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        if not self.mine(meta["namespace"]):
            return
        uid = meta["uid"]
        if kind != "DELETED":
            known = self._uids.get(uid)
            if known is not None and known[1] == meta.get("generation"):
                return  # no spec change (e.g. our own status patch coming back)
            status = body.get("status") or {}
            if known is None and status.get("runId") and status.get("phase") in TERMINAL_NAMES:
                self.remember(uid, status["runId"], meta.get("generation"))
                return  # finished (seen again at a relist): nothing can change it
        self._bodies[uid] = (kind, body)
        self.intake_queue.add(uid)

    async def _intake(self, uid: str) -> None:
        item = self._bodies.get(uid)
        if item is None:
            return
        kind, body = item
        known = self._uids.get(uid)
        if kind != "DELETED" and known is not None and known[1] == body["metadata"].get("generation"):
            # Handled since it was queued (the first resync records every Run it lists).
            if self._bodies.get(uid) is item:
                self._bodies.pop(uid, None)
            return
        if kind == "DELETED":
            self._uids.pop(uid, None)
            run_id = await self.mark_deleted(uid)
        else:
            run_id = await self.intake.record(body)
            if (body.get("spec") or {}).get("cancel"):
                async with self.sessions.begin() as s:
                    await s.execute(
                        update(t.Run)
                        .where(t.Run.id == run_id, t.Run.cancel_requested.is_(False))
                        .values(cancel_requested=True)
                    )
            self._uids[uid] = (run_id, body["metadata"].get("generation"))
        if self._bodies.get(uid) is item:  # a newer event arrived meanwhile: keep it
            self._bodies.pop(uid, None)
        if run_id is not None:
            self.runs.add(run_id)

    async def mark_deleted(self, uid: str) -> str | None:
        async with self.sessions.begin() as s:
            return (
                await s.execute(
                    update(t.Run).where(t.Run.uid == uid).values(resource_deleted=True).returning(t.Run.id)
                )
            ).scalar_one_or_none()

    async def on_task_event(self, kind: str, body: dict[str, Any]) -> None:
        if not self.mine(body["metadata"]["namespace"]):
            return
        info = await self.catalogue.on_task_event(kind, body)
        if info is None:
            return
        async with self.sessions() as s:
            waiting = (
                await s.execute(
                    select(t.Run.id).where(
                        t.Run.namespace == info.namespace,
                        t.Run.task == info.name,
                        t.Run.phase == m.Phase.PENDING,
                    )
                )
            ).scalars()
            for run_id in waiting:
                self.runs.add(run_id)

    async def on_schedule_event(self, kind: str, body: dict[str, Any]) -> None:
        if self.mine(body["metadata"]["namespace"]):
            self.schedules.on_event(kind, body)

    async def on_queue_event(self, kind: str, body: dict[str, Any]) -> None:
        if not self.mine(body["metadata"]["namespace"]):
            return
        await self.catalogue.on_queue_event(kind, body)
        meta = body["metadata"]
        self.status.touch_queue(f"{meta['namespace']}/{meta['name']}")

    # ---- work ----------------------------------------------------------------------------

    async def admit(self, queue: str) -> None:
        while True:
            grants = await self.admission.admit(queue, retry_for=self.retry_for)
            for grant in grants:
                self.attempts.tokens[(grant.run_id, grant.attempt)] = grant.token
                self.timers.wake(utcnow() + self.start_deadline)
                self.status.touch(grant.run_id)
                self.runs.add(grant.run_id)
            if len(grants) < 64:
                break
        # A rate limit stopped the cycle: a timer in PostgreSQL brings it back when the
        # bucket allows the next start (set only then, cleared only after it fired).
        fired = queue in self._fired_queues
        self._fired_queues.discard(queue)
        due = self.admission.rate_waits.get(queue)
        if due is not None:
            async with self.sessions.begin() as s:
                await set_timer(s, kind=QUEUE, key=queue, due_at=due)
            self.timers.wake(due)
        elif fired:
            async with self.sessions.begin() as s:
                await clear_timer(s, kind=QUEUE, key=queue)
        self.status.touch_queue(queue)

    async def reconcile(self, run_id: str) -> None:
        """Look at one run and do what its state calls for. Idempotent; safe to repeat."""
        fired = run_id in self._fired
        self._fired.discard(run_id)
        async with self.sessions() as s:
            found = (
                await s.execute(
                    select(t.Run, t.Attempt)
                    .outerjoin(
                        t.Attempt, and_(t.Attempt.run_id == t.Run.id, t.Attempt.number == t.Run.attempt)
                    )
                    .where(t.Run.id == run_id)
                )
            ).one_or_none()
            # A Waiting run's wait, read in the same transaction (no lock): most often the
            # run still waits and there is nothing to do (see _still_waiting).
            wait = None
            if found is not None and found[0].phase == m.Phase.WAITING.value and not fired:
                wait = (
                    await s.execute(
                        select(t.Checkpoint.status, t.Checkpoint.due_at).where(
                            t.Checkpoint.run_id == run_id, t.Checkpoint.key == (found[0].wait_key or "")
                        )
                    )
                ).one_or_none()
        row, att = found if found is not None else (None, None)
        if row is None or not self.mine(row.namespace):
            return
        phase = m.Phase(row.phase)
        if phase not in m.TERMINAL:
            if row.resource_deleted:
                await self.transitions.apply(
                    run_id, m.CancelRequested("RunDeleted", "the Run resource was deleted")
                )
                return
            if row.cancel_requested:
                why = "spec.cancel was set to true"
                if row.parent_run_id is not None:
                    why += f", or its parent run {row.parent_run_id} was canceled"
                await self.transitions.apply(run_id, m.CancelRequested("Canceled", why))
                return
        live = att if att is not None and att.finished_at is None else None
        if live is not None:
            await self.attempts.clean_up(row, live.number)
            await self.attempts.reconcile(row, live, fresh=fired)
            return
        if phase is m.Phase.PENDING:
            await self.intake.resolve(row)
        elif phase is m.Phase.QUEUED:
            if row.expires_at is not None and row.attempt == 0:
                if utcnow() >= row.expires_at:
                    await self.transitions.apply(run_id, m.TtlExpired())
                    return
                if fired:
                    await self._set_timer(run_id, row.expires_at)
            elif fired:
                await self._set_timer(run_id, None)
            self.queues.add(row.queue)
        elif phase is m.Phase.WAITING:
            if fired or not _still_waiting(row, wait):
                await self.transitions.apply(run_id, _wait_over)
        elif phase in (m.Phase.RETRYING, m.Phase.DELAYED):
            if row.next_attempt_at is None or row.next_attempt_at <= utcnow():
                await self.transitions.apply(run_id, m.BackoffElapsed())
            elif fired:
                await self._set_timer(run_id, row.next_attempt_at)
        elif phase in m.TERMINAL:
            await self.attempts.clean_up(row, None)
            await self._ttl(row, fired=fired)
        elif fired:  # Running without a live attempt cannot be; nothing to wait for
            await self._set_timer(run_id, None)

    async def _ttl(self, row: t.Run, *, fired: bool) -> None:
        """Delete a finished Run resource once its TTL has passed (its record stays).
        The transition to the end set the run's timer to that moment."""
        ttl = self.ttl_for(row)
        if row.resource_deleted or ttl is None or row.finished_at is None:
            if fired:
                await self._set_timer(row.id, None)
            return
        due = row.finished_at + timedelta(seconds=ttl)
        if utcnow() >= due:
            log.info("run %s/%s: deleting the Run resource (finished %ss ago)", row.namespace, row.name, ttl)
            await self.kube.delete_object("runs", row.namespace, row.name, uid=row.uid)
            await self._set_timer(row.id, None)
        elif fired or row.wake_at != due:
            await self._set_timer(row.id, due)

    async def _set_timer(self, run_id: str, due: datetime | None) -> None:
        async with self.sessions.begin() as s:
            await set_run_timer(s, run_id, due)
        if due is not None:
            self.timers.wake(due)


def _still_waiting(row: t.Run, wait: Any) -> bool:
    """Whether a Waiting run's wait (its checkpoint's status and due time) is open and not
    due, with the run's timer at its deadline: then its reconcile has nothing to change,
    and takes no lock. A transition locks the run's queue row, which serialises every
    transition of the queue, and a new leader's first resync looks at every waiting run:
    with 10,000 waiting in one queue, that start-up took minutes (``bench.durable``).
    Whatever satisfies a wait also makes the run's timer due (store/journal.py), so the
    run's next reconcile is a fired one, which never skips."""
    if wait is None:
        return False
    status, due = wait
    return bool(status == journal.WAITING and row.wake_at == due and (due is None or due > utcnow()))


async def _wait_over(s: AsyncSession, row: t.Run) -> m.Event | None:
    """A Waiting run's reconcile, inside its transition's transaction: resume it when
    its wait was satisfied or its time came (a sleep's end, a timeout); else set its timer
    to the wait's deadline (none for a child without a timeout: the child's end wakes it)."""
    if row.phase != m.Phase.WAITING:
        return None
    cp = (
        await s.execute(
            select(t.Checkpoint)
            .where(t.Checkpoint.run_id == row.id, t.Checkpoint.key == (row.wait_key or ""))
            .with_for_update()
        )
    ).scalar_one_or_none()
    if cp is None:  # cannot be (the wait is written before the run suspends): do not strand it
        return m.WaitSatisfied("its wait is not in the journal any more")
    journal.expire(cp, utcnow())
    if cp.status == journal.WAITING:
        row.wake_at = cp.due_at
        return None
    outcome = {journal.TIMED_OUT: "timed out", journal.CANCELED: "was canceled"}.get(cp.status, "is over")
    return m.WaitSatisfied(f"{journal.describe(cp)} {outcome}")
