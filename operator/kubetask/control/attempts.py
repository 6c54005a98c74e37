"""Attempts: the Kubernetes side of a run's current attempt, made to match PostgreSQL.

For a run whose attempt is live in the database (Running, or Canceled with its pod not
yet gone) this module makes the cluster agree: it creates the token Secret, the source
ConfigMap and the pod when they are missing, ends the attempt when its pod ended, was
deleted, or never started within its limits, and deletes what belongs to attempts that
are over. Every step is idempotent: names are deterministic and tied to the Run's uid,
a 409 is checked against the run-uid label and never adopted blindly, and "the pod is
gone" is only concluded after asking the API server.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from kubernetes_asyncio.client.rest import ApiException
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask import metrics, pods
from kubetask.control.catalogue import Catalogue, pinned, with_image_digest
from kubetask.control.podindex import PodIndex
from kubetask.control.timers import set_run_timer, utcnow
from kubetask.control.transitions import Applied, EventSource
from kubetask.engine import machine as m
from kubetask.engine.outcomes import OOM_KILLED, PodEnd, Report, StartLimits, classify, pod_end, start_problem
from kubetask.kube import Kube
from kubetask.protocol import hash_token
from kubetask.settings import Settings
from kubetask.store import journal
from kubetask.store import tables as t

log = logging.getLogger("kubetask.attempts")

Apply = Callable[[str, m.Event | EventSource], Awaitable[Applied | None]]


class Attempts:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        kube: Kube,
        settings: Settings,
        catalogue: Catalogue,
        index: PodIndex,
        apply: Apply,
        wake: Callable[[datetime], None],
    ) -> None:
        self.sessions = sessions
        self.kube = kube
        self.settings = settings
        self.catalogue = catalogue
        self.index = index
        self.apply = apply
        #: Tells the timer loop a timer was set (so it fires on time, not on its next tick).
        self.wake = wake
        self.limits = StartLimits(
            unschedulable=timedelta(seconds=settings.unschedulable_timeout_seconds),
            image_pull=timedelta(seconds=settings.image_pull_timeout_seconds),
            start=timedelta(seconds=settings.pod_start_timeout_seconds),
            terminating=timedelta(seconds=settings.terminating_timeout_seconds),
        )
        #: Plaintext tokens of fresh grants, until their Secret exists (a hint: without
        #: it a new token is issued, see _token).
        self.tokens: dict[tuple[str, int], str] = {}
        #: ConfigMaps known to exist, by namespace and full name (which carries the
        #: Task's uid and the source's hash: never a name alone).
        self._configmaps: set[tuple[str, str]] = set()
        #: (namespace, Task uid) pairs whose namespace has the runner ServiceAccount and
        #: NetworkPolicy as this process put them. By Task uid, not namespace alone: a
        #: namespace deleted and created again loses them, and its Tasks are new ones.
        self._runner_objects: set[tuple[str, str]] = set()

    # ---- the live attempt ----------------------------------------------------------------

    async def reconcile(self, row: t.Run, att: t.Attempt, *, fresh: bool = False) -> None:
        """Make the cluster match a live attempt (``att.finished_at`` is None). With
        ``fresh`` (a deadline is due), the pod is read from the API server, not the cache."""
        pod = None if fresh else self.index.get(row.id, att.number)
        if pod is None and row.phase == m.Phase.RUNNING and att.pod_uid is None:
            pod = await self.kube.get_pod(row.namespace, att.pod_name)
            if pod is None:
                await self._start(row, att)
                return
        if pod is None:
            # Not in the watch's view: ask the API server before believing it is gone.
            pod = await self.kube.get_pod(row.namespace, att.pod_name)
        if pod is not None and (pod["metadata"].get("labels") or {}).get(pods.LABEL_RUN_UID) != row.uid:
            raise RuntimeError(
                f"pod {row.namespace}/{att.pod_name} belongs to another Run (run-uid label differs)"
            )
        if pod is not None and att.pod_uid is None:
            await self._record_pod(row.id, att.number, pod)
        judged = _judged(att)
        if pod is None:
            gone = judged or pod_end(None)
            assert gone is not None
            await self.end(row.id, att.number, gone)
            await self.kube.delete_secret(
                row.namespace, pods.token_secret_name(row.name, row.uid, att.number)
            )
            return
        end = pod_end(pod)
        if end is not None and judged is not None:
            end = judged  # marked Failed by its kubelet while being deleted: the verdict stands
        if end is None:
            if row.phase != m.Phase.RUNNING and pod["metadata"].get("deletionTimestamp") is None:
                # Canceled (or deleted) while the pod runs: its slot is released once the
                # pod is gone, so a watcher never sees the queue's limit exceeded. The pod's
                # own grace period: the runner ships its last logs on SIGTERM.
                await self.kube.delete_pod(row.namespace, att.pod_name, uid=pod["metadata"]["uid"])
                return
            end, due = start_problem(pod, now=utcnow(), limits=self.limits)
            if end is None:
                if row.wake_at != due:  # the run's timer follows its pod's next deadline
                    async with self.sessions.begin() as s:
                        await set_run_timer(s, row.id, due)
                    if due is not None:
                        self.wake(due)
                return
            log.info("pod %s/%s: %s", row.namespace, att.pod_name, end.message)
            if end.reason != "NodeLost":
                # The container never started: its pod is deleted now, and the attempt
                # ends when it is gone (the verdict waits on the attempt's row), so that the
                # next pod, of this run or another in the queue, never overlaps it. Not
                # forced: its kubelet confirms, stopping first a container that started
                # this very moment.
                if judged is None:
                    await self._judge(row.id, att.number, end)
                await self.kube.delete_pod(row.namespace, att.pod_name, uid=pod["metadata"]["uid"])
                return
            # Stuck terminating: its kubelet is gone and cannot confirm. Forced, and the
            # attempt ends now (the pod may never go).
            end = judged or end
            await self.kube.delete_pod(row.namespace, att.pod_name, grace=0, uid=pod["metadata"]["uid"])
        await self.end(row.id, att.number, end, pod=pod)
        # The end is recorded (logs and output are in PostgreSQL): the pod and its token
        # Secret go now, in this reconcile, rather than in another one.
        meta = pod["metadata"]
        if meta.get("deletionTimestamp") is None:
            await self.kube.delete_pod(row.namespace, meta["name"], uid=meta["uid"])
        await self.kube.delete_secret(row.namespace, pods.token_secret_name(row.name, row.uid, att.number))

    async def _start(self, row: t.Run, att: t.Attempt) -> None:
        """Create the token Secret, the source ConfigMap and the attempt's pod."""
        info = await self.catalogue.task(row.namespace, row.task)
        if info is None and await self._run_going(row):
            # Its namespace is being deleted: the Task went first, the Run goes next (the
            # namespace controller deletes them in no set order). Canceled, as when the Run
            # goes first; the attempt, which has no pod, ends at the next reconcile.
            await self.apply(
                row.id,
                m.CancelRequested(
                    "RunDeleted", "the Run resource was deleted (its namespace is being deleted)"
                ),
            )
            return
        if info is None:
            await self.end(
                row.id,
                att.number,
                PodEnd(None, "TaskNotFound", f"Task {row.task} was deleted", permanent=True),
            )
            return
        # The Task as the run resolved it (a Task edited since changes no attempt of it);
        # the live Task still owns the source ConfigMap.
        version = pinned(row.task_version, info.spec, self.settings.runner_image)
        spec = version.spec
        if (refusal := self.catalogue.policy.check(spec)) is not None:
            # Not retried: the Task has to change (its Ready condition says so too).
            await self.end(row.id, att.number, PodEnd(None, refusal.reason, refusal.message, permanent=True))
            return
        run_body = {"metadata": {"name": row.name, "namespace": row.namespace, "uid": row.uid}}
        token = self.tokens.pop((row.id, att.number), None)
        fresh = token is not None
        if token is None:
            # The grant's plaintext is gone (a restart, a retry): issue a new token first,
            # then the Secret that carries it, so the two always agree before the pod runs.
            token = secrets.token_urlsafe(32)
            async with self.sessions.begin() as s:
                await s.execute(
                    update(t.Attempt)
                    .where(t.Attempt.run_id == row.id, t.Attempt.number == att.number)
                    .values(token_hash=hash_token(token))
                )
        secret = pods.token_secret(run=run_body, run_id=row.id, attempt=att.number, token=token)
        if fresh:
            if await self.kube.create(secret) is None:
                await self.kube.replace_secret(secret)
        else:
            await self.kube.replace_secret(secret)
        if spec.source is not None:
            cm = pods.source_configmap_name(info.name, info.uid, spec.source)
            if (row.namespace, cm) not in self._configmaps:
                await self.kube.create(
                    pods.source_configmap(
                        task_name=info.name,
                        namespace=row.namespace,
                        source=spec.source,
                        task_owner=info.owner(),
                    )
                )
                self._configmaps.add((row.namespace, cm))
        after_oom = await self._oom_killed_before(row.id, att.number) if spec.retry.out_of_memory else False
        if after_oom:
            log.info(
                "run %s/%s: an earlier attempt was OOM-killed; attempt %d gets retry.outOfMemory's resources",
                row.namespace,
                row.name,
                att.number,
            )
        sa = self.settings.runner_service_account
        await self._runner_objects_in(row.namespace, info.uid)
        manifest = pods.attempt_pod(
            run=run_body,
            run_id=row.id,
            task_name=info.name,
            task_uid=info.uid,
            task=spec,
            queue=info.queue,
            attempt=att.number,
            max_attempts=row.max_attempts,
            api_url=self.settings.api_url,
            default_image=version.image,
            image=version.image,
            image_pull_policy=self.settings.image_pull_policy,
            after_oom=after_oom,
            service_account=sa,
            default_resources=self.settings.runner_resources,
            tmp_size_limit=self.settings.runner_tmp_size_limit,
            read_only_root_filesystem=self.settings.runner_read_only_root_filesystem,
        )
        try:
            created = await self.kube.create(manifest)
        except ApiException as e:
            metrics.POD_CREATE_ERRORS.labels(str(e.status)).inc()
            message = api_message(e)
            if e.status == 403 and "error looking up service account" in message:
                # Deleted since we created it (or saw it): create it again on the retry.
                self._runner_objects.discard((row.namespace, info.uid))
                raise
            if e.status == 403 and "exceeded quota" in message:
                # The Job controller's answer: wait and try again. The task never ran,
                # so this does not use up an attempt.
                end = PodEnd(None, "QuotaExceeded", message, infra=True)
            elif e.status in (400, 403, 422):
                end = PodEnd(None, "PodRejected", message, permanent=True)
            else:
                raise  # 5xx, 429, timeouts: the work queue retries with back-off
            log.info("pod %s/%s rejected (%s): %s", row.namespace, att.pod_name, e.status, message)
            await self.end(row.id, att.number, end)
            return
        if created is None:  # 409: this name exists; it must be this Run's pod
            created = await self.kube.get_pod(row.namespace, att.pod_name)
            if created is None:
                raise RuntimeError(f"pod {att.pod_name} existed and vanished; trying again")
            if (created["metadata"].get("labels") or {}).get(pods.LABEL_RUN_UID) != row.uid:
                raise RuntimeError(f"pod {row.namespace}/{att.pod_name} belongs to another Run")
        elif att.number == 1:
            metrics.START_LATENCY.labels(row.namespace, row.task).observe(
                max(0.0, (utcnow() - row.created_at).total_seconds())
            )
        self.index.put(created)
        await self._record_pod(row.id, att.number, created)

    async def _run_going(self, row: t.Run) -> bool:
        """Whether the Run resource is gone, being deleted, or in a namespace being deleted."""
        run = await self.kube.get_object("runs", row.namespace, row.name)
        if run is None or run["metadata"]["uid"] != row.uid or run["metadata"].get("deletionTimestamp"):
            return True
        return await self.kube.namespace_going(row.namespace)

    async def _oom_killed_before(self, run_id: str, attempt: int) -> bool:
        """Whether an earlier attempt of the run was OOM-killed. Any earlier one, not only
        the last: once the task needed more memory, an attempt that failed otherwise (or a
        bigger pod that could not be scheduled) must not send the next one back to the
        small limit. Only asked for Tasks with ``retry.outOfMemory``."""
        if attempt <= 1:
            return False
        async with self.sessions() as s:
            found = await s.scalar(
                select(t.Attempt.number)
                .where(t.Attempt.run_id == run_id, t.Attempt.number < attempt, t.Attempt.reason == OOM_KILLED)
                .limit(1)
            )
        return found is not None

    async def _runner_objects_in(self, namespace: str, task_uid: str) -> None:
        """The runner ServiceAccount (created when missing, never changed: an admin may add
        imagePullSecrets to it) and NetworkPolicy (created, or replaced with this
        process's settings) of the namespace, once per Task and process."""
        if (namespace, task_uid) in self._runner_objects:
            return
        if sa := self.settings.runner_service_account:
            await self.kube.create(pods.runner_service_account(name=sa, namespace=namespace))
        if (policy := self.settings.runner_network_policy) is not None:
            await self.kube.put_network_policy(pods.runner_network_policy(namespace=namespace, spec=policy))
        self._runner_objects.add((namespace, task_uid))

    async def _record_pod(self, run_id: str, attempt: int, pod: dict[str, Any]) -> None:
        async with self.sessions.begin() as s:
            await s.execute(
                update(t.Attempt)
                .where(t.Attempt.run_id == run_id, t.Attempt.number == attempt, t.Attempt.pod_uid.is_(None))
                .values(pod_uid=pod["metadata"]["uid"])
            )

    # ---- ending --------------------------------------------------------------------------

    async def _judge(self, run_id: str, attempt: int, end: PodEnd) -> None:
        """Keep the verdict on a live attempt whose pod is being deleted because it never
        started (:func:`_judged` reads it back; :meth:`end` records it once the pod is gone)."""
        async with self.sessions.begin() as s:
            await s.execute(
                update(t.Attempt)
                .where(
                    t.Attempt.run_id == run_id,
                    t.Attempt.number == attempt,
                    t.Attempt.finished_at.is_(None),
                )
                .values(reason=end.reason[:64], error={"type": end.reason, "message": end.message})
            )

    async def end(self, run_id: str, attempt: int, end: PodEnd, *, pod: dict[str, Any] | None = None) -> None:
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
            ev = classify(attempt=attempt, end=end, report=_report(row.report))
            if ev.outcome is m.Outcome.SUSPENDED:
                ev = await _suspension(s, _run, ev)
            row.finished_at = utcnow()
            row.exit_code = end.exit_code
            row.reason = ev.reason[:64]
            row.error = {"type": ev.error.type, "message": ev.error.message} if ev.error else None
            if pod is not None and row.started_at is None:
                row.started_at = _pod_started(pod)
            if pod is not None and (version := with_image_digest(_run.task_version, pod)) is not None:
                # The run's later attempts run this digest, not the tag again (written in
                # the run's UPDATE of this transition: no statement more).
                _run.task_version = version
            return ev

        await self.apply(run_id, record)

    # ---- what is over --------------------------------------------------------------------

    async def clean_up(self, row: t.Run, live_attempt: int | None) -> None:
        """Delete the pods (and token Secrets) of this run's attempts that are over: an
        ended pod only costs the node, its logs and output are in PostgreSQL."""
        for attempt, pod in self.index.of_run(row.id):
            if attempt == live_attempt:
                continue
            meta = pod["metadata"]
            if meta.get("deletionTimestamp") is None:
                await self.kube.delete_pod(meta["namespace"], meta["name"], uid=meta["uid"])
                await self.kube.delete_secret(
                    meta["namespace"], pods.token_secret_name(row.name, row.uid, attempt)
                )


