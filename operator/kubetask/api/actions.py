"""What callers do to runs: trigger (one, or a batch), cancel, replay, and both in bulk.

Every run enters the engine the same way: a trigger or a replay **creates a Run resource**
(so ``kubectl get runs`` shows it, and the reconciler treats it like any other), then
records its row at once with :class:`kubetask.control.intake.Intake` (the idempotent insert
keyed by the Run's uid that the reconciler does too), so the answer carries the run id.
A cancel sets ``spec.cancel`` on the Run resource, as ``kubectl patch`` would.

The operator's ServiceAccount makes these changes, after a SubjectAccessReview checked
that the caller may (``create runs`` to trigger or replay, ``patch runs`` to cancel).
Created Runs carry the caller's name in the annotation ``kubetask.dev/triggered-by``.

Idempotency keys: a trigger whose key is held (and unexpired) by a run answers that run
with ``isCached: true`` and creates nothing. Otherwise the new run claims the key through
the intake's claim (an upsert on the key, so of concurrent triggers exactly one wins); a
trigger that lost that race deletes the Run it had just created and answers the winner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from kubernetes_asyncio.client.rest import ApiException
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.admission import Admission
from kubetask.api.auth import User, authenticate, authorize
from kubetask.api.errors import ApiError, kube_error, read_model
from kubetask.api.runs import RunFilter, dns_label, find_run, parse_time_field, reply, scope
from kubetask.api.state import SESSIONS
from kubetask.apimodels import (
    MAX_BATCH_BODY_BYTES,
    MAX_TRIGGER_BODY_BYTES,
    TERMINAL_PHASES,
    BatchTriggerRequest,
    BatchTriggerResponse,
    BulkCounts,
    BulkProgress,
    BulkRequest,
    BulkSummary,
    CancelResponse,
    ReplayRequest,
    ReplayResponse,
    TriggerRequest,
    TriggerResponse,
)
from kubetask.control.catalogue import Catalogue, TaskInfo
from kubetask.control.intake import Intake
from kubetask.control.transitions import Applied, EventSource
from kubetask.engine import machine as m
from kubetask.kube import Kube
from kubetask.settings import Settings
from kubetask.spec import API_VERSION, GROUP, VERSION, RunSpec
from kubetask.store import tables as t

log = logging.getLogger("kubetask.api.actions")

REPLAY_OF = "kubetask.dev/replay-of"
"""Label of a replayed Run: the original run's id."""
TRIGGERED_BY = "kubetask.dev/triggered-by"
"""Annotation of a Run created through the API: the caller's user name."""
#: Runs a batch or a bulk action handles at once (each is a request to the API server).
CONCURRENCY = 16


async def _nothing_to_apply(run_id: str, event: m.Event | EventSource) -> Applied | None:
    """The API only records runs; the reconciler (the leader) moves them."""
    return None


