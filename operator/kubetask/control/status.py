"""Status projection: a Run's ``status`` (and a Queue's counts) written from PostgreSQL.

Status is a projection, never a source: every patch re-reads the row, so patches may
be coalesced, repeated or lost without harm. Runs to patch go through their own work
queue (deduplicated, retried with back-off), so many transitions of one run give one
patch with the latest state and a failed patch is tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio.client.rest import ApiException
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.admission import Admission
from kubetask.admission.slots import bucket
from kubetask.control.workqueue import WorkQueue
from kubetask.engine import machine as m
from kubetask.kube import Kube
from kubetask.spec import MAX_STATUS_OUTPUT_BYTES
from kubetask.store import tables as t
from kubetask.store.runs import NOT_ACCEPTED, attempt_view, condition_statuses, counted_attempt, iso

log = logging.getLogger("kubetask.status")

#: How long a touched run waits for more changes before its status is patched.
COALESCE_SECONDS = 0.05


class StatusSync:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        kube: Kube,
        admission: Admission,
        queue_known: Any,
    ) -> None:
        self.sessions = sessions
        self.kube = kube
        self.admission = admission
        #: (namespace, name) -> bool: whether a Queue resource exists to patch.
        self._queue_known = queue_known
        self.runs = WorkQueue(name="status")
        self._queues_dirty: set[str] = set()
        self._queue_task: asyncio.Task[None] | None = None
        self._queue_counts: dict[str, tuple[int, int]] = {}
        #: Run uid -> the phase last written to its status (the watch echo of our own
        #: patch then costs no database query; see Controller.on_run_event).
        self.written: dict[str, str] = {}

    def touch(self, run_id: str) -> None:
        # A short delay coalesces the moves of one instant (Pending -> Queued -> Running
        # when a slot is free) into one patch with the latest state.
        self.runs.add_after(run_id, COALESCE_SECONDS)

    async def run(self, *, workers: int, item_timeout: float) -> None:
        await self.runs.run_workers(self._patch, workers=workers, item_timeout=item_timeout)

    def close(self) -> None:
        self.runs.close()
        if self._queue_task is not None:
            self._queue_task.cancel()

    async def _patch(self, run_id: str) -> None:
        async with self.sessions() as s:
            rows = (
                await s.execute(
                    select(t.Run, t.Attempt)
                    .outerjoin(t.Attempt, t.Attempt.run_id == t.Run.id)
                    .where(t.Run.id == run_id)
                    .order_by(t.Attempt.number)
                )
            ).all()
            if not rows or rows[0][0].resource_deleted:
                return
            row = rows[0][0]
            attempts = [a for _, a in rows if a is not None]
            q = await s.get(t.Queue, row.queue) if row.phase == m.Phase.QUEUED else None
            qkey = None
            if q is not None and q.rate_per_key and q.rate_limit:
                qkey = await s.get(t.QueueKey, (row.queue, row.concurrency_key or ""))
            status = project(row, attempts, q, qkey)
        if await self.kube.patch_status("runs", row.namespace, row.name, status):
            self.written[row.uid] = row.phase

    # ---- queues ------------------------------------------------------------------------

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
                if not self._queue_known(ns, name):
                    continue
                try:
                    counts = await self.admission.counts(key)
                    if self._queue_counts.get(key) == counts:
                        continue
                    with contextlib.suppress(ApiException):
                        await self.kube.patch_status(
                            "queues", ns, name, {"running": counts[0], "queued": counts[1]}
                        )
                        self._queue_counts[key] = counts
                except Exception as e:  # informational: the next change patches again
                    log.info("queue status %s: %r", key, e)
            await asyncio.sleep(0.3)


def project(
    row: t.Run, attempts: list[t.Attempt], q: t.Queue | None, qkey: t.QueueKey | None = None
) -> dict[str, Any]:
    """The Run's status from its row. Conditions' lastTransitionTime come from the row
    (kept by each transition), so they survive restarts."""
    phase = m.Phase(row.phase)
    times = row.condition_times or {}
    conds: list[dict[str, Any]] = []
    for ctype, status in condition_statuses(phase, row.reason, row.attempt).items():
        reason, message = _explain(ctype, status, row, phase, q, qkey)
        conds.append(
            {
                "type": ctype,
                "status": "True" if status else "False",
                "reason": reason,
                "message": message,
                "lastTransitionTime": (times.get(ctype) or {}).get("time") or iso(row.updated_at),
            }
        )
    out: dict[str, Any] = {
        "runId": row.id,
        "phase": row.phase,
        "attempt": counted_attempt(row),
        "pods": row.attempt,
        "maxAttempts": row.max_attempts,
        "infraFailures": row.infra_failures,
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
        "resumes": row.resumes,
    }
    if row.parent_run_id is not None:
        out["parentRun"] = row.parent_run_id
    if phase is m.Phase.WAITING:
        # What it waits for and until when (the message says it in words).
        out["waitingFor"] = row.message
    if row.has_output:
        if row.output_bytes <= MAX_STATUS_OUTPUT_BYTES:
            out["output"] = row.output
            out["outputRef"] = None
        else:
            out["outputRef"] = (
                f"output is {row.output_bytes} bytes, stored in PostgreSQL: kubetask runs get {row.id}"
            )
    return out


def _explain(
    ctype: str, status: bool, row: t.Run, phase: m.Phase, q: t.Queue | None, qkey: t.QueueKey | None
) -> tuple[str, str]:
    if ctype == "Accepted":
        if not status and row.reason in NOT_ACCEPTED:
            return row.reason, row.message
        return "TaskResolved", "the task exists and the run is valid"
    if ctype == "Admitted":
        if phase is m.Phase.QUEUED:
            return _wait_reason(row, q, qkey)
        if phase is m.Phase.DELAYED:
            return "Delayed", row.message
        if phase is m.Phase.RETRYING:
            return "BackingOff", row.message
        if phase is m.Phase.WAITING:
            return "Waiting", "suspended on a durable wait: it holds no slot until it resumes"
        return "SlotGranted", f"attempt {row.attempt} got a slot"
    if status:
        return row.reason, row.message
    return "NotFinished", "the run has not finished"


def _wait_reason(row: t.Run, q: t.Queue | None, qkey: t.QueueKey | None) -> tuple[str, str]:
    if q is None:
        return "WaitingForSlot", "waiting for a slot"
    name = row.queue.split("/", 1)[1]
    if q.paused:
        return "QueuePaused", f"queue {name!r} is paused"
    rate = bucket(q)
    if rate is not None:
        tat = qkey.rate_tat if q.rate_per_key and qkey is not None else None if q.rate_per_key else q.rate_tat
        now = datetime.now(UTC)
        allowed = rate.allowed_at(tat, now)
        if allowed > now:
            per = f" for concurrencyKey {row.concurrency_key!r}" if q.rate_per_key else ""
            return "RateLimited", (
                f"queue {name!r} allows {q.rate_limit} pod starts per {q.rate_period:g}s{per}; "
                f"the next one at {allowed.isoformat(timespec='seconds')}"
            )
    if q.concurrency_limit is not None and q.running >= q.concurrency_limit:
        return "QueueAtLimit", f"queue {name!r} has {q.running} of {q.concurrency_limit} slots in use"
    if q.per_key_limit is not None and row.concurrency_key:
        return "WaitingForSlot", (
            f"waiting for a slot (queue {name!r}, concurrencyKey {row.concurrency_key!r}, "
            f"at most {q.per_key_limit} per key)"
        )
    return "WaitingForSlot", f"waiting for a slot in queue {name!r}"