async def _suspension(s: AsyncSession, run: t.Run, ev: m.AttemptEnded) -> m.AttemptEnded:
    """A suspended attempt's end, completed from its wait: resume at once if the wait was
    satisfied while the pod was exiting (an event that came meanwhile), else wait until
    its deadline."""
    cp = (
        await s.execute(
            select(t.Checkpoint)
            .where(t.Checkpoint.run_id == run.id, t.Checkpoint.key == (run.wait_key or ""))
            .with_for_update()
        )
    ).scalar_one_or_none()
    if cp is None:
        return dataclasses.replace(ev, resume_now=True, waiting_for="a wait that is gone")
    journal.expire(cp, utcnow())
    if cp.status != journal.WAITING:
        return dataclasses.replace(ev, resume_now=True, waiting_for=journal.describe(cp))
    return dataclasses.replace(ev, wake_at=cp.due_at, waiting_for=journal.describe(cp))


def _judged(att: t.Attempt) -> PodEnd | None:
    """The verdict :meth:`Attempts._judge` kept on a live attempt, if any: a start problem
    (the task never ran, so it does not count)."""
    if att.finished_at is not None or att.reason is None:
        return None
    message = str((att.error or {}).get("message") or att.reason)
    return PodEnd(None, att.reason, message, infra=True)


def _report(raw: dict[str, Any] | None) -> Report | None:
    """``attempts.report`` (api/runner.py ``_report`` wrote it) as the engine reads it."""
    if not raw:
        return None
    err = raw.get("error") or {}
    retry_at = raw.get("retryAt")
    return Report(
        succeeded=bool(raw.get("succeeded")),
        retryable=bool(raw.get("retryable", True)),
        suspended=bool(raw.get("suspended")),
        error_type=err.get("type"),
        error_message=err.get("message"),
        error_types=tuple(str(name) for name in err.get("types") or ()),
        retry_at=datetime.fromisoformat(retry_at.replace("Z", "+00:00"))
        if isinstance(retry_at, str)
        else None,
        skipped=bool(raw.get("skipped")),
    )


def _pod_started(pod: dict[str, Any]) -> datetime | None:
    raw = (pod.get("status") or {}).get("startTime")
    return datetime.fromisoformat(raw.replace("Z", "+00:00")) if isinstance(raw, str) else None


def api_message(e: ApiException) -> str:
    try:
        return str(json.loads(e.body or b"{}").get("message"))
    except Exception:
        return f"{e.status} {e.reason}"
