"""Tasks and queues of a namespace (``/api/v1/namespaces/{namespace}/...``): the Task and
Queue resources from the API server, with live counts from PostgreSQL; and the one
change callers make to queues (pause, resume, limits), which patches the Queue resource
as ``kubectl`` would (the reconciler applies it to admission).

Listing needs ``list tasks`` / ``list queues`` in the namespace; changing a queue needs
``patch queues`` (the operator creates the Queue resource when it is missing).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from kubernetes_asyncio.client.rest import ApiException
from pydantic import ValidationError
from sqlalchemy import ARRAY, String, case, func, literal, select, true

from kubetask.api.actions import RUNS
from kubetask.api.auth import authorize
from kubetask.api.errors import ApiError, kube_error, read_model
from kubetask.api.runs import dns_label, parse_time_field, reply
from kubetask.api.state import SESSIONS
from kubetask.apimodels import (
    QueueItem,
    QueueList,
    QueueUpdate,
    RunCounts,
    TaskItem,
    TaskList,
    TaskStats,
)
from kubetask.control.catalogue import queue_key
from kubetask.kube import PAGE
from kubetask.spec import API_VERSION, GROUP, VERSION, QueueSpec, RateLimit, TaskSpec
from kubetask.store import tables as t
from kubetask.store.runs import iso


async def list_objects(request: web.Request, plural: str, namespace: str) -> list[dict[str, Any]]:
    """Every ``plural`` object in ``namespace``, a page at a time."""
    custom = request.app[RUNS].kube.custom
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"limit": PAGE}
        if token:
            kwargs["_continue"] = token
        try:
            res = await custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural, **kwargs)
        except ApiException as e:
            raise kube_error(e, f"list {plural} in namespace {namespace}") from None
        items.extend(res.get("items", []))
        token = (res.get("metadata") or {}).get("continue")
        if not token:
            return items


#: The window of a Task's statistics when ``since`` is not given.
TASK_STATS_SINCE = "24h"
_FAILED = ("Failed", "TimedOut", "Expired")


async def task_stats(request: web.Request, ns: str, since: datetime) -> dict[str, TaskStats]:
    """Per task of ``ns``: its runs created since ``since``, how they ended, and the median
    and 95th percentile of the durations of those that succeeded or failed (one query)."""
    # Seconds from start to end of the runs that succeeded or failed (NULL for the others,
    # which percentile_cont skips: a canceled run's time says nothing about the task).
    took = case(
        (
            t.Run.phase.in_(("Succeeded", *_FAILED)),
            func.extract("epoch", t.Run.finished_at - t.Run.started_at),
        ),
        else_=None,
    )
    stmt = (
        select(
            t.Run.task,
            func.count(),
            func.count().filter(t.Run.phase == "Succeeded"),
            func.count().filter(t.Run.phase.in_(_FAILED)),
            func.percentile_cont(0.5).within_group(took),
            func.percentile_cont(0.95).within_group(took),
        )
        .where(t.Run.namespace == ns, t.Run.created_at >= since)
        .group_by(t.Run.task)
    )
    async with request.app[SESSIONS]() as s:
        rows = (await s.execute(stmt)).all()
    out = {}
    for task, runs, succeeded, failed, p50, p95 in rows:
        ended = succeeded + failed
        out[task] = TaskStats(
            since=iso(since) or "",
            runs=runs,
            succeeded=succeeded,
            failed=failed,
            success_rate=succeeded / ended if ended else None,
            p50_seconds=None if p50 is None else float(p50),
            p95_seconds=None if p95 is None else float(p95),
        )
    return out


@dataclass(frozen=True)
class RecentRun:
    """One of a Task's newest runs, as the dashboard's tasks page shows it."""

    id: str
    phase: str
    created_at: datetime


async def last_runs(
    request: web.Request, ns: str, tasks: list[str], per_task: int = 5
) -> dict[str, list[RecentRun]]:
    """The newest ``per_task`` runs of each of ``tasks`` in ``ns`` (id, phase, created_at
    only): one query, a LATERAL index scan of ``ix_runs_task_created`` per task. The caller
    checked that the user may read the namespace's runs."""
    if not tasks:
        return {}
    names = func.unnest(literal(tasks, ARRAY(String))).table_valued("task").render_derived(name="names")
    newest = (
        select(t.Run.id, t.Run.phase, t.Run.created_at)
        .where(t.Run.task == names.c.task, t.Run.namespace == ns)
        .order_by(t.Run.created_at.desc())
        .limit(per_task)
        .lateral("newest")
    )
    stmt = select(names.c.task, newest.c.id, newest.c.phase, newest.c.created_at).select_from(
        names.join(newest, true())
    )
    async with request.app[SESSIONS]() as s:
        rows = (await s.execute(stmt)).all()
    out: dict[str, list[RecentRun]] = {}
    for task, run_id, phase, created_at in rows:
        out.setdefault(task, []).append(RecentRun(run_id, phase, created_at))
    for runs in out.values():
        runs.sort(key=lambda r: r.created_at, reverse=True)
    return out


