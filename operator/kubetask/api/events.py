"""The public endpoints of durable execution: events and token completions.

- ``POST /api/v1/events`` (``patch runs`` in the event's namespace): store the event, then
  resume every run waiting for it. Stored before the answer, so an accepted event is
  never lost to a restart; kept ``event_retention_seconds`` so a wait registered shortly
  after still matches.
- ``POST /api/v1/tokens/{id}/complete`` (no bearer token: the unguessable id in the URL
  is the capability, as with a pre-signed URL): the JSON body is the result
  ``ctx.wait_for_token`` returns.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from sqlalchemy import select

from kubetask.api.auth import authenticate, authorize
from kubetask.api.errors import ApiError, read_json, read_model
from kubetask.api.runs import reply
from kubetask.api.state import SESSIONS
from kubetask.apimodels import MAX_EVENT_BYTES, EventRequest, EventResponse, TokenCompleted
from kubetask.engine.machine import TERMINAL, Phase
from kubetask.protocol import hash_token, storable_size
from kubetask.store import journal as j
from kubetask.store import tables as t

#: Longest token id accepted in a URL.
MAX_TOKEN_ID_CHARS = 200


async def send_event(request: web.Request) -> web.Response:
    """``POST /api/v1/events``."""
    await authenticate(request)  # 401 before anything is read
    body = await read_model(request, EventRequest, MAX_EVENT_BYTES + 4096)
    await authorize(request, "patch", "runs", body.namespace)
    async with request.app[SESSIONS]() as s, s.begin():
        delivered = await j.deliver_event(s, namespace=body.namespace, name=body.name, data=body.data)
    answer = EventResponse(
        id=delivered.event_id, name=body.name, namespace=body.namespace, resumed=len(delivered.runs)
    )
    return reply(answer, 202)


async def complete_token(request: web.Request) -> web.Response:
    """``POST /api/v1/tokens/{id}/complete``: the body (any JSON) is the token's result."""
    token_id = request.match_info["id"]
    if len(token_id) > MAX_TOKEN_ID_CHARS or not token_id.startswith("tok_"):
        raise ApiError(404, "token_not_found", "no such token")
    data: Any = await read_json(
        request, MAX_EVENT_BYTES, f"the body is larger than {MAX_EVENT_BYTES} bytes: send a reference"
    )
    try:
        storable_size(data, limit=MAX_EVENT_BYTES, what="the body", invalid="invalid", too_large="too_large")
    except ValueError as exc:
        raise ApiError(400, "invalid_body", str(exc)) from None
    digest = hash_token(token_id)
    now = datetime.now(UTC)
    async with request.app[SESSIONS]() as s, s.begin():
        row = (
            await s.execute(
                select(t.Checkpoint, t.Run.phase)
                .join(t.Run, t.Run.id == t.Checkpoint.run_id)
                .where(t.Checkpoint.token_hash == digest)
                .with_for_update(of=t.Checkpoint.__table__)
            )
        ).one_or_none()
        if row is None:
            raise ApiError(404, "token_not_found", "no such token (it never existed, or its run was deleted)")
        cp, phase = row
        if cp.status == j.SATISFIED:
            raise ApiError(409, "token_completed", "this token was completed already; a token completes once")
        if Phase(phase) in TERMINAL and cp.status == j.WAITING:
            raise ApiError(410, "run_finished", f"the run that created this token finished ({phase})")
        if cp.status != j.WAITING or (cp.due_at is not None and cp.due_at <= now):
            raise ApiError(410, "token_expired", "this token expired; the run stopped waiting for it")
        cp.status, cp.finished_at = j.SATISFIED, now
        cp.result = {**(cp.result or {}), "data": data}
        resumed = await j.satisfy(
            s, (t.Checkpoint.kind == "token_wait") & (t.Checkpoint.ref == digest), result=data
        )
        run_id = cp.run_id
    return reply(TokenCompleted(id=token_id, run_id=run_id, resumed=bool(resumed)))
