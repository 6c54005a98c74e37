"""The resync: the leader's periodic comparison of desired and actual state.

Events are hints; this is the guarantee. Every ``resync_seconds`` (and first when a
replica becomes leader) it puts on the work queue whatever an event could have missed:
Runs without a row, rows whose Run is gone, live attempts whose pod the watch does not
show (or that were granted and have no pod), queues with free capacity and waiting runs,
token Secrets of attempts that are over, Schedules it has not seen (every one at
start-up); and it applies the retention settings. It
pages through lists and reads only live rows, so its cost follows live work, not history.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update

from kubetask import pods
from kubetask.control.timers import utcnow
from kubetask.engine import machine as m
from kubetask.store import tables as t

if TYPE_CHECKING:
    from kubetask.control.controller import Controller

log = logging.getLogger("kubetask.resync")

TERMINAL_NAMES = frozenset(p.value for p in m.TERMINAL)
BATCH = 500


class Resync:
    def __init__(self, controller: Controller) -> None:
        self.c = controller
        self.passes = 0

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(self.c.settings.resync_seconds)
            try:
                await self.once(initial=False)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("resync failed (%r); next one in %.0fs", e, self.c.settings.resync_seconds)

    async def once(self, *, initial: bool) -> None:
        c = self.c
        await c.catalogue.relist(c.mine)
        if initial:
            released = await c.admission.reconcile(live_runs=set())
            if released:
                log.warning("released %d slot(s) held by runs that no longer run", released)
        await self._runs_vs_rows()
        if initial:
            # Start-up is the first resync: every live run is looked at once.
            await self._each_live_run(c.runs.add)
        else:
            await self._attempts_vs_pods()
        for queue in await c.admission.queues_with_waiting():
            if c.mine(queue.split("/", 1)[0]):
                c.queues.add(queue)
        await c.schedules.relist(c.mine, initial=initial)
        await self._sweep_secrets()
        await self._retention()
        await c.schedules.retention()
        self.passes += 1

    # ---- Runs and rows -------------------------------------------------------------------

    async def _runs_vs_rows(self) -> None:
        c = self.c
        seen: set[str] = set()
        batch: list[dict[str, Any]] = []
        async for body in c.kube.iter_objects("runs"):
            meta = body["metadata"]
            if not c.mine(meta["namespace"]):
                continue
            seen.add(meta["uid"])
            status = body.get("status") or {}
            if status.get("runId") and status.get("phase") in TERMINAL_NAMES:
                c.remember(meta["uid"], status["runId"], meta.get("generation"))
                continue  # finished: its row exists (status is projected from it)
            batch.append(body)
            if len(batch) >= BATCH:
                await self._ensure_rows(batch)
                batch = []
        await self._ensure_rows(batch)
        # Rows of live runs whose Run is gone (a DELETED event missed while down).
        async with c.sessions() as s:
            live = (
                await s.execute(
                    select(t.Run.id, t.Run.uid, t.Run.namespace, t.Run.name).where(
                        t.Run.finished_at.is_(None), t.Run.resource_deleted.is_(False)
                    )
                )
            ).all()
        for run_id, uid, ns, name in live:
            if uid in seen or not c.mine(ns):
                continue
            # Created after the list began? Ask before believing it is gone.
            found = await c.kube.get_object("runs", ns, name)
            if found is None or found["metadata"]["uid"] != uid:
                await c.mark_deleted(uid)
                c.runs.add(run_id)

    async def _ensure_rows(self, bodies: list[dict[str, Any]]) -> None:
        if not bodies:
            return
        c = self.c
        uids = [b["metadata"]["uid"] for b in bodies]
        async with c.sessions() as s:
            known = {
                uid: (run_id, phase)
                for uid, run_id, phase in (
                    await s.execute(select(t.Run.uid, t.Run.id, t.Run.phase).where(t.Run.uid.in_(uids)))
                ).all()
            }
        cancel = [b["metadata"]["uid"] for b in bodies if (b.get("spec") or {}).get("cancel")]
        for body in bodies:
            uid = body["metadata"]["uid"]
            if uid not in known:
                await c.on_run_event("ADDED", body)
                continue
            if (body.get("status") or {}).get("phase") != known[uid][1]:
                # The status lags the row (a patch lost with the process that was to
                # write it): status is a projection, so write it again.
                c.status.touch(known[uid][0])
            # Recorded, and its spec.cancel is handled below: the watch's event of this
            # very generation needs no intake (a new leader gets one for every Run).
            c.remember(uid, known[uid][0], body["metadata"].get("generation"))
        if cancel:
            async with c.sessions.begin() as s:
                ids = (
                    await s.execute(
                        update(t.Run)
                        .where(
                            t.Run.uid.in_(cancel),
                            t.Run.cancel_requested.is_(False),
                            t.Run.finished_at.is_(None),
                        )
                        .values(cancel_requested=True)
                        .returning(t.Run.id)
                    )
                ).scalars()
                for run_id in ids:
                    c.runs.add(run_id)

    async def _each_live_run(self, add: Callable[[str], None]) -> None:
        """Every run that is not over, or whose last attempt is not over, a page at a time."""
        c = self.c
        after = ""
        while True:
            async with c.sessions() as s:
                page = (
                    await s.execute(
                        select(t.Run.id, t.Run.namespace)
                        .where(t.Run.finished_at.is_(None), t.Run.id > after)
                        .order_by(t.Run.id)
                        .limit(BATCH)
                    )
                ).all()
            for run_id, ns in page:
                if c.mine(ns):
                    add(run_id)
            if len(page) < BATCH:
                break
            after = page[-1][0]
        async with c.sessions() as s:
            ended_runs = (
                await s.execute(
                    select(t.Attempt.run_id)
                    .join(t.Run, t.Run.id == t.Attempt.run_id)
                    .where(t.Attempt.finished_at.is_(None), t.Run.finished_at.is_not(None))
                )
            ).scalars()
            for run_id in ended_runs:
                add(run_id)

    # ---- attempts and pods ---------------------------------------------------------------

    async def _attempts_vs_pods(self) -> None:
        """Live attempts the pod watch does not show, grants that have no pod after the
        grace period, and ended pods: their runs are reconciled."""
        c = self.c
        if not c.index.synced:
            return
        grace = utcnow() - timedelta(seconds=c.settings.grant_grace_seconds)
        async with c.sessions() as s:
            live = (
                await s.execute(
                    select(
                        t.Attempt.run_id,
                        t.Attempt.number,
                        t.Attempt.pod_uid,
                        t.Attempt.created_at,
                        t.Run.namespace,
                    )
                    .join(t.Run, t.Run.id == t.Attempt.run_id)
                    .where(t.Attempt.finished_at.is_(None))
                )
            ).all()
        live_keys = set()
        for run_id, number, pod_uid, created, ns in live:
            if not c.mine(ns):
                continue
            live_keys.add((run_id, number))
            pod = c.index.get(run_id, number)
            if pod is None:
                if pod_uid is not None or created < grace:
                    c.runs.add(run_id)
            elif pod["metadata"]["uid"] != pod_uid:  # not recorded yet (a crash), or a stranger
                c.runs.add(run_id)
        for (run_id, number), _pod in c.index.items():
            if (run_id, number) not in live_keys:
                c.runs.add(run_id)  # a pod of an attempt that is over: cleaned up

    async def _sweep_secrets(self) -> None:
        """Token Secrets of attempts that are over (their pod went before we deleted them)."""
        c = self.c
        secrets = await c.kube.list_secrets(pods.POD_SELECTOR)
        wanted: dict[tuple[str, int], dict[str, Any]] = {}
        for sec in secrets:
            meta = sec["metadata"]
            labels = meta.get("labels") or {}
            if not c.mine(meta["namespace"]):
                continue
            try:
                wanted[(labels[pods.LABEL_RUN_ID], int(labels[pods.LABEL_ATTEMPT]))] = meta
            except (KeyError, ValueError):
                continue
        if not wanted:
            return
        async with c.sessions() as s:
            rows = (
                await s.execute(
                    select(t.Attempt.run_id, t.Attempt.number, t.Attempt.finished_at).where(
                        t.Attempt.run_id.in_({k[0] for k in wanted})
                    )
                )
            ).all()
        live = {(r, n) for r, n, f in rows if f is None}
        for key, meta in wanted.items():
            if key in live or c.index.get(*key) is not None:
                continue
            await c.kube.delete_secret(meta["namespace"], meta["name"])

    # ---- retention -----------------------------------------------------------------------

    async def _retention(self) -> None:
        c = self.c
        now = utcnow()
        async with c.sessions.begin() as s:
            if c.settings.record_retention_days > 0:
                cut = now - timedelta(days=c.settings.record_retention_days)
                await s.execute(
                    delete(t.Run).where(
                        t.Run.id.in_(
                            select(t.Run.id)
                            .where(t.Run.finished_at < cut, t.Run.resource_deleted.is_(True))
                            .limit(1000)
                        )
                    )
                )
            if c.settings.log_retention_days > 0:
                cut = now - timedelta(days=c.settings.log_retention_days)
                await s.execute(
                    delete(t.LogLine).where(
                        t.LogLine.id.in_(select(t.LogLine.id).where(t.LogLine.ts < cut).limit(5000))
                    )
                )
            await s.execute(
                delete(t.IdempotencyKey).where(
                    t.IdempotencyKey.key.in_(
                        select(t.IdempotencyKey.key).where(t.IdempotencyKey.expires_at < now).limit(1000)
                    ),
                    t.IdempotencyKey.expires_at < now,
                )
            )