async def task_list(request: web.Request, ns: str) -> TaskList:
    """The Tasks of ``ns`` (``list tasks``) with live counts and the statistics of their runs
    since the query's ``since`` (default :data:`TASK_STATS_SINCE`); the endpoint and the
    dashboard both read them through this."""
    await authorize(request, "list", "tasks", ns)
    since = parse_time_field("since", request.query.get("since") or TASK_STATS_SINCE, datetime.now(UTC))
    assert since is not None
    bodies = await list_objects(request, "tasks", ns)
    stats = await task_stats(request, ns, since)
    async with request.app[SESSIONS]() as s:
        rows = (
            await s.execute(
                select(t.Run.task, t.Run.phase, func.count())
                .where(t.Run.namespace == ns, t.Run.finished_at.is_(None))
                .group_by(t.Run.task, t.Run.phase)
            )
        ).all()
    counts: dict[str, dict[str, int]] = {}
    for task, phase, n in rows:
        counts.setdefault(task, {})[phase.lower()] = n
    items = []
    for body in sorted(bodies, key=lambda b: b["metadata"]["name"]):
        meta, status = body["metadata"], body.get("status") or {}
        try:
            spec = TaskSpec.model_validate(body.get("spec") or {})
        except ValidationError:
            spec = None
        ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
        live = counts.get(meta["name"], {})
        items.append(
            TaskItem(
                name=meta["name"],
                namespace=ns,
                queue=spec.queue_name(meta["name"]) if spec else meta["name"],
                image=spec.image if spec else None,
                entrypoint=spec.entrypoint if spec else None,
                inline_source=bool(spec and spec.source),
                max_attempts=spec.retry.max_attempts if spec else 0,
                max_duration_seconds=spec.max_duration_seconds if spec else None,
                ready=None if ready is None else ready.get("status") == "True",
                message=(ready or {}).get("message") or ("" if spec else "the spec is invalid"),
                created_at=meta.get("creationTimestamp"),
                runs=RunCounts(**{k: v for k, v in live.items() if k in RunCounts.model_fields}),
                recent=stats.get(meta["name"]) or TaskStats(since=iso(since) or ""),
            )
        )
    return TaskList(items=items)


async def list_tasks(request: web.Request) -> web.Response:
    """``GET /api/v1/namespaces/{namespace}/tasks`` (``list tasks``)."""
    return reply(await task_list(request, dns_label("namespace", request.match_info["namespace"])))


async def _queue_rows(request: web.Request, ns: str, name: str | None = None) -> dict[str, t.Queue]:
    """The queues' rows in PostgreSQL (limits as admission sees them, exact counts)."""
    stmt = select(t.Queue)
    stmt = (
        stmt.where(t.Queue.name == queue_key(ns, name))
        if name
        else stmt.where(t.Queue.name.startswith(f"{ns}/"))
    )
    async with request.app[SESSIONS]() as s:
        return {row.name.split("/", 1)[1]: row for row in (await s.execute(stmt)).scalars()}


