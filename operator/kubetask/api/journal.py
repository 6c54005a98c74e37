"""The runner endpoints of durable execution (``/runner/v1``): a run's journal.

- ``GET /runner/v1/journal``: the run's checkpoints, for a replaying pod;
- ``POST /runner/v1/steps``: a step returned (its result is stored before the task goes
  on) or raised;
- ``POST /runner/v1/waits``: register a wait (sleep, event, token, child run); the answer
  says whether it is satisfied already, or whether the runner must suspend (exit
  :data:`~kubetask.protocol.EXIT_SUSPENDED`), after which the run is ``Waiting`` with no pod;
- ``POST /runner/v1/tokens``: a completion token (an unguessable URL);
- ``POST /runner/v1/children``: a child run (a Run resource), once per key.

Every call is idempotent by its key, so a runner that retries a request, or a pod that
replays the task after a crash, never does a thing twice. Authentication is the
attempt's token, as for the other runner endpoints (:mod:`kubetask.api.runner`).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from kubernetes_asyncio.client.rest import ApiException
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from kubetask.api.actions import RUNS, Runs
from kubetask.api.errors import ApiError, kube_error, read_model
from kubetask.api.runner import _authenticate, _bearer
from kubetask.api.state import SESSIONS, SETTINGS
from kubetask.engine.machine import TERMINAL, Phase
from kubetask.pods import LABEL_PARENT_RUN
from kubetask.protocol import (
    MAX_STEP_RESULT_BYTES,
    ChildRequest,
    ChildResponse,
    ErrorInfo,
    Journal,
    JournalEntry,
    StepRecord,
    TokenRequest,
    TokenResponse,
    WaitRequest,
    WaitResponse,
    hash_token,
)
from kubetask.spec import API_VERSION
from kubetask.store import journal as j
from kubetask.store import tables as t

#: The label and annotation of a child run's resource.
PARENT_RUN = LABEL_PARENT_RUN
PARENT_KEY = "kubetask.dev/parent-key"
#: Most bytes of a journal request body (a step's result plus room for the rest).
MAX_JOURNAL_BODY_BYTES = MAX_STEP_RESULT_BYTES + 64 * 1024


def _now() -> datetime:
    return datetime.now(UTC)


def _entry(cp: t.Checkpoint) -> JournalEntry:
    return JournalEntry(
        key=cp.key,
        name=cp.name,
        position=cp.position,
        kind=cp.kind,
        status=cp.status,
        result=cp.result,
        error=ErrorInfo.model_validate(cp.error) if cp.error else None,
        due_at=cp.due_at,
    )


def _reply(model: Any, status: int = 200) -> web.Response:
    return web.json_response(model.model_dump(by_alias=True, mode="json"), status=status)


async def get_journal(request: web.Request) -> web.Response:
    """``GET /runner/v1/journal``: every checkpoint of the caller's run, by position."""
    token = _bearer(request)
    async with request.app[SESSIONS]() as s:
        caller = await _authenticate(s, token)
        rows = (
            (
                await s.execute(
                    select(t.Checkpoint)
                    .where(t.Checkpoint.run_id == caller.run_id)
                    .order_by(t.Checkpoint.position, t.Checkpoint.key)
                )
            )
            .scalars()
            .all()
        )
    return _reply(Journal(entries=[_entry(cp) for cp in rows]))


async def post_step(request: web.Request) -> web.Response:
    """``POST /runner/v1/steps``: record a step's end. A completed step is never
    overwritten (a retried POST, or a replay racing an old pod, changes nothing)."""
    token = _bearer(request)
    body = await read_model(request, StepRecord, MAX_JOURNAL_BODY_BYTES)
    async with request.app[SESSIONS]() as s, s.begin():
        caller = await _authenticate(s, token)
        values = {
            "run_id": caller.run_id,
            "key": body.key,
            "position": body.position,
            "kind": "step",
            "name": body.name,
            "status": body.status,
            "result": body.result if body.status == "completed" else None,
            "error": body.error.model_dump() if body.error else None,
            "attempt": caller.attempt,
            "started_at": body.started_at,
            "finished_at": _now(),
        }
        stmt = pg_insert(t.Checkpoint).values(values)
        await s.execute(
            stmt.on_conflict_do_update(
                index_elements=[t.Checkpoint.run_id, t.Checkpoint.key],
                set_={k: stmt.excluded[k] for k in values if k not in ("run_id", "key")},
                where=t.Checkpoint.status != "completed",
            )
        )
    return web.Response(status=204)


