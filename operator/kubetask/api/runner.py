"""The runner endpoints (``/runner/v1``): what an attempt pod asks for and reports. They
are served on their own listener (``runner_api_port``) with their own small database pool
(:func:`kubetask.api.server.make_runner_app`), so a NetworkPolicy can give attempt pods
this port only, and log ingestion cannot take the connections the reconciler needs.

Requests are authenticated with the attempt's bearer token. Only its SHA-256 digest is
stored (``attempts.token_hash``); the token is valid while its attempt is the run's
current attempt, the run is ``Running`` and the attempt has not finished.

Bodies and answers are the models of :mod:`kubetask.protocol`, which the runner uses too.
"""

from __future__ import annotations

import asyncio
import hmac
from collections import OrderedDict
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
from kubetask.engine.machine import Phase, counted_attempts
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
    hash_token,
    iso,
)
from kubetask.store.tables import Attempt, LogLine, Run

MAX_TOKEN_CHARS = 4096

LOG_LINES = Counter("kubetask_api_log_lines_total", "Log lines attempt pods sent to the API (stored).")
LOG_LINES_DROPPED = Counter(
    "kubetask_api_log_lines_dropped_total", "Log lines dropped because their run reached its log limit."
)
#: How long a log batch waits for a database connection before it is refused (429).
LOG_WAIT_SECONDS = 5.0

LOG_WRITERS: web.AppKey[asyncio.Semaphore] = web.AppKey("log_writers", asyncio.Semaphore)
LOG_BUDGET: web.AppKey[LogBudget] = web.AppKey("log_budget")
RESULTS = Counter("kubetask_api_results_total", "Results attempt pods reported.", ["status"])


@dataclass(frozen=True)
class _Caller:
    run_id: str
    attempt: int
    reported: bool
    #: The row of the authenticating query, with the ``extra`` columns asked for.
    row: Any = None


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


#: What every authenticating query reads.
_CALLER = (
    Run.id,
    Run.phase,
    Run.attempt.label("current"),
    Attempt.number,
    Attempt.token_hash,
    Attempt.finished_at,
    Attempt.report,
)


async def _authenticate(
    session: AsyncSession, token: str, *, lock: bool = False, extra: tuple[Any, ...] = ()
) -> _Caller:
    """The attempt the token belongs to, if it may still talk to the API (else 401).
    ``lock`` takes the run's row (FOR NO KEY UPDATE) for the rest of the transaction;
    ``extra`` columns are read by the same query (``caller.row``), saving one."""
    digest = hash_token(token)
    stmt = (
        select(*_CALLER, *extra).join(Attempt, Attempt.run_id == Run.id).where(Attempt.token_hash == digest)
    )
    if lock:
        stmt = stmt.with_for_update(of=Run.__table__, key_share=True)
    return _caller((await session.execute(stmt)).one_or_none(), digest)


def _caller(row: Any, digest: str) -> _Caller:
    """The checks of :func:`_authenticate` on its row (None: no attempt has the token)."""
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
    return _Caller(run_id=row.id, attempt=row.number, reported=row.report is not None, row=row)


async def get_attempt(request: web.Request) -> web.Response:
    """``GET /runner/v1/attempt``: what to run; records the attempt's start (once)."""
    token = _bearer(request)
    async with request.app[SESSIONS]() as session, session.begin():
        # One statement: find the token's attempt, record its start (once), and read what
        # the runner needs. A caller the checks refuse rolls the start back (the 401 ends
        # the transaction).
        digest = hash_token(token)
        found = (
            await session.execute(
                update(Attempt)
                .where(Attempt.token_hash == digest, Run.id == Attempt.run_id)
                .values(started_at=func.coalesce(Attempt.started_at, func.now()))
                .returning(
                    *_CALLER,
                    Run.name,
                    Run.namespace,
                    Run.tags,
                    Run.task,
                    Run.max_attempts,
                    Run.payload,
                    Run.infra_failures,
                    Run.resumes,
                )
                .execution_options(synchronize_session=False)
            )
        ).one_or_none()
        caller = _caller(found, digest)
        run = caller.row
    answer = AttemptResponse(
        run=RunRef(id=run.id, name=run.name, namespace=run.namespace, tags=run.tags or []),
        task=TaskRef(id=run.task),
        # The attempt as the task counts it: pods that never ran the task, and pods that
        # resumed an attempt after a wait, are not attempts.
        attempt=AttemptRef(
            number=max(1, counted_attempts(caller.attempt, run.infra_failures or 0, run.resumes or 0)),
            max_attempts=run.max_attempts,
        ),
        payload=run.payload if run.payload is not None else {},
    )
    return web.json_response(answer.model_dump(by_alias=True))