def _queue_item(ns: str, name: str, row: t.Queue | None, resource: dict[str, Any] | None) -> QueueItem:
    item = QueueItem(name=name, namespace=ns, has_resource=resource is not None)
    if row is not None:
        item.concurrency_limit, item.per_key_concurrency_limit = row.concurrency_limit, row.per_key_limit
        item.paused, item.source = row.paused, row.source  # type: ignore[assignment]
        item.running, item.queued = row.running, row.queued
        if row.rate_limit is not None and row.rate_period:
            item.rate_limit = RateLimit(
                limit=row.rate_limit, period_seconds=int(row.rate_period), per_key=bool(row.rate_per_key)
            )
    if resource is not None:
        # The resource is what the caller asked for; the row follows once the reconciler
        # applied it (a moment later).
        try:
            spec = QueueSpec.model_validate(resource.get("spec") or {})
        except ValidationError:
            return item
        item.concurrency_limit, item.per_key_concurrency_limit = (
            spec.concurrency_limit,
            spec.per_key_concurrency_limit,
        )
        item.paused, item.source = spec.paused, "queue"
        item.rate_limit = spec.rate_limit
    return item


async def queue_list(request: web.Request, ns: str) -> QueueList:
    """The queues of ``ns`` (``list queues``): the endpoint's and the dashboard's."""
    await authorize(request, "list", "queues", ns)
    resources = {b["metadata"]["name"]: b for b in await list_objects(request, "queues", ns)}
    rows = await _queue_rows(request, ns)
    items = [
        _queue_item(ns, name, rows.get(name), resources.get(name))
        for name in sorted(set(rows) | set(resources))
    ]
    return QueueList(items=items)


async def list_queues(request: web.Request) -> web.Response:
    """``GET /api/v1/namespaces/{namespace}/queues`` (``list queues``)."""
    return reply(await queue_list(request, dns_label("namespace", request.match_info["namespace"])))


async def patch_queue(request: web.Request) -> web.Response:
    """``PATCH /api/v1/namespaces/{namespace}/queues/{queue}`` (``patch queues``): change the
    Queue resource, creating it from the queue's current limits when missing (a Queue
    resource wins over Tasks' inline limits, so it starts from them)."""
    ns = dns_label("namespace", request.match_info["namespace"])
    name = dns_label("queue", request.match_info["queue"])
    await authorize(request, "patch", "queues", ns)
    update = await read_model(request, QueueUpdate, 16 * 1024)
    custom = request.app[RUNS].kube.custom
    patch = update.spec_patch()
    resource: dict[str, Any] | None = None
    for _ in range(3):  # a create and a patch may race with someone else's
        try:
            resource = await custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                ns,
                "queues",
                name,
                {"spec": patch},
                _content_type="application/merge-patch+json",
            )
            break
        except ApiException as e:
            if e.status != 404:
                raise kube_error(e, f"patch Queue {ns}/{name}") from None
        row = (await _queue_rows(request, ns, name)).get(name)
        spec: dict[str, Any] = {}
        if row is not None:
            spec = {"concurrencyLimit": row.concurrency_limit, "perKeyConcurrencyLimit": row.per_key_limit}
        spec = {k: v for k, v in (spec | patch).items() if v is not None}
        body = {
            "apiVersion": API_VERSION,
            "kind": "Queue",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
        try:
            resource = await custom.create_namespaced_custom_object(GROUP, VERSION, ns, "queues", body)
            break
        except ApiException as e:
            if e.status != 409:
                raise kube_error(e, f"create Queue {ns}/{name}") from None
    if resource is None:
        raise ApiError(409, "conflict", f"Queue {ns}/{name} kept changing; send the request again")
    row = (await _queue_rows(request, ns, name)).get(name)
    return reply(_queue_item(ns, name, row, resource))