async def post_wait(request: web.Request) -> web.Response:
    """``POST /runner/v1/waits``: register a wait, or get the state of the one
    registered under this key before (its deadline is never moved by a replay)."""
    token = _bearer(request)
    body = await read_model(request, WaitRequest, MAX_JOURNAL_BODY_BYTES)
    settings = request.app[SETTINGS]
    async with request.app[SESSIONS]() as s, s.begin():
        # The run's row is locked by the authenticating query, which also reads its namespace.
        caller = await _authenticate(s, token, lock=True, extra=(t.Run.namespace,))
        run = caller.row
        now = _now()
        cp = (
            await s.execute(
                select(t.Checkpoint)
                .where(t.Checkpoint.run_id == run.id, t.Checkpoint.key == body.key)
                .with_for_update()
            )
        ).scalar_one_or_none()
        if cp is None:
            cp = await _register(s, run, body, caller.attempt, now, settings.event_retention_seconds)
        elif cp.kind != body.kind:
            raise ApiError(
                409,
                "journal_mismatch",
                f"{body.key!r} was a {cp.kind} in this run's journal, and is now a {body.kind}: "
                "give each step and wait its own name",
            )
        j.expire(cp, now)
        if cp.status != j.WAITING:
            return _reply(
                WaitResponse.model_validate({"status": cp.status, "result": cp.result, "dueAt": cp.due_at})
            )
        short = (
            cp.kind == "sleep"
            and cp.due_at is not None
            and (cp.due_at - now).total_seconds() <= settings.wait_keep_pod_seconds
        )
        if short:  # slept in the pod (it keeps its slot): cheaper than a new pod
            return _reply(WaitResponse(status="waiting", due_at=cp.due_at))
        # Suspend: the attempt's report says so, so however the pod ends now, the run
        # waits (engine/outcomes.py); the run's wait_key says on what.
        await s.execute(
            update(t.Attempt)
            .where(t.Attempt.run_id == run.id, t.Attempt.number == caller.attempt)
            .values(report={"suspended": True, "wait": cp.key})
        )
        await s.execute(update(t.Run).where(t.Run.id == run.id).values(wait_key=cp.key))
    return _reply(WaitResponse(status="waiting", due_at=cp.due_at, suspend=True))


async def _register(
    s: AsyncSession, run: Any, body: WaitRequest, attempt: int, now: datetime, retention: float
) -> t.Checkpoint:
    """A new wait checkpoint (``run``: the caller's row, its ``id`` and ``namespace``), satisfied
    at once when what it waits for happened already."""
    cp = t.Checkpoint(
        run_id=run.id,
        key=body.key,
        position=body.position,
        kind=body.kind,
        name=body.name,
        status=j.WAITING,
        attempt=attempt,
        started_at=now,
    )
    if body.kind == "sleep":
        cp.due_at = body.until if body.until is not None else j.deadline(now, body.seconds or 0)
    elif body.kind == "event":
        assert body.event is not None and body.timeout_seconds is not None
        cp.namespace, cp.event_name, cp.match = run.namespace, body.event, body.match or {}
        cp.due_at = j.deadline(now, body.timeout_seconds)
        found = await j.stored_event(
            s,
            run_id=run.id,
            namespace=run.namespace,
            name=body.event,
            match=cp.match,
            since=j.deadline(now, -retention),
        )
        if found is not None:  # it came before the wait: it still counts
            cp.status, cp.result, cp.event_id, cp.finished_at = j.SATISFIED, found.data, found.id, now
    elif body.kind == "token_wait":
        assert body.token_id is not None
        token = (
            await s.execute(
                select(t.Checkpoint).where(
                    t.Checkpoint.token_hash == hash_token(body.token_id), t.Checkpoint.run_id == run.id
                )
            )
        ).scalar_one_or_none()
        if token is None:
            raise ApiError(
                404,
                "token_not_found",
                "no token with this id belongs to this run; pass the token ctx.create_token returned",
            )
        cp.ref, cp.due_at = token.token_hash, token.due_at
        if token.status == j.SATISFIED:
            cp.status, cp.result, cp.finished_at = j.SATISFIED, (token.result or {}).get("data"), now
    elif body.kind == "child":
        child = (
            await s.execute(select(t.Run).where(t.Run.id == body.child_run_id, t.Run.parent_run_id == run.id))
        ).scalar_one_or_none()
        if child is None:
            raise ApiError(
                404,
                "child_not_found",
                f"run {body.child_run_id} is not a child of run {run.id}; pass the id ctx.trigger returned",
            )
        cp.ref = child.id
        if Phase(child.phase) in TERMINAL:
            cp.status, cp.result, cp.finished_at = j.SATISFIED, j.child_result(child), now
    s.add(cp)
    await s.flush()
    return cp