class Runs:
    """Creates, cancels and replays Run resources on behalf of callers."""

    def __init__(self, *, kube: Kube, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> None:
        self.kube = kube
        self.sessions = sessions
        self.settings = settings
        # The API's own catalogue: only its task index is used (record() reads a Task's
        # queue from it); the leader's catalogue configures queues.
        self.catalogue = Catalogue(
            kube=kube, admission=Admission(sessions), settings=settings, queue_changed=lambda _: None
        )
        self.intake = Intake(
            sessions=sessions, catalogue=self.catalogue, settings=settings, apply=_nothing_to_apply
        )

    # ---- tasks ---------------------------------------------------------------------------

    async def task(self, namespace: str, name: str) -> TaskInfo:
        """The Task (read from the API server now), or 404."""
        dns_label("namespace", namespace)
        dns_label("Task", name)
        try:
            body = await self.kube.get_object("tasks", namespace, name)
        except ApiException as e:
            raise kube_error(e, f"read Task {namespace}/{name}") from None
        if body is None:
            raise ApiError(
                404,
                "task_not_found",
                f"no Task {name!r} in namespace {namespace!r}; `kubectl -n {namespace} get tasks` lists them",
            )
        info = self.catalogue.index_task(body)
        if info is None:
            raise ApiError(
                409,
                "task_invalid",
                f"Task {namespace}/{name} has an invalid spec; `kubectl -n {namespace} describe task {name}` says why",
            )
        return info

    # ---- trigger ---------------------------------------------------------------------------

    async def trigger(self, info: TaskInfo, request: TriggerRequest, user: User) -> TriggerResponse:
        """One run of ``info`` (or the run holding the request's idempotencyKey)."""
        ns, task = info.namespace, info.name
        key = request.idempotency_key
        if key is not None and (held := await self._held(ns, task, key)) is not None:
            return held
        spec = request.run_spec(task)
        body = await self.create(ns, spec, user=user)
        run_id = await self.intake.record(body)
        meta = body["metadata"]
        if key is not None:
            async with self.sessions() as s:
                row = await s.get(t.Run, run_id)
            assert row is not None
            owner = await self.intake.claim(row)  # the reconciler claims again: harmless
            if owner is not None:  # another trigger (or Run) won the key meanwhile
                await self._delete_quietly(ns, meta["name"], meta["uid"])
                async with self.sessions() as s:
                    name = await s.scalar(select(t.Run.name).where(t.Run.id == owner))
                return TriggerResponse(id=owner, name=name or "", namespace=ns, task=task, is_cached=True)
            if request.idempotency_key_ttl_seconds is not None:
                await self._set_key_ttl(ns, task, key, run_id, request.idempotency_key_ttl_seconds)
        return TriggerResponse(id=run_id, name=meta["name"], namespace=ns, task=task, is_cached=False)

    async def create(
        self, namespace: str, spec: RunSpec, *, user: User, labels: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Create a Run resource (``generateName: <task>-``); returns it as created."""
        body = {
            "apiVersion": API_VERSION,
            "kind": "Run",
            "metadata": {
                "generateName": f"{spec.task[:57]}-",
                "namespace": namespace,
                "labels": labels or {},
                "annotations": {TRIGGERED_BY: user.username[:253]},
            },
            "spec": spec.model_dump(by_alias=True, exclude_defaults=True) | {"task": spec.task},
        }
        try:
            created: dict[str, Any] = await self.kube.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, "runs", body
            )
        except ApiException as e:
            raise kube_error(e, f"create a Run of task {spec.task} in namespace {namespace}") from None
        return created

    async def _held(self, ns: str, task: str, key: str) -> TriggerResponse | None:
        """The run holding an unexpired idempotencyKey, if any."""
        async with self.sessions() as s:
            row = (
                await s.execute(
                    select(t.Run.id, t.Run.name)
                    .join(t.IdempotencyKey, t.IdempotencyKey.run_id == t.Run.id)
                    .where(
                        t.IdempotencyKey.namespace == ns,
                        t.IdempotencyKey.task == task,
                        t.IdempotencyKey.key == key,
                        t.IdempotencyKey.expires_at > datetime.now(UTC),
                    )
                )
            ).one_or_none()
        if row is None:
            return None
        return TriggerResponse(id=row.id, name=row.name, namespace=ns, task=task, is_cached=True)

    async def _set_key_ttl(self, ns: str, task: str, key: str, run_id: str, ttl: int) -> None:
        async with self.sessions.begin() as s:
            await s.execute(
                update(t.IdempotencyKey)
                .where(
                    t.IdempotencyKey.namespace == ns,
                    t.IdempotencyKey.task == task,
                    t.IdempotencyKey.key == key,
                    t.IdempotencyKey.run_id == run_id,
                )
                .values(expires_at=datetime.now(UTC) + timedelta(seconds=ttl))
            )

    async def _delete_quietly(self, ns: str, name: str, uid: str) -> None:
        try:
            await self.kube.delete_object("runs", ns, name, uid=uid)
        except ApiException as e:  # it is Deduplicated then: harmless, and said in its status
            log.warning("could not delete the duplicate Run %s/%s: %s", ns, name, e.reason)

    # ---- cancel and replay ---------------------------------------------------------------

    async def cancel(self, run: t.Run) -> CancelResponse:
        """Set ``spec.cancel`` on the run's resource (only the very resource of this run)."""
        if run.phase in TERMINAL_PHASES:
            raise ApiError(
                409,
                "run_finished",
                f"run {run.id} already finished ({run.phase}); there is nothing to cancel",
            )
        gone = ApiError(
            409,
            "run_resource_gone",
            f"the Run resource {run.namespace}/{run.name} of run {run.id} no longer exists, so the run "
            "cannot be canceled through it (the operator ends a run whose resource was deleted)",
        )
        if run.resource_deleted:
            raise gone
        patch = {"metadata": {"uid": run.uid}, "spec": {"cancel": True}}
        try:
            await self.kube.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                run.namespace,
                "runs",
                run.name,
                patch,
                _content_type="application/merge-patch+json",
            )
        except ApiException as e:
            if e.status in (404, 409):  # gone, or another Run of the same name (the uid differs)
                raise gone from None
            raise kube_error(e, f"patch Run {run.namespace}/{run.name}") from None
        return CancelResponse(id=run.id, name=run.name, namespace=run.namespace, phase=run.phase)

    async def replay(self, run: t.Run, user: User, payload: dict[str, Any] | None = None) -> ReplayResponse:
        """A new Run of the same task with the same payload (or ``payload``; and the
        original's other settings but its idempotencyKey), labelled with the original's id."""
        spec = await self._replay_spec(run)
        if payload is not None:
            spec = spec.model_copy(update={"payload": payload})
        body = await self.create(run.namespace, spec, user=user, labels={REPLAY_OF: run.id})
        new_id = await self.intake.record(body)
        return ReplayResponse(
            id=new_id, name=body["metadata"]["name"], namespace=run.namespace, task=run.task, replay_of=run.id
        )

    async def _replay_spec(self, run: t.Run) -> RunSpec:
        resource = None
        if not run.resource_deleted:
            try:
                resource = await self.kube.get_object("runs", run.namespace, run.name)
            except ApiException as e:
                raise kube_error(e, f"read Run {run.namespace}/{run.name}") from None
        if resource is not None and resource["metadata"].get("uid") == run.uid:
            raw = dict(resource.get("spec") or {})
            raw.pop("cancel", None)
            raw.pop("idempotencyKey", None)
            try:
                return RunSpec.model_validate(raw)
            except ValueError:
                pass  # an invalid original: replay what the record holds
        return RunSpec(
            task=run.task,
            payload=run.payload or {},
            concurrency_key=run.concurrency_key,
            priority=run.priority,
            tags=list(run.tags or []),
            ttl_seconds_after_finished=run.ttl_seconds,
        )


RUNS: web.AppKey[Runs] = web.AppKey("runs", Runs)


# ---- endpoints --------------------------------------------------------------------------


async def trigger(request: web.Request) -> web.Response:
    """``POST /api/v1/namespaces/{namespace}/tasks/{task}/trigger`` (``create runs``)."""
    ns = dns_label("namespace", request.match_info["namespace"])
    task = request.match_info["task"]
    user = await authorize(request, "create", "runs", ns)
    body = await read_model(request, TriggerRequest, MAX_TRIGGER_BODY_BYTES)
    runs = request.app[RUNS]
    info = await runs.task(ns, task)
    answer = await runs.trigger(info, body, user)
    return reply(answer, 200 if answer.is_cached else 201)


async def batch(request: web.Request) -> web.Response:
    """``POST /api/v1/namespaces/{namespace}/tasks/{task}/batch`` (``create runs``)."""
    ns = dns_label("namespace", request.match_info["namespace"])
    task = request.match_info["task"]
    user = await authorize(request, "create", "runs", ns)
    body = await read_model(request, BatchTriggerRequest, MAX_BATCH_BODY_BYTES)
    runs = request.app[RUNS]
    info = await runs.task(ns, task)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(item: TriggerRequest) -> TriggerResponse:
        async with gate:
            return await runs.trigger(info, item, user)

    results = await asyncio.gather(*(one(item) for item in body.items), return_exceptions=True)
    failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    if failed:
        index, first = failed[0]
        created = len(results) - len(failed)
        detail = first.message if isinstance(first, ApiError) else repr(first)
        if not isinstance(first, ApiError):
            log.error("batch item %d failed", index, exc_info=first)
        raise ApiError(
            first.status if isinstance(first, ApiError) and first.status >= 500 else 503,
            "batch_incomplete",
            f"{len(failed)} of {len(results)} items failed ({created} runs were triggered); the first, "
            f"items[{index}]: {detail}. Items with an idempotencyKey may be sent again safely",
        )
    items = [r for r in results if isinstance(r, TriggerResponse)]
    return reply(BatchTriggerResponse(items=items), 201)


async def cancel(request: web.Request) -> web.Response:
    """``POST /api/v1/runs/{id}/cancel`` (``patch runs``)."""
    run = await find_run(request, "patch")
    return reply(await request.app[RUNS].cancel(run))


async def replay(request: web.Request) -> web.Response:
    """``POST /api/v1/runs/{id}/replay`` (``create runs``); an optional body
    (``ReplayRequest``) replaces the payload."""
    run = await find_run(request, "create")
    change = (
        await read_model(request, ReplayRequest, MAX_TRIGGER_BODY_BYTES)
        if request.content_length or request.body_exists
        else ReplayRequest()
    )
    return reply(await request.app[RUNS].replay(run, await authenticate(request), change.payload), 201)


# ---- bulk -------------------------------------------------------------------------------


async def bulk_cancel(request: web.Request) -> web.StreamResponse:
    """``POST /api/v1/runs/cancel``: cancel every unfinished run the filters match, in the
    namespaces where the caller may ``patch runs``; NDJSON progress."""
    runs = request.app[RUNS]

    async def act(run: t.Run, user: User) -> BulkProgress:
        if run.phase in TERMINAL_PHASES:
            return _progress(run, "skipped", f"already {run.phase}")
        try:
            await runs.cancel(run)
        except ApiError as e:
            return _progress(run, "skipped" if e.code == "run_resource_gone" else "failed", e.message)
        return _progress(run, "canceled")

    return await _bulk(request, "patch", act, unfinished_only=True)


async def bulk_replay(request: web.Request) -> web.StreamResponse:
    """``POST /api/v1/runs/replay``: replay every run the filters match, in the namespaces
    where the caller may ``create runs``; NDJSON progress."""
    runs = request.app[RUNS]

    async def act(run: t.Run, user: User) -> BulkProgress:
        try:
            new = await runs.replay(run, user)
        except ApiError as e:
            return _progress(run, "failed", e.message)
        return _progress(run, "replayed", new_run_id=new.id)

    return await _bulk(request, "create", act, unfinished_only=False)


def _progress(run: t.Run, result: str, message: str = "", *, new_run_id: str | None = None) -> BulkProgress:
    return BulkProgress(
        done=0,
        total=0,
        run_id=run.id,
        result=result,
        message=message,
        new_run_id=new_run_id,
    )


async def _bulk(
    request: web.Request,
    verb: str,
    act: Callable[[t.Run, User], Awaitable[BulkProgress]],
    *,
    unfinished_only: bool,
) -> web.StreamResponse:
    user = await authenticate(request)  # before the body: an anonymous caller learns nothing
    body = await read_model(request, BulkRequest, 64 * 1024)
    now = datetime.now(UTC)
    filters = RunFilter(
        tasks=body.task,
        phases=body.phase,
        tags=body.tag,
        since=parse_time_field("since", body.since, now),
        until=parse_time_field("until", body.until, now),
        parent=body.parent,
    )
    allowed = await scope(request, verb, body.namespace)
    conditions = RunFilter(
        **{**filters.__dict__, "namespaces": sorted(allowed.namespaces or ())}
    ).conditions()
    if unfinished_only:
        conditions.append(t.Run.phase.not_in(sorted(TERMINAL_PHASES)))
    matched: list[t.Run] = []
    denied: list[str] = []
    found = 0
    if allowed.namespaces is None or allowed.namespaces:
        async with request.app[SESSIONS]() as s:
            if body.dry_run:  # counted, not loaded (a run's row holds its payload and output)
                ids = select(t.Run.id).where(*conditions).limit(body.limit + 1).subquery()
                found = (await s.execute(select(func.count()).select_from(ids))).scalar_one()
            else:
                matched = list(
                    (
                        await s.execute(
                            select(t.Run)
                            .where(*conditions)
                            .order_by(t.Run.created_at.desc(), t.Run.id.desc())
                            .limit(body.limit + 1)
                        )
                    ).scalars()
                )
                found = len(matched)
    if allowed.denied:
        denied_filter = RunFilter(**{**filters.__dict__, "namespaces": sorted(allowed.denied)}).conditions()
        async with request.app[SESSIONS]() as s:
            denied = sorted(
                (await s.execute(select(t.Run.namespace).where(*denied_filter).distinct())).scalars()
            )
    if body.dry_run:
        would = BulkCounts(
            matched=min(found, body.limit),
            succeeded=0,
            skipped=0,
            failed=0,
            truncated=found > body.limit,
            denied_namespaces=denied,
        )
        dry = BulkSummary(done=0, total=would.matched, summary=would)
        return web.Response(
            body=dry.model_dump_json(by_alias=True).encode() + b"\n",
            content_type="application/x-ndjson",
        )
    truncated = found > body.limit
    matched = matched[: body.limit]
    total = len(matched)

    response = web.StreamResponse(
        headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    gate = asyncio.Semaphore(CONCURRENCY)
    counts = {"succeeded": 0, "skipped": 0, "failed": 0}
    done = 0
    lock = asyncio.Lock()

    async def one(run: t.Run) -> None:
        nonlocal done
        async with gate:
            try:
                line = await act(run, user)
            except Exception as e:  # one run's failure does not end the others
                log.exception("bulk action on run %s failed", run.id)
                line = _progress(run, "failed", f"internal error: {type(e).__name__}")
        async with lock:
            done += 1
            line.done, line.total = done, total
            counts["succeeded" if line.result in ("canceled", "replayed") else line.result] += 1
            await response.write(line.model_dump_json(by_alias=True).encode() + b"\n")

    try:
        await asyncio.gather(*(one(run) for run in matched))
        summary = BulkSummary(
            done=done,
            total=total,
            summary=BulkCounts(matched=total, truncated=truncated, denied_namespaces=denied, **counts),
        )
        await response.write(summary.model_dump_json(by_alias=True).encode() + b"\n")
        await response.write_eof()
    except ConnectionResetError:  # the client went away; what was done stays done
        pass
    return response