class LogBudget:
    """How many log bytes each run may still store (``max_log_bytes_per_run``), counted
    by this process: the first batch of a run reads what is stored already, later ones
    count what they add. Several replicas each count their own share, so the limit holds
    per replica. Past the limit, lines are dropped and one line says so."""

    def __init__(self, limit: int, *, max_runs: int = 10_000) -> None:
        self.limit = limit
        self._max_runs = max_runs
        self._used: OrderedDict[str, int] = OrderedDict()
        self._marked: set[str] = set()

    async def take(self, session: AsyncSession, run_id: str, sizes: list[int]) -> tuple[int, bool]:
        """How many of the lines (their sizes, in order) fit, and whether the "limit
        reached" line must be added now (once per run)."""
        if self.limit <= 0:
            return len(sizes), False
        if run_id not in self._used:
            stored = await session.scalar(
                select(func.coalesce(func.sum(func.octet_length(LogLine.message)), 0)).where(
                    LogLine.run_id == run_id
                )
            )
            self._used.setdefault(run_id, int(stored or 0))
            while len(self._used) > self._max_runs:
                old, _ = self._used.popitem(last=False)
                self._marked.discard(old)
        self._used.move_to_end(run_id)
        used, kept = self._used[run_id], 0
        for size in sizes:
            if used + size > self.limit:
                break
            used, kept = used + size, kept + 1
        self._used[run_id] = used
        mark = kept < len(sizes) and run_id not in self._marked
        if mark:
            self._marked.add(run_id)
        return kept, mark


async def post_logs(request: web.Request) -> web.Response:
    """``POST /runner/v1/logs``: store a batch of log lines, in order.

    Log writes may use all but one of the runner listener's database connections (a
    semaphore), so an attempt's fetch and result are never queued behind a flood of logs;
    a batch that waits longer than :data:`LOG_WAIT_SECONDS` for one is refused with 429
    (the runner retries it). Past the run's byte budget, lines are dropped (204 all the
    same, with ``X-Kubetask-Log-Lines-Dropped``)."""
    token = _bearer(request)
    body = await read_json(
        request,
        MAX_LOGS_BODY_BYTES,
        f"the log batch is larger than {MAX_LOGS_BODY_BYTES // MiB} MiB; send fewer lines per request",
    )
    try:
        batch = LogBatch.model_validate(body)
    except ValidationError as exc:
        raise ApiError.invalid(exc) from None
    gate = request.app[LOG_WRITERS]
    try:
        async with asyncio.timeout(LOG_WAIT_SECONDS):
            await gate.acquire()
    except TimeoutError:
        raise ApiError(429, "too_many_requests", "the API is busy storing logs; retry in a second") from None
    try:
        async with request.app[SESSIONS]() as session, session.begin():
            caller = await _authenticate(session, token)
            sizes = [len(line.message.encode()) for line in batch.lines]
            kept, mark = await request.app[LOG_BUDGET].take(session, caller.run_id, sizes)
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
                for line in batch.lines[:kept]
            ]
            if mark:
                limit = request.app[LOG_BUDGET].limit
                rows.append(
                    {
                        "run_id": caller.run_id,
                        "attempt": caller.attempt,
                        "ts": now,
                        "level": "WARNING",
                        "stream": "log",
                        "message": f"[kubetask] this run reached its log limit ({limit // MiB} MiB, "
                        "max_log_bytes_per_run); further lines are dropped (kubectl logs still shows "
                        "them while the pod exists)",
                    }
                )
            if rows:
                try:
                    await session.execute(insert(LogLine).values(rows))
                except IntegrityError:  # the run was deleted meanwhile
                    raise ApiError(401, "run_deleted", f"run {caller.run_id} no longer exists") from None
    finally:
        gate.release()
    LOG_LINES.inc(kept)
    dropped = len(batch.lines) - kept
    if dropped:
        LOG_LINES_DROPPED.inc(dropped)
        return web.Response(status=204, headers={"X-Kubetask-Log-Lines-Dropped": str(dropped)})
    return web.Response(status=204)


def _report(result: Succeeded | Failed) -> dict[str, Any]:
    """What ``attempts.report`` holds (control/attempts.py reads it into an
    engine/outcomes.py ``Report``): the error with its stack and class hierarchy, and what
    the task's ``catch_error`` decided (``retryAt``, ``skipped``)."""
    if isinstance(result, Succeeded):
        return {"succeeded": True, "retryable": False, "error": None}
    return {
        "succeeded": False,
        "retryable": result.retryable,
        "error": result.error.model_dump(),
        "retryAt": None if result.retry_at is None else iso(result.retry_at),
        "skipped": result.skipped,
    }


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
        report = (
            update(Attempt)
            .where(Attempt.run_id == caller.run_id, Attempt.number == caller.attempt)
            .values(report=_report(result))
            .execution_options(synchronize_session=False)
        )
        if isinstance(result, Succeeded):
            # One statement: the report and the output (a data-modifying CTE).
            reported = report.returning(Attempt.run_id).cte("reported")
            await session.execute(
                update(Run)
                .where(Run.id.in_(select(reported.c.run_id)))
                .values(output=result.output, has_output=True, output_bytes=result.output_bytes)
                .execution_options(synchronize_session=False)
            )
        else:
            await session.execute(report)
    RESULTS.labels(result.status).inc()
    return web.Response(status=204)