async def post_token(request: web.Request) -> web.Response:
    """``POST /runner/v1/tokens``: a completion token, once per key (a replay gets the
    same token back from the journal)."""
    token = _bearer(request)
    body = await read_model(request, TokenRequest, MAX_JOURNAL_BODY_BYTES)
    public = request.app[SETTINGS].public_url.rstrip("/")
    async with request.app[SESSIONS]() as s, s.begin():
        caller = await _authenticate(s, token)
        cp = await s.get(t.Checkpoint, (caller.run_id, body.key))
        if cp is None:
            now = _now()
            token_id = "tok_" + secrets.token_urlsafe(24)
            cp = t.Checkpoint(
                run_id=caller.run_id,
                key=body.key,
                position=body.position,
                kind="token",
                name=body.name,
                status=j.WAITING,
                attempt=caller.attempt,
                started_at=now,
                due_at=j.deadline(now, body.timeout_seconds),
                token_hash=hash_token(token_id),
                result={"id": token_id, "url": f"{public}/api/v1/tokens/{token_id}/complete"},
            )
            s.add(cp)
        elif cp.kind != "token":
            raise ApiError(409, "journal_mismatch", f"{body.key!r} is a {cp.kind} in this run's journal")
        made: dict[str, Any] = cp.result or {}
        answer = TokenResponse(id=made["id"], url=made["url"], expires_at=cp.due_at)
    return _reply(answer, 201)


def child_name(parent: t.Run, key: str) -> str:
    """The child's Run name: the parent's, shortened, and a hash of (parent id, key), so
    every replay of the parent names the same child."""
    digest = hashlib.sha256(f"{parent.id}/{key}".encode()).hexdigest()[:10]
    return f"{parent.name[:52].rstrip('-.')}-c{digest}"


async def post_child(request: web.Request) -> web.Response:
    """``POST /runner/v1/children``: create the child Run (once per key) and record it."""
    token = _bearer(request)
    body = await read_model(request, ChildRequest, MAX_JOURNAL_BODY_BYTES)
    async with request.app[SESSIONS]() as s:
        caller = await _authenticate(s, token)
        parent = await s.get(t.Run, caller.run_id)
        cp = await s.get(t.Checkpoint, (caller.run_id, body.key))
    assert parent is not None
    if cp is not None:
        if cp.kind != "trigger":
            raise ApiError(409, "journal_mismatch", f"{body.key!r} is a {cp.kind} in this run's journal")
        return _reply(ChildResponse.model_validate(cp.result), 201)
    runs: Runs = request.app[RUNS]
    created = await _create_child(runs, parent, body)
    child_id = await runs.intake.record(created)
    result = ChildResponse(run_id=child_id, name=created["metadata"]["name"], namespace=parent.namespace)
    async with request.app[SESSIONS]() as s, s.begin():
        await s.execute(
            pg_insert(t.Checkpoint)
            .values(
                run_id=parent.id,
                key=body.key,
                position=body.position,
                kind="trigger",
                name=body.name,
                status="completed",
                result=result.model_dump(by_alias=True),
                attempt=caller.attempt,
                started_at=_now(),
                finished_at=_now(),
                ref=child_id,
            )
            .on_conflict_do_nothing()
        )
    return _reply(result, 201)


async def _create_child(runs: Runs, parent: t.Run, body: ChildRequest) -> dict[str, Any]:
    name = child_name(parent, body.key)
    spec: dict[str, Any] = {"task": body.task, "payload": body.payload if body.payload is not None else {}}
    for field, value in (
        ("concurrencyKey", body.concurrency_key),
        ("idempotencyKey", body.idempotency_key),
        ("priority", body.priority),
        ("tags", body.tags),
        ("maxAttempts", body.max_attempts),
    ):
        if value is not None:
            spec[field] = value
    manifest = {
        "apiVersion": API_VERSION,
        "kind": "Run",
        "metadata": {
            "name": name,
            "namespace": parent.namespace,
            "labels": {PARENT_RUN: parent.id},
            "annotations": {PARENT_KEY: body.key},
        },
        "spec": spec,
    }
    try:
        created = await runs.kube.create_object("runs", parent.namespace, manifest)
    except ApiException as e:
        raise kube_error(e, f"create child Run {parent.namespace}/{name} of task {body.task}") from None
    if created is not None:
        return created
    # 409: created by an earlier try of this very call (same parent and key), or not ours.
    existing = await runs.kube.get_object("runs", parent.namespace, name)
    if existing is None or (existing["metadata"].get("labels") or {}).get(PARENT_RUN) != parent.id:
        raise ApiError(
            409,
            "child_name_taken",
            f"a Run named {name} exists in {parent.namespace} and is not this run's child",
        )
    return existing
