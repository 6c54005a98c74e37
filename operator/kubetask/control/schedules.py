"""Schedules: the leader fires each Schedule resource from its timer in PostgreSQL.

A reconcile of one Schedule (its key ``namespace/name`` on the ``schedules`` work queue:
a watch event, its timer, the resync, or the end of one of its runs put it there):

1. reads the Schedule from the API server (nothing in memory is authoritative);
2. in one transaction, with the schedule's row locked: closes the fires whose runs have
   ended, starts a buffered fire when nothing runs any more, finds the fire times due
   (:func:`kubetask.engine.schedules.due`: on time, or caught up after an outage),
   applies the overlap policy (:func:`~kubetask.engine.schedules.decide`), writes one
   ``schedule_fires`` row per fire time (its deduplication key, with the run's payload),
   the next fire time and the schedule's timer;
3. creates the Run of each pending fire, named from the schedule's uid and the fire time
   (:func:`~kubetask.engine.schedules.run_name`), so a create repeated after a crash or by
   a second leader is answered 409 and finds the same Run; records it like any Run;
4. writes the Schedule's status (next and last fire times, last run, active runs).

A crash after step 2 loses nothing: the pending fires are created by the next reconcile,
which the first resync of the next leader starts.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.control.catalogue import condition
from kubetask.control.intake import Intake
from kubetask.control.timers import clear_timer, set_timer, utcnow
from kubetask.control.workqueue import WorkQueue
from kubetask.engine import machine as m
from kubetask.engine import schedules as plan
from kubetask.engine.cron import Cron, CronError
from kubetask.kube import Kube
from kubetask.settings import Settings
from kubetask.spec import API_VERSION, LABEL_SCHEDULE, ScheduleSpec
from kubetask.store import tables as t
from kubetask.store.runs import iso

log = logging.getLogger("kubetask.schedules")

#: The timer kind of schedules (key: ``namespace/name``).
SCHEDULE = "schedule"
#: Label of a scheduled Run: its Schedule's uid (checked when a create answers 409).
LABEL_SCHEDULE_UID = "kubetask.dev/schedule-uid"
#: Annotation of a scheduled Run: its fire time (ISO-8601 UTC).
SCHEDULED_TIME = "kubetask.dev/scheduled-time"
#: Fires whose run has ended are kept this long (then the resync deletes them).
FIRE_RETENTION = timedelta(days=7)

Apply = Callable[[str, m.Event], Awaitable[Any]]


def schedule_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def run_labels(name: str, uid: str) -> dict[str, str]:
    return {LABEL_SCHEDULE: name, LABEL_SCHEDULE_UID: uid}


@dataclass
class _Fire:
    """A fire whose Run is to be created (read from its row)."""

    at: datetime
    payload: dict[str, Any]


class Schedules:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        kube: Kube,
        settings: Settings,
        intake: Intake,
        apply: Apply,
        run_recorded: Callable[[str], None],
        wake: Callable[[datetime], None],
    ) -> None:
        self.sessions = sessions
        self.kube = kube
        self.settings = settings
        self.intake = intake
        self.apply = apply
        self.run_recorded = run_recorded
        self.wake = wake
        self.queue = WorkQueue(name="schedules")
        #: Run id -> schedule key of the open fires seen: a run's end reconciles its
        #: schedule at once (a hint; the reconcile reads the runs' rows).
        self.by_run: dict[str, str] = {}
        #: Schedule key -> (uid, generation) last reconciled: our own status patches,
        #: echoed by the watch, cost nothing.
        self._seen: dict[str, tuple[str, Any]] = {}
        self._status: dict[str, dict[str, Any]] = {}

    # ---- hints -----------------------------------------------------------------------------

    def on_event(self, kind: str, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        key = schedule_key(meta["namespace"], meta["name"])
        if kind != "DELETED" and self._seen.get(key) == (meta.get("uid"), meta.get("generation")):
            return  # no spec change (e.g. our own status patch coming back)
        self.queue.add(key)

    def run_ended(self, run_id: str) -> None:
        key = self.by_run.pop(run_id, None)
        if key is not None:
            self.queue.add(key)

    # ---- the reconcile ---------------------------------------------------------------------

    async def reconcile(self, key: str) -> None:
        ns, name = key.split("/", 1)
        body = await self.kube.get_object("schedules", ns, name)
        if body is None:
            await self._forget(key)
            return
        meta = body["metadata"]
        uid, generation = meta["uid"], meta.get("generation")
        try:
            spec = ScheduleSpec.model_validate(body.get("spec") or {})
            cron = Cron.parse(spec.cron, spec.timezone)
        except (ValidationError, CronError) as e:
            why = str(e.errors()[0]["msg"]) if isinstance(e, ValidationError) else str(e)
            async with self.sessions.begin() as s:
                await clear_timer(s, kind=SCHEDULE, key=key)
            await self._patch_status(
                key,
                {
                    "observedGeneration": generation,
                    "nextScheduleTime": None,
                    "upcoming": None,
                    "conditions": [condition("Ready", False, "InvalidSpec", why)],
                },
            )
            self._seen[key] = (uid, generation)
            return
        created = _parse_time(meta.get("creationTimestamp")) or utcnow()
        now = utcnow()
        cancel: list[str] = []
        async with self.sessions.begin() as s:
            row = await lock_schedule(s, key, uid=uid, cron=cron)
            opened = await self._open_fires(s, uid)
            active = [f for f in opened if f.state in ("pending", "created")]
            buffered = [f for f in opened if f.state == "buffered"]
            if not active and buffered:  # BufferOne: the run it waited for has ended
                buffered[0].state = "pending"
                active, buffered = [buffered[0]], []
            due = plan.Due([], 0, row.next_fire_at)
            changed = (row.cron, row.timezone) != (cron.expression, cron.timezone)
            if spec.paused:
                row.paused, row.next_fire_at = True, None
            else:
                if row.paused or row.next_fire_at is None or changed:
                    # A new Schedule fires from its creation (fire times missed before its
                    # first reconcile are caught up); a resumed or changed one from now.
                    fresh = row.last_fire_at is None and row.next_fire_at is None
                    fresh = fresh and not row.paused and not changed
                    since = created if fresh else max(now, row.last_fire_at or now)
                    row.next_fire_at = cron.next(after=since)
                    row.cron, row.timezone, row.paused = cron.expression, cron.timezone, False
                due = plan.Due([], 0, None)
                if row.next_fire_at is not None:
                    due = plan.due(
                        cron,
                        next_fire=row.next_fire_at,
                        now=now,
                        catch_up=spec.catch_up,
                        deadline_seconds=spec.starting_deadline_seconds,
                        grace_seconds=self.settings.schedule_grace_seconds,
                    )
            decided = plan.decide(
                due.fires, policy=spec.overlap_policy, active=len(active), buffered=bool(buffered)
            )
            if decided.cancel_previous and any(d.state == "pending" for d in decided.decisions):
                for fire in active:
                    if fire.state == "pending":  # its Run does not exist yet: it never will
                        fire.state, fire.open = "skipped", False
                    elif fire.run_id is not None:
                        cancel.append(fire.run_id)
                if cancel:
                    await s.execute(
                        update(t.Run)
                        .where(t.Run.id.in_(cancel), t.Run.finished_at.is_(None))
                        .values(cancel_requested=True)
                    )
            for d in decided.decisions:
                state = d.state
                fire_payload: dict[str, Any] = {}
                if state != "skipped":
                    fire_payload = plan.payload(
                        spec.payload,
                        fire_at=d.at,
                        last=row.last_run_fire_at,
                        timezone=spec.timezone,
                        schedule_id=key,
                        upcoming=cron.upcoming(after=d.at, count=plan.UPCOMING),
                    )
                    row.last_run_fire_at = d.at
                else:
                    row.skipped += 1
                await s.execute(
                    pg_insert(t.ScheduleFire)
                    .values(
                        schedule_uid=uid,
                        fire_at=d.at,
                        schedule=key,
                        state=state,
                        manual=False,
                        payload=fire_payload,
                        open=state != "skipped",
                    )
                    .on_conflict_do_nothing(
                        index_elements=[t.ScheduleFire.schedule_uid, t.ScheduleFire.fire_at]
                    )
                )
                row.last_fire_at = max(row.last_fire_at or d.at, d.at)
            row.missed += due.missed
            if due.missed:
                log.warning(
                    "schedule %s: %d fire time(s) missed while no operator ran (catchUp %s)",
                    key,
                    due.missed,
                    spec.catch_up,
                )
            if not spec.paused:
                row.next_fire_at = due.next
            if row.next_fire_at is not None:
                await set_timer(s, kind=SCHEDULE, key=key, due_at=row.next_fire_at)
            else:
                await clear_timer(s, kind=SCHEDULE, key=key)
        if row.next_fire_at is not None:
            self.wake(row.next_fire_at)
        for d in decided.decisions:
            if d.state == "pending":
                log.info("schedule %s: fires for %s", key, iso(d.at))
        for run_id in cancel:
            await self.apply(
                run_id,
                m.CancelRequested(
                    "Superseded",
                    f"Schedule {key} fired again and its overlapPolicy is CancelPrevious: a new run replaces "
                    "this one",
                ),
            )
        # The Runs of pending fires, old (a crash before they existed) and new.
        async with self.sessions() as s:
            todo = (
                await s.execute(
                    select(t.ScheduleFire.fire_at, t.ScheduleFire.payload)
                    .where(t.ScheduleFire.schedule_uid == uid, t.ScheduleFire.state == "pending")
                    .order_by(t.ScheduleFire.fire_at)
                )
            ).all()
        for fire_at, fire_payload in todo:
            await self._create_run(
                key, ns=ns, name=name, uid=uid, spec=spec, fire=_Fire(fire_at, fire_payload)
            )
        await self._write_status(key, uid=uid, generation=generation, cron=cron, spec=spec, now=utcnow())
        self._seen[key] = (uid, generation)

    async def _open_fires(self, s: AsyncSession, uid: str) -> list[t.ScheduleFire]:
        """The schedule's open fires, those whose run has ended closed on the way."""
        rows = list(
            (
                await s.execute(
                    select(t.ScheduleFire)
                    .where(t.ScheduleFire.schedule_uid == uid, t.ScheduleFire.open.is_(True))
                    .order_by(t.ScheduleFire.fire_at)
                    .with_for_update()
                )
            ).scalars()
        )
        ids = [f.run_id for f in rows if f.run_id is not None]
        ended: set[str] = set()
        if ids:
            ended = set(
                (
                    await s.execute(select(t.Run.id).where(t.Run.id.in_(ids), t.Run.finished_at.is_not(None)))
                ).scalars()
            )
        out = []
        for fire in rows:
            if fire.run_id is not None and fire.run_id in ended:
                fire.open = False
                continue
            if fire.run_id is not None:
                self.by_run[fire.run_id] = fire.schedule
            out.append(fire)
        return out

    async def _create_run(
        self, key: str, *, ns: str, name: str, uid: str, spec: ScheduleSpec, fire: _Fire
    ) -> None:
        """The Run of one pending fire (idempotent: the name is the fire's), recorded.

        A run of that name already recorded is the fire's (created before a crash, and
        perhaps over and deleted since): it is adopted, never created a second time."""
        async with self.sessions() as s:
            known = (
                await s.execute(
                    select(t.Run.id, t.Run.name).where(
                        t.Run.namespace == ns,
                        t.Run.name.in_(
                            [
                                plan.run_name(name, uid, fire.at),
                                plan.run_name(name, uid, fire.at, full_uid=True),
                            ]
                        ),
                    )
                )
            ).first()
        if known is not None:
            run_id, run_name = known
        else:
            body = await self._run_for(ns, name, uid, spec, fire, full_uid=False)
            if body is None:  # five characters of our uid met another Schedule's Run
                body = await self._run_for(ns, name, uid, spec, fire, full_uid=True)
            if body is None:
                raise RuntimeError(
                    f"schedule {key}: a Run named for {iso(fire.at)} belongs to another Schedule"
                )
            run_name = body["metadata"]["name"]
            run_id = await self.intake.record(body)
        async with self.sessions.begin() as s:
            await s.execute(
                update(t.ScheduleFire)
                .where(t.ScheduleFire.schedule_uid == uid, t.ScheduleFire.fire_at == fire.at)
                .values(state="created", run_id=run_id, run_name=run_name)
            )
            await s.execute(
                update(t.Schedule)
                .where(
                    t.Schedule.key == key,
                    t.Schedule.uid == uid,
                    (t.Schedule.last_run_id.is_(None)) | (t.Schedule.last_run_fire_at <= fire.at),
                )
                .values(last_run_name=run_name, last_run_id=run_id)
            )
        self.by_run[run_id] = key
        self.run_recorded(run_id)

    async def _run_for(
        self, ns: str, name: str, uid: str, spec: ScheduleSpec, fire: _Fire, *, full_uid: bool
    ) -> dict[str, Any] | None:
        """The fire's Run: created, or found (ours: the uid label says so); None when a
        Run of that name belongs to another Schedule."""
        run_name = plan.run_name(name, uid, fire.at, full_uid=full_uid)
        body = {
            "apiVersion": API_VERSION,
            "kind": "Run",
            "metadata": {
                "name": run_name,
                "namespace": ns,
                "labels": run_labels(name, uid),
                "annotations": {SCHEDULED_TIME: iso(fire.at)},
            },
            "spec": {"task": spec.task, "payload": fire.payload},
        }
        created = await self.kube.create_object("runs", ns, body)
        if created is not None:
            log.info("schedule %s/%s: created Run %s for %s", ns, name, run_name, iso(fire.at))
            return created
        found = await self.kube.get_object("runs", ns, run_name)
        if found is None:  # 409, then gone: try again later (its row, if any, is adopted then)
            raise RuntimeError(f"the Run {ns}/{run_name} answered 409, then was gone; retrying")
        labels = found["metadata"].get("labels") or {}
        return found if labels.get(LABEL_SCHEDULE_UID) == uid else None

    async def _forget(self, key: str) -> None:
        """The Schedule is gone: no more fires (its runs go on; its fires' rows stay for
        their retention)."""
        async with self.sessions.begin() as s:
            await s.execute(delete(t.Schedule).where(t.Schedule.key == key))
            await clear_timer(s, kind=SCHEDULE, key=key)
        self._seen.pop(key, None)
        self._status.pop(key, None)

    # ---- status ----------------------------------------------------------------------------

    async def _write_status(
        self, key: str, *, uid: str, generation: Any, cron: Cron, spec: ScheduleSpec, now: datetime
    ) -> None:
        async with self.sessions() as s:
            row = await s.get(t.Schedule, key)
            active = (
                await s.execute(
                    select(t.ScheduleFire.run_name)
                    .where(
                        t.ScheduleFire.schedule_uid == uid,
                        t.ScheduleFire.open.is_(True),
                        t.ScheduleFire.state.in_(("pending", "created")),
                    )
                    .order_by(t.ScheduleFire.fire_at)
                )
            ).scalars()
            names = [n for n in active if n]
        if row is None:
            return
        upcoming = [] if spec.paused or row.next_fire_at is None else [row.next_fire_at]
        if upcoming:
            upcoming += cron.upcoming(after=upcoming[0], count=plan.UPCOMING - 1)
        message = (
            "paused: nothing fires until spec.paused is false"
            if spec.paused
            else f"next run at {iso(row.next_fire_at)}"
            if row.next_fire_at
            else "the expression fires no more"
        )
        await self._patch_status(
            key,
            {
                "observedGeneration": generation,
                "nextScheduleTime": iso(row.next_fire_at) if not spec.paused else None,
                "lastScheduleTime": iso(row.last_fire_at),
                "lastRun": row.last_run_name,
                "lastRunId": row.last_run_id,
                "active": len(names),
                "activeRuns": names,
                "skipped": row.skipped,
                "missed": row.missed,
                "upcoming": [iso(u) for u in upcoming],
                "conditions": [condition("Ready", True, "Paused" if spec.paused else "Scheduled", message)],
            },
        )

    async def _patch_status(self, key: str, status: dict[str, Any]) -> None:
        """Patch what changed; a condition keeps its lastTransitionTime while its status
        stays the same."""
        previous = self._status.get(key) or {}
        old = {c["type"]: c for c in previous.get("conditions", [])}
        for cond in status.get("conditions", []):
            was = old.get(cond["type"])
            if was is not None and was["status"] == cond["status"] and was["reason"] == cond["reason"]:
                cond["lastTransitionTime"] = was["lastTransitionTime"]
        if status == previous:
            return
        ns, name = key.split("/", 1)
        if await self.kube.patch_status("schedules", ns, name, status):
            self._status[key] = status

    # ---- the resync ------------------------------------------------------------------------

    async def relist(self, mine: Callable[[str], bool], *, initial: bool) -> None:
        """Enqueue what an event could have missed: every Schedule at start-up; later,
        Schedules whose spec the status does not reflect, rows whose Schedule is gone,
        fires waiting for a Run, and open fires whose run has ended."""
        seen: set[str] = set()
        async for body in self.kube.iter_objects("schedules"):
            meta = body["metadata"]
            if not mine(meta["namespace"]):
                continue
            key = schedule_key(meta["namespace"], meta["name"])
            seen.add(key)
            observed = (body.get("status") or {}).get("observedGeneration")
            if initial or observed != meta.get("generation"):
                self.queue.add(key)
        async with self.sessions() as s:
            rows = set((await s.execute(select(t.Schedule.key))).scalars())
            needy = set(
                (
                    await s.execute(
                        select(t.ScheduleFire.schedule)
                        .outerjoin(t.Run, t.Run.id == t.ScheduleFire.run_id)
                        .where(
                            t.ScheduleFire.open.is_(True),
                            (t.ScheduleFire.state == "pending") | t.Run.finished_at.is_not(None),
                        )
                        .distinct()
                    )
                ).scalars()
            )
        for key in (rows - seen) | needy:
            if mine(key.split("/", 1)[0]):
                self.queue.add(key)

    async def retention(self) -> None:
        """Delete fires whose run has ended (or never was) after :data:`FIRE_RETENTION`."""
        cut = utcnow() - FIRE_RETENTION
        async with self.sessions.begin() as s:
            await s.execute(
                delete(t.ScheduleFire).where(
                    t.ScheduleFire.schedule_uid.in_(
                        select(t.ScheduleFire.schedule_uid)
                        .where(t.ScheduleFire.open.is_(False), t.ScheduleFire.created_at < cut)
                        .limit(1000)
                    ),
                    t.ScheduleFire.open.is_(False),
                    t.ScheduleFire.created_at < cut,
                )
            )


async def lock_schedule(s: AsyncSession, key: str, *, uid: str, cron: Cron) -> t.Schedule:
    """The schedule's row, locked (FOR UPDATE) in ``s``: inserted for a new Schedule, reset
    for a Schedule deleted and created again under the same name (another uid)."""
    ns, name = key.split("/", 1)
    await s.execute(
        pg_insert(t.Schedule)
        .values(
            key=key,
            namespace=ns,
            name=name,
            uid=uid,
            cron=cron.expression,
            timezone=cron.timezone,
            paused=False,
            skipped=0,
            missed=0,
        )
        .on_conflict_do_nothing(index_elements=[t.Schedule.key])
    )
    row = (await s.execute(select(t.Schedule).where(t.Schedule.key == key).with_for_update())).scalar_one()
    if row.uid != uid:
        row.uid, row.paused, row.next_fire_at, row.last_fire_at = uid, False, None, None
        row.last_run_fire_at, row.last_run_name, row.last_run_id = None, None, None
        row.skipped, row.missed = 0, 0
    return row


def _parse_time(raw: Any) -> datetime | None:
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
