"""The runner endpoints (``/runner/v1``): what an attempt pod asks for and reports.

Requests are authenticated with the attempt's bearer token. Only its SHA-256 digest is
stored (``attempts.token_hash``); the token is valid while its attempt is the run's
current attempt, the run is ``Running`` and the attempt has not finished.

Bodies and answers are the models of :mod:`kubetask.protocol`, which the runner uses too.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import Counter
from pydantic import ValidationError
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import func

from kubetask.api.errors import ApiError, read_json
from kubetask.api.state import SESSIONS
from kubetask.engine.machine import Phase
from kubetask.protocol import (
    MAX_COMPLETE_BODY_BYTES,
    MAX_LOGS_BODY_BYTES,
    MAX_OUTPUT_BYTES,
    AttemptRef,
    AttemptResponse,
    Completion,
    Failed,
    LogBatch,
    MiB,
    RunRef,
    Succeeded,
    TaskRef,
)
from kubetask.store.tables import Attempt, LogLine, Run

MAX_TOKEN_CHARS = 4096

LOG_LINES = Counter("kubetask_api_log_lines_total", "Log lines attempt pods sent to the API.")
RESULTS = Counter("kubetask_api_results_total", "Results attempt pods reported.", ["status"])


@dataclass(frozen=True)
class _Caller:
    run_id: str
    attempt: int
    reported: bool


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401,
            "missing_token",
            "send the attempt's token as `Authorization: Bearer <token>` "
            "(the runner reads it from the file named by KUBETASK_TOKEN_FILE)",
        )
    if len(token) > MAX_TOKEN_CHARS:
        raise ApiError(401, "invalid_token", "the token is not valid")
    return token


async def _authenticate(session: AsyncSession, token: str, *, lock: bool = False) -> _Caller:
    """The attempt the token belongs to, if it may still talk to the API (else 401).
    ``lock`` takes the run's row (FOR NO KEY UPDATE) for the rest of the transaction."""
    digest = hashlib.sha256(token.encode()).hexdigest()
    stmt = (
        select(
            Run.id,
            Run.phase,
            Run.attempt.label("current"),
            Attempt.number,
            Attempt.token_hash,
            Attempt.finished_at,
            Attempt.report,
        )
        .join(Attempt, Attempt.run_id == Run.id)
        .where(Attempt.token_hash == digest)
    )
    if lock:
        stmt = stmt.with_for_update(of=Run.__table__, key_share=True)
    row = (await session.execute(stmt)).one_or_none()
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        raise ApiError(401, "invalid_token", "the token is not valid (it belongs to no attempt)")
    if row.number != row.current or row.finished_at is not None:
        raise ApiError(
            401,
            "attempt_finished",
            f"attempt {row.number} of run {row.id} is no longer running; its token is no longer valid",
        )
    if row.phase != Phase.RUNNING:
        raise ApiError(
            401,
            "run_not_running",
            f"run {row.id} is {row.phase}, not Running; the token of attempt {row.number} is no longer valid",
        )
    return _Caller(run_id=row.id, attempt=row.number, reported=row.report is not None)


async def get_attempt(request: web.Request) -> web.Response:
    """``GET /runner/v1/attempt``: what to run; records the attempt's start (once)."""
    token = _bearer(request)
    async with request.app[SESSIONS]() as session, session.begin():
        caller = await _authenticate(session, token)
        run = (
            await session.execute(
                select(
                    Run.id, Run.name, Run.namespace, Run.tags, Run.task, Run.max_attempts, Run.payload
                ).where(Run.id == caller.run_id)
            )
        ).one()
        await session.execute(
            update(Attempt)
            .where(
                Attempt.run_id == caller.run_id,
                Attempt.number == caller.attempt,
                Attempt.started_at.is_(None),
            )
            .values(started_at=func.now())
            .execution_options(synchronize_session=False)
        )
    answer = AttemptResponse(
        run=RunRef(id=run.id, name=run.name, namespace=run.namespace, tags=run.tags or []),
        task=TaskRef(id=run.task),
        attempt=AttemptRef(number=caller.attempt, max_attempts=run.max_attempts),
        payload=run.payload if run.payload is not None else {},
    )
    return web.json_response(answer.model_dump(by_alias=True))


async def post_logs(request: web.Request) -> web.Response:
    """``POST /runner/v1/logs``: store a batch of log lines, in order."""
    token = _bearer(request)
    body = await read_json(
        request,
        MAX_LOGS_BODY_BYTES,
        f"the log batch is larger than {MAX_LOGS_BODY_BYTES // MiB} MiB; send fewer lines per request",
    )
    async with request.app[SESSIONS]() as session, session.begin():
        caller = await _authenticate(session, token)
        try:
            batch = LogBatch.model_validate(body)
        except ValidationError as exc:
            raise ApiError.invalid(exc) from None
        now = datetime.now(UTC)
        rows = [
            {
                "run_id": caller.run_id,
                "attempt": caller.attempt,
                "ts": line.ts or now,
                "level": line.level,
                "stream": line.stream,
                "message": line.message,
            }
            for line in batch.lines
        ]
        if rows:
            try:
                await session.execute(insert(LogLine).values(rows))
            except IntegrityError:  # the run was deleted meanwhile
                raise ApiError(401, "run_deleted", f"run {caller.run_id} no longer exists") from None
    LOG_LINES.inc(len(rows))
    return web.Response(status=204)


def _report(result: Succeeded | Failed) -> dict[str, Any]:
    """What ``attempts.report`` holds (engine/outcomes.py reads it)."""
    if isinstance(result, Succeeded):
        return {"succeeded": True, "retryable": False, "error": None}
    return {"succeeded": False, "retryable": result.retryable, "error": result.error.model_dump()}


async def post_complete(request: web.Request) -> web.Response:
    """``POST /runner/v1/complete``: the attempt's outcome, once (409 after that)."""
    token = _bearer(request)
    body = await read_json(
        request,
        MAX_COMPLETE_BODY_BYTES,
        f"the result is larger than {MAX_COMPLETE_BODY_BYTES // MiB} MiB; task outputs are limited to "
        f"{MAX_OUTPUT_BYTES // MiB} MiB of JSON. Store large results elsewhere (e.g. object storage) and "
        "return a reference to them",
    )
    try:
        result = Completion.model_validate(body).root
    except ValidationError as exc:
        raise ApiError.invalid(exc) from None
    async with request.app[SESSIONS]() as session, session.begin():
        caller = await _authenticate(session, token, lock=True)
        if caller.reported:
            raise ApiError(
                409,
                "already_completed",
                f"attempt {caller.attempt} of run {caller.run_id} already reported its result; "
                "an attempt reports once",
            )
        await session.execute(
            update(Attempt)
            .where(Attempt.run_id == caller.run_id, Attempt.number == caller.attempt)
            .values(report=_report(result))
            .execution_options(synchronize_session=False)
        )
        if isinstance(result, Succeeded):
            await session.execute(
                update(Run)
                .where(Run.id == caller.run_id)
                .values(output=result.output, has_output=True, output_bytes=result.output_bytes)
                .execution_options(synchronize_session=False)
            )
    RESULTS.labels(result.status).inc()
    return web.Response(status=204)
