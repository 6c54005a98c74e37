"""Schedules of a namespace (``/api/v1/namespaces/{namespace}/schedules``): list and read
them (the Schedule resources, with when they fire from PostgreSQL), pause and resume
them (a merge patch of ``spec.paused``, as ``kubectl patch`` would), and trigger one now.

Reading needs ``list``/``get schedules``, pausing ``patch schedules``. Triggering now
needs ``get schedules`` and ``create runs`` (what ``kubectl create job --from=cronjob/x``
needs of a CronJob): it creates a Run of the Schedule's task with the scheduled payload
(``timestamp`` is now), labelled ``kubetask.dev/schedule``, whatever the overlap policy
and even while paused; the Schedule's later fire times count it as one of its runs.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from kubernetes_asyncio.client.rest import ApiException
from pydantic import ValidationError
from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert

from kubetask.api.actions import RUNS, TRIGGERED_BY
from kubetask.api.auth import authorize
from kubetask.api.catalog import list_objects
from kubetask.api.errors import ApiError, kube_error, read_model
from kubetask.api.runs import dns_label, reply
from kubetask.api.state import SESSIONS
from kubetask.apimodels import ScheduleItem, ScheduleList, ScheduleUpdate, TriggerResponse
from kubetask.control.schedules import (
    SCHEDULE,
    SCHEDULED_TIME,
    lock_schedule,
    run_labels,
    schedule_key,
)
from kubetask.control.timers import set_timer, utcnow
from kubetask.engine import schedules as plan
from kubetask.engine.cron import Cron, CronError
from kubetask.spec import API_VERSION, GROUP, VERSION, ScheduleSpec
from kubetask.store import tables as t
from kubetask.store.journal import WAKE_CHANNEL
from kubetask.store.runs import iso

_ACTIVE = ("pending", "created")


async def _rows(request: web.Request, ns: str, name: str | None = None) -> dict[str, t.Schedule]:
    stmt = select(t.Schedule).where(t.Schedule.namespace == ns)
    if name is not None:
        stmt = stmt.where(t.Schedule.name == name)
    async with request.app[SESSIONS]() as s:
        return {row.name: row for row in (await s.execute(stmt)).scalars()}


async def _active(request: web.Request, uids: list[str]) -> dict[str, list[str]]:
    """Unfinished runs (names) by schedule uid."""
    if not uids:
        return {}
    async with request.app[SESSIONS]() as s:
        found = (
            await s.execute(
                select(t.ScheduleFire.schedule_uid, t.ScheduleFire.run_name)
                .outerjoin(t.Run, t.Run.id == t.ScheduleFire.run_id)
                .where(
                    t.ScheduleFire.schedule_uid.in_(uids),
                    t.ScheduleFire.open.is_(True),
                    t.ScheduleFire.state.in_(_ACTIVE),
                    t.Run.finished_at.is_(None),
                )
                .order_by(t.ScheduleFire.fire_at)
            )
        ).all()
    out: dict[str, list[str]] = {}
    for uid, run_name in found:
        if run_name:
            out.setdefault(uid, []).append(run_name)
    return out


def _item(body: dict[str, Any], row: t.Schedule | None, active: list[str]) -> ScheduleItem:
    meta, raw, status = body["metadata"], body.get("spec") or {}, body.get("status") or {}
    item = ScheduleItem(
        name=meta["name"],
        namespace=meta["namespace"],
        task=str(raw.get("task") or ""),
        cron=str(raw.get("cron") or ""),
        created_at=meta.get("creationTimestamp"),
        active_runs=active,
    )
    try:
        spec = ScheduleSpec.model_validate(raw)
        cron = Cron.parse(spec.cron, spec.timezone)
    except (ValidationError, CronError) as e:
        item.ready = False
        item.message = str(e.errors()[0]["msg"]) if isinstance(e, ValidationError) else str(e)
        return item
    item.timezone, item.paused, item.payload = spec.timezone, spec.paused, spec.payload
    item.overlap_policy, item.catch_up = spec.overlap_policy, spec.catch_up
    item.starting_deadline_seconds = spec.starting_deadline_seconds
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    item.ready = None if ready is None else ready.get("status") == "True"
    item.message = (ready or {}).get("message") or ""
    if row is not None and row.uid == meta["uid"]:
        item.last_fire_time, item.last_run, item.last_run_id = (
            iso(row.last_fire_at),
            row.last_run_name,
            row.last_run_id,
        )
        item.skipped, item.missed = row.skipped, row.missed
        if not spec.paused and row.next_fire_at is not None:
            item.next_fire_time = iso(row.next_fire_at)
            later = cron.upcoming(after=row.next_fire_at, count=plan.UPCOMING - 1)
            item.upcoming = [iso(row.next_fire_at) or "", *(iso(u) or "" for u in later)]
    return item


async def _get(request: web.Request, ns: str, name: str) -> dict[str, Any]:
    try:
        body = await request.app[RUNS].kube.get_object("schedules", ns, name)
    except ApiException as e:
        raise kube_error(e, f"read Schedule {ns}/{name}") from None
    if body is None:
        raise ApiError(
            404,
            "schedule_not_found",
            f"no Schedule {name!r} in namespace {ns!r}; `kubectl -n {ns} get schedules` lists them",
        )
    return body


async def _one(request: web.Request, body: dict[str, Any]) -> ScheduleItem:
    meta = body["metadata"]
    row = (await _rows(request, meta["namespace"], meta["name"])).get(meta["name"])
    active = await _active(request, [meta["uid"]])
    return _item(body, row, active.get(meta["uid"], []))


def _path(request: web.Request) -> tuple[str, str]:
    ns = dns_label("namespace", request.match_info["namespace"])
    return ns, dns_label("Schedule", request.match_info["name"])


async def list_schedules(request: web.Request) -> web.Response:
    """``GET /api/v1/namespaces/{namespace}/schedules`` (``list schedules``)."""
    ns = dns_label("namespace", request.match_info["namespace"])
    await authorize(request, "list", "schedules", ns)
    bodies = sorted(await list_objects(request, "schedules", ns), key=lambda b: b["metadata"]["name"])
    rows = await _rows(request, ns)
    active = await _active(request, [b["metadata"]["uid"] for b in bodies])
    items = [_item(b, rows.get(b["metadata"]["name"]), active.get(b["metadata"]["uid"], [])) for b in bodies]
    return reply(ScheduleList(items=items))


async def get_schedule(request: web.Request) -> web.Response:
    """``GET /api/v1/namespaces/{namespace}/schedules/{name}`` (``get schedules``)."""
    ns, name = _path(request)
    await authorize(request, "get", "schedules", ns)
    return reply(await _one(request, await _get(request, ns, name)))


async def patch_schedule(request: web.Request) -> web.Response:
    """``PATCH /api/v1/namespaces/{namespace}/schedules/{name}`` (``patch schedules``): pause
    (``{"paused": true}``) or resume (``false``). A resumed schedule does not catch up on
    the fire times it was paused over."""
    ns, name = _path(request)
    await authorize(request, "patch", "schedules", ns)
    update = await read_model(request, ScheduleUpdate, 16 * 1024)
    try:
        body = await request.app[RUNS].kube.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            ns,
            "schedules",
            name,
            {"spec": {"paused": update.paused}},
            _content_type="application/merge-patch+json",
        )
    except ApiException as e:
        if e.status == 404:
            await _get(request, ns, name)  # the 404 that names it
        raise kube_error(e, f"patch Schedule {ns}/{name}") from None
    return reply(await _one(request, body))


async def trigger_schedule(request: web.Request) -> web.Response:
    """``POST /api/v1/namespaces/{namespace}/schedules/{name}/trigger`` (``get schedules`` and
    ``create runs``): one run of the Schedule's task now, with its payload."""
    ns, name = _path(request)
    await authorize(request, "get", "schedules", ns)
    user = await authorize(request, "create", "runs", ns)
    body = await _get(request, ns, name)
    meta = body["metadata"]
    try:
        spec = ScheduleSpec.model_validate(body.get("spec") or {})
        cron = Cron.parse(spec.cron, spec.timezone)
    except (ValidationError, CronError) as e:
        why = str(e.errors()[0]["msg"]) if isinstance(e, ValidationError) else str(e)
        raise ApiError(409, "schedule_invalid", f"Schedule {ns}/{name} cannot run: {why}") from None
    key, uid = schedule_key(ns, name), meta["uid"]
    runs = request.app[RUNS]
    sessions = request.app[SESSIONS]
    now = utcnow()
    async with sessions() as s:
        row = await s.get(t.Schedule, key)
        last = row.last_run_fire_at if row is not None and row.uid == uid else None
    payload = plan.payload(
        spec.payload,
        fire_at=now,
        last=last,
        timezone=spec.timezone,
        schedule_id=key,
        upcoming=cron.upcoming(after=now, count=plan.UPCOMING),
    )
    run = {
        "apiVersion": API_VERSION,
        "kind": "Run",
        "metadata": {
            "generateName": f"{name}-{plan.uid_part(uid)}-manual-",
            "namespace": ns,
            "labels": run_labels(name, uid),
            "annotations": {SCHEDULED_TIME: iso(now), TRIGGERED_BY: user.username[:253]},
        },
        "spec": {"task": spec.task, "payload": payload},
    }
    try:
        created = await runs.kube.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "runs", run)
    except ApiException as e:
        raise kube_error(e, f"create a Run of Schedule {ns}/{name}") from None
    run_id = await runs.intake.record(created)
    run_name = created["metadata"]["name"]
    async with sessions.begin() as s:
        row = await lock_schedule(s, key, uid=uid, cron=cron)
        await s.execute(
            pg_insert(t.ScheduleFire)
            .values(
                schedule_uid=uid,
                fire_at=now,
                schedule=key,
                state="created",
                manual=True,
                payload=payload,
                run_name=run_name,
                run_id=run_id,
                open=True,
            )
            .on_conflict_do_nothing(index_elements=[t.ScheduleFire.schedule_uid, t.ScheduleFire.fire_at])
        )
        row.last_run_fire_at, row.last_run_name, row.last_run_id = now, run_name, run_id
        # The leader looks at the schedule now (its status counts the run).
        await set_timer(s, kind=SCHEDULE, key=key, due_at=now)
        await s.execute(text("SELECT pg_notify(:channel, '')"), {"channel": WAKE_CHANNEL})
    return reply(TriggerResponse(id=run_id, name=run_name, namespace=ns, task=spec.task), 201)
