"""The engine's driver: turns Kubernetes events into state-machine events, applies them
in PostgreSQL transactions, and carries out the resulting actions.

The kopf handlers in :mod:`kubetask.reconcilers` only call into this class. Rules:

- PostgreSQL is the source of truth for a run's state; the Run's ``status`` is a
  projection written after each transition (:class:`StatusSync`).
- Every transition is one transaction that locks the run's queue row, then the run row
  (the admission lock order), so replicas and restarts cannot interleave badly.
- Side effects on Kubernetes happen after commit and are idempotent (deterministic pod
  names; deleting what is gone is fine), so a crash in between is repaired by
  :meth:`Controller.resync` on the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes_asyncio.client.rest import ApiException
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask import pods
from kubetask.admission import Admission, QueueLimits
from kubetask.admission.slots import hash_token
from kubetask.engine import machine as m
from kubetask.engine.outcomes import PodEnd, Report, classify, pod_end
from kubetask.kube import Kube
from kubetask.settings import Settings
from kubetask.spec import MAX_PAYLOAD_BYTES, MAX_STATUS_OUTPUT_BYTES, QueueSpec, RetrySpec, RunSpec, TaskSpec
from kubetask.store import tables as t
from kubetask.store.runs import attempt_view, iso, load_state, save_state

log = logging.getLogger("kubetask.controller")

#: Makes a run's next event inside the transition's transaction (see Controller.apply).
EventSource = Callable[[AsyncSession, t.Run], Awaitable[m.Event | None]]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_run_id() -> str:
    return "run_" + secrets.token_hex(10)


def queue_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


@dataclass(frozen=True)
class TaskInfo:
    name: str
    namespace: str
    uid: str
    spec: TaskSpec

    @property
    def queue(self) -> str:
        return self.spec.queue_name(self.name)

    def owner(self) -> dict[str, Any]:
        return {"apiVersion": "kubetask.dev/v1alpha1", "kind": "Task", "name": self.name, "uid": self.uid}


class Controller:
    def __init__(self, *, sessions: async_sessionmaker[AsyncSession], kube: Kube, settings: Settings) -> None:
        self.sessions = sessions
        self.kube = kube
        self.settings = settings
        self.admission = Admission(sessions, pod_name=pods.pod_name)
        self.tasks: dict[tuple[str, str], TaskInfo] = {}
        self.queues: dict[tuple[str, str], QueueSpec] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self._status = StatusSync(self)
        self._configmaps: set[str] = set()
        self._task_status: dict[tuple[str, str], dict[str, Any]] = {}
        self._task_generation: dict[tuple[str, str], Any] = {}

    # ---- helpers -----------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._bg.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background step failed", exc_info=task.exception())

    async def close(self) -> None:
        for h in self._timers.values():
            h.cancel()
        pending = [*self._bg, *self._status.tasks()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def mine(self, namespace: str) -> bool:
        """Whether this operator watches ``namespace`` (all of them when none are set)."""
        return not self.settings.namespaces or namespace in self.settings.namespaces

    def retry_for(self, row: t.Run) -> RetrySpec:
        info = self.tasks.get((row.namespace, row.task))
        return info.spec.retry if info else RetrySpec()

    def wake_at(self, run_id: str, at: datetime, what: str = "backoff") -> None:
        loop = asyncio.get_running_loop()
        if (old := self._timers.pop(run_id, None)) is not None:
            old.cancel()
        delay = max(0.0, (at - utcnow()).total_seconds())

        def fire() -> None:
            self._timers.pop(run_id, None)
            if what == "backoff":
                self.spawn(self.apply(run_id, m.BackoffElapsed()))
            else:
                self.spawn(self.recheck_pending(run_id))

        self._timers[run_id] = loop.call_later(delay, fire)

    # ---- the transition ------------------------------------------------------------------------

    async def apply(self, run_id: str, event: m.Event | EventSource) -> m.Transition | None:
        """Apply one event to a run in one transaction, then carry out the actions.

        ``event`` may be a function that makes the event inside that transaction (with the
        queue and run rows locked) and records what caused it, so the cause and the
        transition commit together or not at all. It returns None when there is nothing
        to apply (the cause was recorded before)."""
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
                tr = m.step(before, event, now=now, retry=self.retry_for(row), rand=random.random)
                if tr.state == before and not tr.actions:
                    return tr
                save_state(row, tr.state, now=now)
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
                if tr.state.terminal:
                    await self._finish_duplicates(s, row)
                namespace, name = row.namespace, row.name
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
        admit = False
        for action in tr.actions:
            if isinstance(action, m.DeletePod):
                await self.kube.delete_pod(namespace, pods.pod_name(name, action.attempt), grace=5)
            elif isinstance(action, m.WakeAt):
                self.wake_at(run_id, action.at)
            elif isinstance(action, m.Enqueue | m.ReleaseSlot):
                admit = True
            if isinstance(action, m.Enqueue | m.Dequeue | m.ReleaseSlot):
                self._status.touch_queue(queue)
        if tr.state.terminal and (timer := self._timers.pop(run_id, None)) is not None:
            timer.cancel()
        self._status.touch(run_id)
        if admit:
            await self.admit(queue)
        return tr

    async def _finish_duplicates(self, s: AsyncSession, row: t.Run) -> None:
        """Runs deduplicated onto this one (idempotencyKey) mirror its end."""
        dups = (
            (
                await s.execute(
                    update(t.Run)
                    .where(t.Run.original_run_id == row.id, t.Run.id != row.id)
                    .values(
                        phase=row.phase,
                        finished_at=utcnow(),
                        reason="Deduplicated",
                        message=f"same idempotencyKey as run {row.name} ({row.id}), which ended {row.phase}",
                    )
                    .returning(t.Run.id)
                )
            )
            .scalars()
            .all()
        )
        for dup in dups:
            self._status.touch(dup)

    # ---- admission -------------------------------------------------------------------------------

    async def admit(self, queue: str) -> None:
        while True:
            grants = await self.admission.admit(queue, retry_for=self.retry_for)
            for grant in grants:
                self._status.touch(grant.run_id)
                self.spawn(self.start_attempt(grant.run_id, grant.attempt, grant.token))
            if len(grants) < 64:
                break
        self._status.touch_queue(queue)

    async def start_attempt(self, run_id: str, attempt: int, token: str | None) -> None:
        """Create the token Secret (and source ConfigMap) and the attempt's pod."""
        async with self.sessions() as s:
            row = await s.get(t.Run, run_id)
            if row is None or row.attempt != attempt:
                return
            if row.phase != m.Phase.RUNNING:
                # Canceled between the grant and now: no pod will exist, free the slot.
                gone = pod_end(None)
                assert gone is not None
                await self.end_attempt(run_id, attempt, gone)
                return
            ns, name, task_name = row.namespace, row.name, row.task
            max_attempts, uid = row.max_attempts, row.uid
        info = await self.task_info(ns, task_name)
        if info is None:
            await self.end_attempt(
                run_id,
                attempt,
                PodEnd(None, "TaskNotFound", f"Task {task_name} was deleted"),
                outcome=m.AttemptEnded(
                    attempt,
                    m.Outcome.ABORTED,
                    "TaskNotFound",
                    m.RunError("TaskNotFound", f"Task {task_name} no longer exists"),
                ),
            )
            return
        run_body = {"metadata": {"name": name, "namespace": ns, "uid": uid}}
        if token is None:  # resuming after a restart: the plaintext is gone, issue a new one
            token = secrets.token_urlsafe(32)
            async with self.sessions.begin() as s:
                await s.execute(
                    update(t.Attempt)
                    .where(t.Attempt.run_id == run_id, t.Attempt.number == attempt)
                    .values(token_hash=hash_token(token))
                )
            await self.kube.replace_secret(pods.token_secret(run=run_body, attempt=attempt, token=token))
        else:
            await self.kube.create(pods.token_secret(run=run_body, attempt=attempt, token=token))
        if info.spec.source is not None:
            cm = pods.source_configmap_name(info.name, info.spec.source)
            if cm not in self._configmaps:
                await self.kube.create(
                    pods.source_configmap(
                        task_name=info.name, namespace=ns, source=info.spec.source, task_owner=info.owner()
                    )
                )
                self._configmaps.add(cm)
        pod = pods.attempt_pod(
            run=run_body,
            run_id=run_id,
            task_name=info.name,
            task=info.spec,
            queue=info.queue,
            attempt=attempt,
            max_attempts=max_attempts,
            api_url=self.settings.api_url,
            default_image=self.settings.runner_image,
            image_pull_policy=self.settings.image_pull_policy,
        )
        try:
            created = await self.kube.create(pod)
        except ApiException as e:
            message = _api_message(e)
            outcome = m.Outcome.ABORTED if e.status in (400, 403, 422) else m.Outcome.FAILED
            await self.end_attempt(
                run_id,
                attempt,
                PodEnd(None, "PodRejected", message),
                outcome=m.AttemptEnded(attempt, outcome, "PodRejected", m.RunError("PodRejected", message)),
            )
            return
        if created is None:
            created = await self.kube.get_pod(ns, pod["metadata"]["name"])
        if created is not None:
            async with self.sessions.begin() as s:
                await s.execute(
                    update(t.Attempt)
                    .where(t.Attempt.run_id == run_id, t.Attempt.number == attempt)
                    .values(pod_uid=created["metadata"]["uid"])
                )

    # ---- pods ------------------------------------------------------------------------------------

    async def on_pod_event(self, kind: str, pod: dict[str, Any]) -> None:
        if not self.mine(pod["metadata"]["namespace"]):
            return
        labels = pod["metadata"].get("labels") or {}
        run_id = labels.get(pods.LABEL_RUN_ID)
        try:
            attempt = int(labels.get(pods.LABEL_ATTEMPT, ""))
        except ValueError:
            return
        if not run_id:
            return
        end = pod_end(pod)
        if end is None and kind == "DELETED":
            end = pod_end(None)
        if end is None:
            return
        await self.end_attempt(run_id, attempt, end, pod=pod)

    async def end_attempt(
        self,
        run_id: str,
        attempt: int,
        end: PodEnd,
        *,
        pod: dict[str, Any] | None = None,
        outcome: m.AttemptEnded | None = None,
    ) -> None:
        """Record how an attempt ended (once) and move the run, in one transaction.

        One transaction matters: were the attempt's end committed first and the process
        killed before the run moved, the restarted operator would find the attempt ended
        and the run still Running, holding its queue slot for ever."""

        async def record(s: AsyncSession, _run: t.Run) -> m.Event | None:
            row = (
                await s.execute(
                    select(t.Attempt)
                    .where(t.Attempt.run_id == run_id, t.Attempt.number == attempt)
                    .with_for_update()
                )
            ).scalar_one_or_none()
            if row is None or row.finished_at is not None:
                return None
            ev = outcome or classify(attempt=attempt, end=end, report=_report(row.report))
            row.finished_at = utcnow()
            row.exit_code = end.exit_code
            row.reason = ev.reason[:64]
            row.error = {"type": ev.error.type, "message": ev.error.message} if ev.error else None
            if pod is not None and row.started_at is None:
                row.started_at = _pod_started(pod)
            return ev

        # Pod events repeat (the end, then the deletion, then DELETED): an end already
        # recorded is answered by one unlocked read, without taking the queue's lock.
        # finished_at is never unset, so a None here is re-checked under the locks.
        async with self.sessions() as s:
            finished = (
                await s.execute(
                    select(t.Attempt.finished_at).where(
                        t.Attempt.run_id == run_id, t.Attempt.number == attempt
                    )
                )
            ).scalar_one_or_none()
        if finished is None:
            await self.apply(run_id, record)
        if pod is not None and pod["metadata"].get("deletionTimestamp") is None:
            # Logs and output are in PostgreSQL; an ended pod only costs the node.
            ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
            await self.kube.delete_pod(ns, name, grace=0)
            await self.kube.delete_secret(ns, f"{name}-token")

    # ---- runs ------------------------------------------------------------------------------------

    async def on_run_event(self, kind: str, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        if kind == "DELETED":
            await self.run_deleted(meta["uid"])
            return
        async with self.sessions() as s:
            row = (await s.execute(select(t.Run).where(t.Run.uid == meta["uid"]))).scalar_one_or_none()
        if row is None:
            await self.run_created(body)
            return
        spec = body.get("spec") or {}
        if spec.get("cancel") and row.phase not in m.TERMINAL:
            await self.apply(row.id, m.CancelRequested("Canceled", "spec.cancel was set to true"))
        elif (body.get("status") or {}).get("phase") != row.phase:
            self._status.touch(row.id)

    async def run_created(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        run_id = new_run_id()
        raw = body.get("spec") or {}
        payload_bytes = len(json.dumps(raw.get("payload") or {}, separators=(",", ":")).encode())
        rejected: m.Rejected | None = None
        try:
            spec = RunSpec.model_validate(raw)
        except ValidationError as e:
            spec = RunSpec(task=str(raw.get("task") or "unknown"))
            rejected = m.Rejected("InvalidSpec", f"spec is invalid: {e.errors()[0]['msg']}")
        if payload_bytes > MAX_PAYLOAD_BYTES:
            rejected = m.Rejected(
                "PayloadTooLarge",
                f"spec.payload is {payload_bytes} bytes; the limit is "
                f"{MAX_PAYLOAD_BYTES} bytes: put large inputs in object storage and pass a reference",
            )
        info = self.tasks.get((ns, spec.task)) or await self.task_info(ns, spec.task)
        queue = queue_key(ns, info.queue if info else spec.task)
        now = utcnow()
        async with self.sessions.begin() as s:
            res = await s.execute(
                pg_insert(t.Run)
                .values(
                    id=run_id,
                    namespace=ns,
                    name=name,
                    uid=meta["uid"],
                    task=spec.task,
                    queue=queue,
                    concurrency_key=spec.concurrency_key,
                    idempotency_key=spec.idempotency_key,
                    priority=spec.priority,
                    arrival=arrival_order(meta),
                    tags=spec.tags,
                    payload=spec.payload if payload_bytes <= MAX_PAYLOAD_BYTES else {},
                    phase=m.Phase.PENDING.value,
                    attempt=0,
                    max_attempts=spec.max_attempts or (info.spec.retry.max_attempts if info else 0),
                    reason="Created",
                    message="",
                    created_at=_created(meta, now),
                )
                .on_conflict_do_nothing(index_elements=[t.Run.uid])
            )
            if res.rowcount == 0:  # type: ignore[attr-defined]
                return  # another event (or replica) recorded it first
            original = None
            if spec.idempotency_key and rejected is None:
                original = await self._claim_idempotency(s, ns, spec.task, spec.idempotency_key, run_id, now)
            if original is not None:
                orig = await s.get(t.Run, original)
                await s.execute(
                    update(t.Run)
                    .where(t.Run.id == run_id)
                    .values(
                        original_run_id=original,
                        phase=orig.phase if orig else m.Phase.SUCCEEDED.value,
                        finished_at=now if orig is None or orig.phase in m.TERMINAL else None,
                        reason="Deduplicated",
                        message=f"idempotencyKey {spec.idempotency_key!r} was already used by run "
                        f"{orig.name if orig else '?'} ({original}); this run does not execute",
                    )
                )
        if original is not None:
            self._status.touch(run_id)
            return
        if rejected is not None:
            await self.apply(run_id, rejected)
        elif info is None:
            await self.recheck_pending(run_id)
        elif spec.cancel:
            await self.apply(run_id, m.CancelRequested("Canceled", "created with spec.cancel: true"))
        else:
            await self.apply(
                run_id, m.TaskResolved(max_attempts=spec.max_attempts or info.spec.retry.max_attempts)
            )

    async def _claim_idempotency(
        self, s: AsyncSession, ns: str, task: str, key: str, run_id: str, now: datetime
    ) -> str | None:
        """Returns the original run's id if the key is taken and unexpired."""
        expires = now + timedelta(seconds=self.settings.idempotency_ttl_seconds)
        stmt = pg_insert(t.IdempotencyKey).values(
            namespace=ns, task=task, key=key, run_id=run_id, expires_at=expires
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.IdempotencyKey.namespace, t.IdempotencyKey.task, t.IdempotencyKey.key],
            set_={"run_id": run_id, "expires_at": expires},
            where=t.IdempotencyKey.expires_at < now,
        )
        await s.execute(stmt)
        owner = (
            await s.execute(
                select(t.IdempotencyKey.run_id).where(
                    t.IdempotencyKey.namespace == ns,
                    t.IdempotencyKey.task == task,
                    t.IdempotencyKey.key == key,
                )
            )
        ).scalar_one()
        return None if owner == run_id else owner

    async def recheck_pending(self, run_id: str) -> None:
        async with self.sessions() as s:
            row = await s.get(t.Run, run_id)
        if row is None or row.phase != m.Phase.PENDING:
            return
        info = await self.task_info(row.namespace, row.task)
        if info is not None:
            if queue_key(row.namespace, info.queue) != row.queue:
                async with self.sessions.begin() as s:
                    await s.execute(
                        update(t.Run)
                        .where(t.Run.id == run_id)
                        .values(queue=queue_key(row.namespace, info.queue))
                    )
            # max_attempts 0 means "from the Task", which was unknown when the run was created.
            await self.apply(
                run_id, m.TaskResolved(max_attempts=row.max_attempts or info.spec.retry.max_attempts)
            )
            return
        deadline = row.created_at + timedelta(seconds=self.settings.task_grace_seconds)
        if utcnow() >= deadline:
            await self.apply(
                run_id,
                m.Rejected(
                    "TaskNotFound",
                    f"Task {row.task!r} does not exist in namespace {row.namespace!r} (waited "
                    f"{self.settings.task_grace_seconds:.0f}s for it); create it, then create the Run again",
                ),
            )
        else:
            async with self.sessions.begin() as s:
                await s.execute(
                    update(t.Run)
                    .where(t.Run.id == run_id)
                    .values(
                        reason="TaskNotFound",
                        message=f"Task {row.task!r} not found in namespace {row.namespace!r}; waiting until "
                        f"{iso(deadline)} for it to appear",
                    )
                )
            self._status.touch(run_id)
            self.wake_at(run_id, deadline, what="pending")

    async def run_deleted(self, uid: str) -> None:
        async with self.sessions.begin() as s:
            row = (await s.execute(select(t.Run).where(t.Run.uid == uid))).scalar_one_or_none()
            if row is None:
                return
            row.resource_deleted = True
            run_id = row.id
        await self.apply(run_id, m.CancelRequested("RunDeleted", "the Run resource was deleted"))

    # ---- tasks and queues --------------------------------------------------------------------------

    async def task_info(self, namespace: str, name: str) -> TaskInfo | None:
        info = self.tasks.get((namespace, name))
        if info is not None:
            return info
        body = await self.kube.get_object("tasks", namespace, name)
        return self._index_task(body) if body else None

    def _index_task(self, body: dict[str, Any]) -> TaskInfo | None:
        meta = body["metadata"]
        try:
            spec = TaskSpec.model_validate(body.get("spec") or {})
        except ValidationError:
            return None
        info = TaskInfo(meta["name"], meta["namespace"], meta["uid"], spec)
        self.tasks[(info.namespace, info.name)] = info
        return info

    async def on_task_event(self, kind: str, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if kind == "DELETED":
            self.tasks.pop((ns, name), None)
            self._task_status.pop((ns, name), None)
            return
        known = self.tasks.get((ns, name))
        if known is not None and self._task_generation.get((ns, name)) == meta.get("generation"):
            return  # a status-only change (our own patch): nothing to do
        self._task_generation[(ns, name)] = meta.get("generation")
        try:
            TaskSpec.model_validate(body.get("spec") or {})
        except ValidationError as e:
            await self._patch_task_status(
                ns,
                name,
                {
                    "conditions": [_cond("Ready", False, "InvalidSpec", str(e.errors()[0]["msg"]))],
                    "observedGeneration": meta.get("generation"),
                },
            )
            return
        info = self._index_task(body)
        assert info is not None
        await self.configure_queue(ns, info.queue)
        await self.refresh_task_status(info, meta.get("generation"))
        async with self.sessions() as s:
            pending = (
                (
                    await s.execute(
                        select(t.Run.id).where(
                            t.Run.namespace == ns, t.Run.task == name, t.Run.phase == m.Phase.PENDING
                        )
                    )
                )
                .scalars()
                .all()
            )
        for run_id in pending:
            self.spawn(self.recheck_pending(run_id))

    async def refresh_task_status(self, info: TaskInfo, generation: int | None = None) -> None:
        """Write the Task's effective image, queue and limits (and a conflict, if any)."""
        conflict = self.queue_conflict(info)
        limits = await self.admission.limits(queue_key(info.namespace, info.queue))
        conds = [_cond("Ready", True, "Accepted", "the task is ready to run")]
        if conflict:
            conds.append(_cond("QueueConflict", True, "QueueResourceWins", conflict))
        previous = self._task_status.get((info.namespace, info.name)) or {}
        await self._patch_task_status(
            info.namespace,
            info.name,
            {
                "image": info.spec.image or self.settings.runner_image,
                "queue": info.queue,
                "concurrencyLimit": limits.concurrency_limit if limits else None,
                "perKeyConcurrencyLimit": limits.per_key_limit if limits else None,
                "observedGeneration": generation
                if generation is not None
                else previous.get("observedGeneration"),
                "conditions": conds,
            },
        )

    async def _patch_task_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        """Patch only what changed; a condition keeps its lastTransitionTime while its
        status stays the same (so our own patches do not trigger endless events)."""
        previous = self._task_status.get((ns, name))
        old_conds = {c["type"]: c for c in (previous or {}).get("conditions", [])}
        for cond in status.get("conditions", []):
            old = old_conds.get(cond["type"])
            if old is not None and old["status"] == cond["status"]:
                cond["lastTransitionTime"] = old["lastTransitionTime"]
        if status == previous:
            return
        self._task_status[(ns, name)] = status
        await self.kube.patch_status("tasks", ns, name, status)

    def queue_conflict(self, info: TaskInfo) -> str | None:
        qspec = self.queues.get((info.namespace, info.queue))
        inline = info.spec.queue
        if (
            qspec is None
            or inline is None
            or not (inline.concurrency_limit or inline.per_key_concurrency_limit)
        ):
            return None
        if (inline.concurrency_limit, inline.per_key_concurrency_limit) == (
            qspec.concurrency_limit,
            qspec.per_key_concurrency_limit,
        ):
            return None
        return (
            f"Queue {info.queue!r} sets concurrencyLimit={qspec.concurrency_limit}, "
            f"perKeyConcurrencyLimit={qspec.per_key_concurrency_limit}; the Task's inline queue limits "
            f"(concurrencyLimit={inline.concurrency_limit}, "
            f"perKeyConcurrencyLimit={inline.per_key_concurrency_limit}) are ignored"
        )

    async def configure_queue(self, ns: str, queue: str) -> None:
        """Set the queue's limits: a Queue resource wins over Tasks' inline settings
        (see :meth:`queue_conflict`); among Tasks, the last one seen with inline limits."""
        qspec = self.queues.get((ns, queue))
        inline = [
            i.spec.queue
            for i in self.tasks.values()
            if i.namespace == ns
            and i.queue == queue
            and i.spec.queue
            and (i.spec.queue.concurrency_limit or i.spec.queue.per_key_concurrency_limit)
        ]
        if qspec is not None:
            limits = QueueLimits(
                qspec.concurrency_limit, qspec.per_key_concurrency_limit, qspec.paused, "queue"
            )
        elif inline and inline[-1] is not None:
            limits = QueueLimits(
                inline[-1].concurrency_limit, inline[-1].per_key_concurrency_limit, False, "task"
            )
        else:
            limits = QueueLimits(source="default")
        key = queue_key(ns, queue)
        if await self.admission.limits(key) != limits:
            await self.admission.configure(key, limits)
            await self.admit(key)

    async def on_queue_event(self, kind: str, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if kind == "DELETED":
            self.queues.pop((ns, name), None)
        else:
            try:
                spec = QueueSpec.model_validate(body.get("spec") or {})
            except ValidationError:
                return
            if self.queues.get((ns, name)) == spec:
                return  # a status-only change (our own patch)
            self.queues[(ns, name)] = spec
        await self.configure_queue(ns, name)
        for info in list(self.tasks.values()):
            if info.namespace == ns and info.queue == name:
                await self.refresh_task_status(info)
        self._status.touch_queue(queue_key(ns, name))

    # ---- start-up --------------------------------------------------------------------------------------

    async def _delete_stray_pods(self, by_run: dict[tuple[str, int], dict[str, Any]]) -> None:
        """Delete pods still running for an attempt that is over: a previous process
        moved the run (canceled, timed out, deleted) and died before deleting the pod."""
        if not by_run:
            return
        async with self.sessions() as s:
            current = {
                r.id: (r.phase, r.attempt)
                for r in (
                    await s.execute(
                        select(t.Run.id, t.Run.phase, t.Run.attempt).where(
                            t.Run.id.in_({run_id for run_id, _ in by_run})
                        )
                    )
                ).all()
            }
        for (run_id, attempt), pod in by_run.items():
            meta = pod["metadata"]
            if (
                not self.mine(meta["namespace"])
                or run_id not in current
                or current[run_id] == (m.Phase.RUNNING, attempt)
            ):
                continue  # unknown to this database, or the attempt is the run's live one
            if meta.get("deletionTimestamp") is None and pod_end(pod) is None:
                log.info("deleting pod %s/%s: its attempt is over", meta["namespace"], meta["name"])
                await self.kube.delete_pod(meta["namespace"], meta["name"], grace=5)

    async def resync(self, live_pods: list[dict[str, Any]]) -> None:
        """Make PostgreSQL, the pods and the Runs agree after a (re)start."""
        for body in await self.kube.list_objects("tasks"):
            if self.mine(body["metadata"]["namespace"]):
                self._index_task(body)
        for body in await self.kube.list_objects("queues"):
            if not self.mine(body["metadata"]["namespace"]):
                continue
            with contextlib.suppress(ValidationError):
                self.queues[(body["metadata"]["namespace"], body["metadata"]["name"])] = (
                    QueueSpec.model_validate(body.get("spec") or {})
                )
        for ns, q in {(i.namespace, i.queue) for i in self.tasks.values()} | set(self.queues):
            await self.configure_queue(ns, q)
        live_uids = {r["metadata"]["uid"] for r in await self.kube.list_objects("runs")}
        by_run: dict[tuple[str, int], dict[str, Any]] = {}
        for pod in live_pods:
            labels = pod["metadata"].get("labels") or {}
            with contextlib.suppress(KeyError, ValueError):
                by_run[(labels[pods.LABEL_RUN_ID], int(labels[pods.LABEL_ATTEMPT]))] = pod
        async with self.sessions() as s:
            rows = (
                (await s.execute(select(t.Run).where(t.Run.phase.notin_([p.value for p in m.TERMINAL]))))
                .scalars()
                .all()
            )
            attempts = {
                (a.run_id, a.number): a
                for a in (await s.execute(select(t.Attempt).where(t.Attempt.finished_at.is_(None))))
                .scalars()
                .all()
            }
        for pod in live_pods:
            await self.on_pod_event("ADDED", pod)
        await self._delete_stray_pods(by_run)
        for row in rows:
            if not self.mine(row.namespace):
                continue  # another operator's (one database may serve several)
            if row.uid not in live_uids:
                await self.run_deleted(row.uid)
            elif row.phase == m.Phase.RUNNING:
                att = attempts.get((row.id, row.attempt))
                if att is None:
                    continue  # already ended above
                if (row.id, row.attempt) in by_run:
                    continue
                if att.pod_uid is None:
                    self.spawn(self.start_attempt(row.id, row.attempt, None))
                else:
                    gone = pod_end(None)
                    assert gone is not None
                    await self.end_attempt(row.id, row.attempt, gone)
            elif row.phase == m.Phase.RETRYING and row.next_attempt_at is not None:
                self.wake_at(row.id, row.next_attempt_at)
            elif row.phase == m.Phase.PENDING:
                self.spawn(self.recheck_pending(row.id))
        released = await self.admission.reconcile(live_runs={k[0] for k in by_run})
        if released:
            log.warning("released %d slot(s) held by runs that no longer run", released)
        for queue in await self.admission.queues_with_waiting():
            if self.mine(queue.split("/", 1)[0]):
                await self.admit(queue)
        for row in rows:
            if self.mine(row.namespace):
                self._status.touch(row.id)


# ---- status projection ------------------------------------------------------------------------------


def _cond(ctype: str, status: bool, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": ctype,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": iso(utcnow()),
    }


class StatusSync:
    """Writes Run (and Queue) status from PostgreSQL. Coalesces: many touches of one run
    while a patch is in flight give one more patch with the latest state, so statuses
    never go backwards."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self._dirty: set[str] = set()
        self._running: set[str] = set()
        self._conds: dict[str, dict[str, dict[str, Any]]] = {}
        self._queues_dirty: set[str] = set()
        self._queue_task: asyncio.Task[None] | None = None
        self._queue_counts: dict[str, tuple[int, int]] = {}

    def touch(self, run_id: str) -> None:
        self._dirty.add(run_id)
        if run_id not in self._running:
            self._running.add(run_id)
            self.c.spawn(self._sync(run_id))

    async def _sync(self, run_id: str) -> None:
        try:
            while run_id in self._dirty:
                self._dirty.discard(run_id)
                await self._patch(run_id)
        finally:
            self._running.discard(run_id)

    async def _patch(self, run_id: str) -> None:
        async with self.c.sessions() as s:
            row = await s.get(t.Run, run_id)
            if row is None or row.resource_deleted:
                return
            attempts = (
                (
                    await s.execute(
                        select(t.Attempt).where(t.Attempt.run_id == run_id).order_by(t.Attempt.number)
                    )
                )
                .scalars()
                .all()
            )
            q = await s.get(t.Queue, row.queue)
            status = self.project(row, list(attempts), q)
        ok = await self.c.kube.patch_status("runs", row.namespace, row.name, status)
        if row.phase in m.TERMINAL or not ok:
            self._conds.pop(run_id, None)

    def project(self, row: t.Run, attempts: list[t.Attempt], q: t.Queue | None) -> dict[str, Any]:
        phase = m.Phase(row.phase)
        out: Any = None
        if row.has_output:
            out = row.output if row.output_bytes <= MAX_STATUS_OUTPUT_BYTES else None
        conds: list[dict[str, Any]] = []
        if row.reason == "TaskNotFound" or row.reason in ("PayloadTooLarge", "InvalidSpec"):
            conds.append(_cond("Accepted", False, row.reason, row.message))
        elif phase is not m.Phase.PENDING:
            conds.append(_cond("Accepted", True, "TaskResolved", "the task exists and the run is valid"))
        if phase is m.Phase.QUEUED:
            reason, msg = _wait_reason(row, q)
            conds.append(_cond("Admitted", False, reason, msg))
        elif phase is m.Phase.RETRYING:
            conds.append(_cond("Admitted", False, "BackingOff", row.message))
        elif phase is m.Phase.RUNNING or (phase in m.TERMINAL and row.attempt > 0):
            conds.append(_cond("Admitted", True, "SlotGranted", f"attempt {row.attempt} got a slot"))
        conds.append(
            _cond(
                "Finished",
                phase in m.TERMINAL,
                row.reason if phase in m.TERMINAL else "NotFinished",
                row.message if phase in m.TERMINAL else "the run has not finished",
            )
        )
        previous = self._conds.setdefault(row.id, {})
        for cond in conds:
            old = previous.get(cond["type"])
            if old is not None and old["status"] == cond["status"]:
                cond["lastTransitionTime"] = old["lastTransitionTime"]
            previous[cond["type"]] = cond
        status: dict[str, Any] = {
            "runId": row.id,
            "phase": row.phase,
            "attempt": row.attempt,
            "maxAttempts": row.max_attempts,
            "queue": row.queue.split("/", 1)[1],
            "startedAt": iso(row.started_at),
            "finishedAt": iso(row.finished_at),
            "nextAttemptAt": iso(row.next_attempt_at),
            "error": row.error,
            "reason": row.reason,
            "message": row.message,
            "attempts": [attempt_view(a, pod_key="pod") for a in attempts],
            "conditions": conds,
            "originalRun": row.original_run_id,
        }
        if row.has_output:
            if out is not None:
                status["output"] = out
                status["outputRef"] = None
            else:
                status["outputRef"] = (
                    f"output is {row.output_bytes} bytes, stored in PostgreSQL: kubetask runs get {row.id}"
                )
        return status

    def tasks(self) -> list[asyncio.Task[None]]:
        return [self._queue_task] if self._queue_task is not None else []

    def touch_queue(self, queue: str) -> None:
        self._queues_dirty.add(queue)
        if self._queue_task is None or self._queue_task.done():
            self._queue_task = asyncio.create_task(self._sync_queues())

    async def _sync_queues(self) -> None:
        # Queue status is informational: coalesce to at most a few patches a second.
        await asyncio.sleep(0.3)
        while self._queues_dirty:
            batch, self._queues_dirty = self._queues_dirty, set()
            for key in batch:
                ns, name = key.split("/", 1)
                if (ns, name) not in self.c.queues:
                    continue
                counts = await self.c.admission.counts(key)
                if self._queue_counts.get(key) == counts:
                    continue
                with contextlib.suppress(ApiException):
                    await self.c.kube.patch_status(
                        "queues", ns, name, {"running": counts[0], "queued": counts[1]}
                    )
                    self._queue_counts[key] = counts
            await asyncio.sleep(0.3)


def _wait_reason(row: t.Run, q: t.Queue | None) -> tuple[str, str]:
    if q is None:
        return "WaitingForSlot", "waiting for a slot"
    name = row.queue.split("/", 1)[1]
    if q.paused:
        return "QueuePaused", f"queue {name!r} is paused"
    if q.concurrency_limit is not None and q.running >= q.concurrency_limit:
        return "QueueAtLimit", f"queue {name!r} has {q.running} of {q.concurrency_limit} slots in use"
    if q.per_key_limit is not None and row.concurrency_key:
        return "WaitingForSlot", (
            f"waiting for a slot (queue {name!r}, concurrencyKey {row.concurrency_key!r}, "
            f"at most {q.per_key_limit} per key)"
        )
    return "WaitingForSlot", f"waiting for a slot in queue {name!r}"


def _report(raw: dict[str, Any] | None) -> Report | None:
    if not raw:
        return None
    err = raw.get("error") or {}
    return Report(
        succeeded=bool(raw.get("succeeded")),
        retryable=bool(raw.get("retryable", True)),
        error_type=err.get("type"),
        error_message=err.get("message"),
    )


def _pod_started(pod: dict[str, Any]) -> datetime | None:
    raw = (pod.get("status") or {}).get("startTime")
    return datetime.fromisoformat(raw.replace("Z", "+00:00")) if isinstance(raw, str) else None


def arrival_order(meta: dict[str, Any]) -> int:
    """Order of a Run's creation in the API server: creationTimestamp (seconds), then
    resourceVersion within the second (etcd's revisions increase; if a server's are not
    numbers, ties fall back to the order the operator saw the Runs)."""
    created = _created(meta, utcnow())
    rv = str(meta.get("resourceVersion") or "")
    return (int(created.timestamp()) << 32) | (int(rv) & 0xFFFFFFFF if rv.isdigit() else 0)


def _created(meta: dict[str, Any], now: datetime) -> datetime:
    raw = meta.get("creationTimestamp")
    return datetime.fromisoformat(raw.replace("Z", "+00:00")) if isinstance(raw, str) else now


def _api_message(e: ApiException) -> str:
    try:
        return str(json.loads(e.body or b"{}").get("message"))
    except Exception:
        return f"{e.status} {e.reason}"
