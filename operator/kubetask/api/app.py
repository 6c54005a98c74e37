"""The aiohttp application: runner endpoints (``/runner/v1``), public read-only endpoints
(``/api/v1``), ``/healthz`` and ``/metrics``. docs/api.md describes every endpoint.

Runner endpoints authenticate with the attempt's bearer token. Only its SHA-256 digest is
stored (``attempts.token_hash``); the token is valid while its attempt is the run's
current attempt, the run is ``Running`` and the attempt has not finished.

The public endpoints have no authentication yet: serve them only inside the cluster
network, behind a NetworkPolicy that admits the clients you trust (and the attempt pods,
which need ``/runner/v1``).

Every error is JSON ``{"error": {"code": ..., "message": ...}}`` whose message says what
to change. Every time is ISO-8601 UTC with a ``Z``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from sqlalchemy import ColumnElement, insert, select, text, tuple_, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql import func

from kubetask.engine.machine import Phase
from kubetask.settings import Settings
from kubetask.store.runs import attempt_view, iso
from kubetask.store.tables import Attempt, LogLine, Run

log = logging.getLogger("kubetask.api")

KiB = 1024
MiB = 1024 * KiB

#: Most log lines in one POST /runner/v1/logs.
MAX_LOG_LINES = 1000
#: Longer log messages are cut to this many UTF-8 bytes (a marker says so).
MAX_LOG_MESSAGE_BYTES = 64 * KiB
#: Most bytes of one POST /runner/v1/logs body.
MAX_LOGS_BODY_BYTES = 16 * MiB
#: Largest task output (compact JSON, UTF-8 bytes).
MAX_OUTPUT_BYTES = 10 * MiB
#: Most bytes of one POST /runner/v1/complete body: the output plus room for the envelope.
MAX_COMPLETE_BODY_BYTES = MAX_OUTPUT_BYTES + 1 * MiB
#: Caps of the error a failed attempt reports (longer values are cut).
MAX_ERROR_TYPE_CHARS = 64
MAX_ERROR_MESSAGE_BYTES = 64 * KiB
MAX_ERROR_STACK_BYTES = 256 * KiB
MAX_TOKEN_CHARS = 4096

RUNS_LIMIT_DEFAULT, RUNS_LIMIT_MAX = 50, 500
LOGS_LIMIT_DEFAULT, LOGS_LIMIT_MAX = 1000, 5000

TRUNCATED = "… [truncated]"

SESSIONS: web.AppKey[async_sessionmaker[AsyncSession]] = web.AppKey("sessions", async_sessionmaker)
SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)

REQUESTS = Counter(
    "kubetask_api_requests_total", "HTTP requests served by the kubetask API.", ["method", "route", "status"]
)
LATENCY = Histogram(
    "kubetask_api_request_duration_seconds", "Time to serve one kubetask API request.", ["method", "route"]
)
LOG_LINES = Counter("kubetask_api_log_lines_total", "Log lines attempt pods sent to the API.")
RESULTS = Counter("kubetask_api_results_total", "Results attempt pods reported.", ["status"])


# ---- errors -------------------------------------------------------------------------


class ApiError(Exception):
    """An error the client can do something about; becomes the JSON error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


def _bad(code: str, message: str) -> NoReturn:
    raise ApiError(400, code, message)


_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    started = time.perf_counter()
    status = 500
    try:
        response: web.StreamResponse = await handler(request)
        status = response.status
        return response
    except ApiError as e:
        status = e.status
        return error_response(e.status, e.code, e.message)
    except web.HTTPException as e:
        status = e.status
        if e.status < 400:
            raise
        if e.status == 404:
            message = f"no endpoint at {request.path}; docs/api.md lists the endpoints"
        elif e.status == 405:
            message = (
                f"{request.method} is not allowed on {request.path}; allowed: {e.headers.get('Allow', '')}"
            )
        else:
            message = e.text or e.reason
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return error_response(e.status, _HTTP_CODES.get(e.status, "http_error"), message, headers)
    except (OperationalError, InterfaceError) as e:
        status = 503
        log.warning("database unavailable while serving %s %s: %s", request.method, request.path, e)
        return error_response(
            503,
            "database_unavailable",
            "the kubetask database is unavailable; retry later (see the operator's log)",
        )
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal error; the operator's log has the details")
    finally:
        REQUESTS.labels(request.method, route, str(status)).inc()
        LATENCY.labels(request.method, route).observe(time.perf_counter() - started)


# ---- helpers ------------------------------------------------------------------------


def parse_time(value: str, *, now: datetime) -> datetime:
    """An ISO-8601 time (naive means UTC) or a duration before ``now`` like ``30m``,
    ``24h``, ``7d``, ``1h30m`` (units s, m, h, d, w). Raises ValueError."""
    value = value.strip()
    if _RELATIVE.fullmatch(value):
        total = timedelta()
        for amount, unit in _RELATIVE_PART.findall(value):
            total += timedelta(**{_UNITS[unit]: int(amount)})
        return now - total
    dt = datetime.fromisoformat(value)
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


_RELATIVE = re.compile(r"(?:\d{1,9}[smhdw])+")
_RELATIVE_PART = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _clean_text(value: str, max_bytes: int) -> str:
    """Make a string storable in PostgreSQL (no NUL, no lone surrogates) and at most
    ``max_bytes`` UTF-8 bytes long (cut ones end with a marker)."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "replace")
        value = raw.decode("utf-8")
    if len(raw) <= max_bytes:
        return value
    keep = max_bytes - len(TRUNCATED.encode())
    return raw[:keep].decode("utf-8", "ignore") + TRUNCATED


def _reject_constant(name: str) -> NoReturn:
    _bad(
        "invalid_json",
        f"{name} is not valid JSON (PostgreSQL cannot store it); send a number or null instead",
    )


async def _read_json(request: web.Request, limit: int, too_large: str) -> Any:
    """Read the body (at most ``limit`` bytes: 413 with ``too_large`` otherwise) and parse it."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "payload_too_large", too_large)
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "payload_too_large", too_large)
    if not body:
        _bad("invalid_json", "the request body is empty; send a JSON object (Content-Type: application/json)")
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        _bad("invalid_json", f"the request body is not valid UTF-8 JSON: {e}")


def _find_nul(value: Any) -> bool:
    """Whether a decoded JSON value has a NUL character in a string or key (JSONB refuses them)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                return True
        elif isinstance(v, dict):
            for k, item in v.items():
                if "\x00" in k:
                    return True
                stack.append(item)
        elif isinstance(v, list):
            stack.extend(v)
    return False


# ---- runner endpoints ---------------------------------------------------------------


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
    return web.json_response(
        {
            "run": {"id": run.id, "name": run.name, "namespace": run.namespace, "tags": run.tags or []},
            "task": {"id": run.task},
            "attempt": {"number": caller.attempt, "maxAttempts": run.max_attempts},
            "payload": run.payload if run.payload is not None else {},
        }
    )


def _log_time(value: Any, where: str, now: datetime) -> datetime:
    if value is None:
        return now
    if isinstance(value, bool):
        _bad("invalid_log_line", f"{where}.ts must be an ISO-8601 string or Unix seconds, not a boolean")
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            _bad("invalid_log_line", f"{where}.ts={value!r} is out of range for Unix seconds")
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            _bad(
                "invalid_log_line",
                f"{where}.ts={value!r} is not an ISO-8601 time such as 2024-05-01T12:00:00Z",
            )
        return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt
    _bad("invalid_log_line", f"{where}.ts must be an ISO-8601 string or Unix seconds")


def _short_field(line: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = line.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        _bad("invalid_log_line", f"{where}.{key} must be a string")
    return _clean_text(value[:16], 64)  # varchar(16)


def log_rows(body: Any, *, run_id: str, attempt: int, now: datetime) -> list[dict[str, Any]]:
    """Validate a POST /runner/v1/logs body and turn it into ``logs`` rows."""
    if not isinstance(body, dict) or not isinstance(body.get("lines"), list):
        _bad("invalid_body", 'the body must be {"lines": [{"ts", "level", "stream", "message"}, ...]}')
    lines: list[Any] = body["lines"]
    if len(lines) > MAX_LOG_LINES:
        raise ApiError(
            413,
            "too_many_lines",
            f"{len(lines)} log lines in one request; send at most {MAX_LOG_LINES} per request",
        )
    rows = []
    for i, line in enumerate(lines):
        where = f"lines[{i}]"
        if not isinstance(line, dict):
            _bad("invalid_log_line", f"{where} must be an object with ts, level, stream and message")
        message = line.get("message")
        if not isinstance(message, str):
            _bad("invalid_log_line", f"{where}.message must be a string")
        rows.append(
            {
                "run_id": run_id,
                "attempt": attempt,
                "ts": _log_time(line.get("ts"), where, now),
                "level": _short_field(line, "level", "info", where),
                "stream": _short_field(line, "stream", "stdout", where),
                "message": _clean_text(message, MAX_LOG_MESSAGE_BYTES),
            }
        )
    return rows


async def post_logs(request: web.Request) -> web.Response:
    token = _bearer(request)
    body = await _read_json(
        request,
        MAX_LOGS_BODY_BYTES,
        f"the log batch is larger than {MAX_LOGS_BODY_BYTES // MiB} MiB; send fewer lines per request",
    )
    async with request.app[SESSIONS]() as session, session.begin():
        caller = await _authenticate(session, token)
        rows = log_rows(body, run_id=caller.run_id, attempt=caller.attempt, now=datetime.now(UTC))
        if rows:
            try:
                await session.execute(insert(LogLine).values(rows))
            except IntegrityError:  # the run was deleted meanwhile
                raise ApiError(401, "run_deleted", f"run {caller.run_id} no longer exists") from None
    LOG_LINES.inc(len(rows))
    return web.Response(status=204)


@dataclass(frozen=True)
class Result:
    report: dict[str, Any]
    succeeded: bool
    output: Any = None
    output_bytes: int = 0


def _error_field(error: Mapping[str, Any], key: str, max_bytes: int, *, required: bool) -> str | None:
    value = error.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        _bad("invalid_result", f"error.{key} must be a string")
    return _clean_text(value, max_bytes)


def parse_result(body: Any) -> Result:
    """Validate a POST /runner/v1/complete body."""
    if not isinstance(body, dict):
        _bad("invalid_result", 'the body must be a JSON object with "status": "succeeded" or "failed"')
    status = body.get("status")
    if status == "succeeded":
        output = body.get("output")
        try:
            raw = json.dumps(output, ensure_ascii=False, separators=(",", ":")).encode()
        except UnicodeEncodeError:
            _bad("invalid_output", "the output has a string with a lone UTF-16 surrogate; send valid Unicode")
        if len(raw) > MAX_OUTPUT_BYTES:
            raise ApiError(
                413,
                "output_too_large",
                f"the task's output is {len(raw)} bytes as JSON; the limit is {MAX_OUTPUT_BYTES} bytes "
                f"({MAX_OUTPUT_BYTES // MiB} MiB). Store large results elsewhere (e.g. object storage) "
                "and return a reference to them",
            )
        if _find_nul(output):
            _bad(
                "invalid_output",
                "the output has a NUL character (\\u0000) in a string; PostgreSQL cannot store it",
            )
        report: dict[str, Any] = {"succeeded": True, "retryable": False, "error": None}
        return Result(report=report, succeeded=True, output=output, output_bytes=len(raw))
    if status == "failed":
        error = body.get("error")
        if not isinstance(error, dict):
            _bad("invalid_result", 'a failed result needs "error": {"type", "message", "stack"}')
        retryable = body.get("retryable", True)
        if not isinstance(retryable, bool):
            _bad("invalid_result", '"retryable" must be true or false')
        error_type = _error_field(error, "type", MAX_ERROR_TYPE_CHARS * 4, required=True) or "Error"
        report = {
            "succeeded": False,
            "retryable": retryable,
            "error": {
                "type": error_type[:MAX_ERROR_TYPE_CHARS],
                "message": _error_field(error, "message", MAX_ERROR_MESSAGE_BYTES, required=True),
                "stack": _error_field(error, "stack", MAX_ERROR_STACK_BYTES, required=False),
            },
        }
        return Result(report=report, succeeded=False)
    _bad("invalid_result", f'"status" must be "succeeded" or "failed", got {status!r}')


async def post_complete(request: web.Request) -> web.Response:
    token = _bearer(request)
    body = await _read_json(
        request,
        MAX_COMPLETE_BODY_BYTES,
        f"the result is larger than {MAX_COMPLETE_BODY_BYTES // MiB} MiB; task outputs are limited to "
        f"{MAX_OUTPUT_BYTES // MiB} MiB of JSON. Store large results elsewhere (e.g. object storage) and "
        "return a reference to them",
    )
    result = parse_result(body)
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
            .values(report=result.report)
            .execution_options(synchronize_session=False)
        )
        if result.succeeded:
            await session.execute(
                update(Run)
                .where(Run.id == caller.run_id)
                .values(output=result.output, has_output=True, output_bytes=result.output_bytes)
                .execution_options(synchronize_session=False)
            )
    RESULTS.labels("succeeded" if result.succeeded else "failed").inc()
    return web.Response(status=204)


# ---- public endpoints ---------------------------------------------------------------

_SUMMARY = (
    Run.id, Run.namespace, Run.name, Run.task, Run.queue, Run.phase, Run.attempt, Run.max_attempts, Run.tags,
    Run.concurrency_key, Run.idempotency_key, Run.priority, Run.created_at, Run.started_at, Run.finished_at,
    Run.error, Run.reason, Run.message, Run.original_run_id,
)  # fmt: skip


def run_summary(run: Any) -> dict[str, Any]:
    """The summary of a run; ``run`` is a :class:`Run` or a row of ``_SUMMARY``."""
    return {
        "id": run.id,
        "namespace": run.namespace,
        "name": run.name,
        "task": run.task,
        "queue": run.queue,
        "phase": run.phase,
        "attempt": run.attempt,
        "maxAttempts": run.max_attempts,
        "tags": run.tags or [],
        "concurrencyKey": run.concurrency_key,
        "idempotencyKey": run.idempotency_key,
        "priority": run.priority,
        "createdAt": iso(run.created_at),
        "startedAt": iso(run.started_at),
        "finishedAt": iso(run.finished_at),
        "error": run.error,
        "reason": run.reason,
        "message": run.message,
        "originalRunId": run.original_run_id,
    }


def _check_params(request: web.Request, known: Iterable[str]) -> None:
    known = sorted(known)
    for name in request.query:
        if name not in known:
            _bad("unknown_parameter", f"unknown query parameter {name!r}; known: {', '.join(known)}")


def _values(request: web.Request, name: str) -> list[str]:
    """All values of a repeatable, comma-separable query parameter."""
    return [v.strip() for raw in request.query.getall(name, []) for v in raw.split(",") if v.strip()]


def _one(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        _bad("invalid_parameter", f"{name} may be given once, got {len(values)} values")
    return values[0] if values else None


def _int_param(request: web.Request, name: str, *, default: int | None, low: int, high: int) -> int | None:
    raw = _one(request, name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        _bad("invalid_parameter", f"{name} must be an integer from {low} to {high}, got {raw!r}")
    return value


_PHASES = {p.value.lower(): p.value for p in Phase}


def _phases(request: web.Request) -> list[str]:
    out = []
    for value in _values(request, "phase"):
        phase = _PHASES.get(value.lower())
        if phase is None:
            _bad(
                "invalid_phase",
                f"unknown phase {value!r}; use one of {', '.join(p.value for p in Phase)}",
            )
        out.append(phase)
    return out


def _time_param(request: web.Request, name: str, now: datetime) -> datetime | None:
    raw = _one(request, name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return parse_time(raw, now=now)
    except ValueError:
        _bad(
            "invalid_time",
            f"{name}={raw!r} is neither an ISO-8601 time (e.g. 2024-05-01T12:00:00Z) nor a relative "
            "duration like 30m, 24h or 7d",
        )


def encode_cursor(created_at: datetime, run_id: str) -> str:
    raw = json.dumps([iso(created_at), run_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, run_id = json.loads(raw)
        created = datetime.fromisoformat(ts)
        if not isinstance(run_id, str) or created.tzinfo is None:
            raise ValueError(cursor)
    except (ValueError, TypeError, binascii.Error):
        _bad(
            "invalid_cursor",
            "the cursor is not one this API returned; pass nextCursor from a previous page as is",
        )
    return created, run_id


async def list_runs(request: web.Request) -> web.Response:
    _check_params(request, ("task", "phase", "tag", "namespace", "since", "until", "limit", "cursor"))
    now = datetime.now(UTC)
    conditions: list[ColumnElement[bool]] = []
    if tasks := _values(request, "task"):
        conditions.append(Run.task.in_(tasks))
    if namespaces := _values(request, "namespace"):
        conditions.append(Run.namespace.in_(namespaces))
    if phases := _phases(request):
        conditions.append(Run.phase.in_(phases))
    if tags := [t for t in request.query.getall("tag", []) if t]:
        conditions.append(Run.tags.contains(tags))  # tags @> '["a", "b"]': all of them
    if (since := _time_param(request, "since", now)) is not None:
        conditions.append(Run.created_at >= since)
    if (until := _time_param(request, "until", now)) is not None:
        conditions.append(Run.created_at < until)
    limit = _int_param(request, "limit", default=RUNS_LIMIT_DEFAULT, low=1, high=RUNS_LIMIT_MAX)
    assert limit is not None
    if cursor := _one(request, "cursor"):
        created, run_id = decode_cursor(cursor)
        conditions.append(tuple_(Run.created_at, Run.id) < tuple_(created, run_id))
    stmt = (
        select(*_SUMMARY).where(*conditions).order_by(Run.created_at.desc(), Run.id.desc()).limit(limit + 1)
    )
    async with request.app[SESSIONS]() as session:
        rows = (await session.execute(stmt)).all()
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
    return web.json_response({"items": [run_summary(r) for r in page], "nextCursor": next_cursor})


def _not_found(run_id: str) -> ApiError:
    return ApiError(404, "run_not_found", f"no run with id {run_id!r}; `kubetask runs list` shows run ids")


async def get_run(request: web.Request) -> web.Response:
    _check_params(request, ())
    run_id = request.match_info["id"]
    async with request.app[SESSIONS]() as session:
        run = await session.get(Run, run_id) if len(run_id) <= 40 else None
        if run is None:
            raise _not_found(run_id)
        attempts = (
            await session.execute(select(Attempt).where(Attempt.run_id == run_id).order_by(Attempt.number))
        ).scalars()
        body = run_summary(run)
        body["payload"] = run.payload
        body["hasOutput"] = run.has_output
        body["outputBytes"] = run.output_bytes
        if run.has_output:
            body["output"] = run.output
        body["attempts"] = [attempt_view(a, pod_key="podName") for a in attempts]
    return web.json_response(body)


async def get_logs(request: web.Request) -> web.Response:
    _check_params(request, ("attempt", "after", "limit"))
    run_id = request.match_info["id"]
    attempt = _int_param(request, "attempt", default=None, low=1, high=1_000_000)
    after = _int_param(request, "after", default=None, low=0, high=2**63 - 1)
    limit = _int_param(request, "limit", default=LOGS_LIMIT_DEFAULT, low=1, high=LOGS_LIMIT_MAX)
    stmt = select(LogLine).where(LogLine.run_id == run_id).order_by(LogLine.id).limit(limit)
    if attempt is not None:
        stmt = stmt.where(LogLine.attempt == attempt)
    if after is not None:
        stmt = stmt.where(LogLine.id > after)
    async with request.app[SESSIONS]() as session:
        exists = (
            len(run_id) <= 40 and (await session.scalar(select(Run.id).where(Run.id == run_id))) is not None
        )
        if not exists:
            raise _not_found(run_id)
        lines = (await session.execute(stmt)).scalars().all()
    items = [
        {
            "id": line.id,
            "attempt": line.attempt,
            "ts": iso(line.ts),
            "level": line.level,
            "stream": line.stream,
            "message": line.message,
        }
        for line in lines
    ]
    return web.json_response({"items": items, "next": items[-1]["id"] if items else after})


async def healthz(request: web.Request) -> web.Response:
    try:
        async with asyncio.timeout(5), request.app[SESSIONS]() as session:
            await session.execute(text("SELECT 1"))
    except (TimeoutError, OperationalError, InterfaceError) as e:
        log.warning("health check failed: %r", e)
        return error_response(503, "database_unavailable", "the database does not answer `SELECT 1`")
    return web.Response(text="ok")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


# ---- the application ----------------------------------------------------------------


def make_app(*, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> web.Application:
    """The API application. Request bodies are read by the handlers under their own
    limits, so the application-wide ``client_max_size`` is the largest of them."""
    app = web.Application(middlewares=[_middleware], client_max_size=MAX_LOGS_BODY_BYTES)
    app[SESSIONS] = sessions
    app[SETTINGS] = settings
    app.router.add_get("/runner/v1/attempt", get_attempt)
    app.router.add_post("/runner/v1/logs", post_logs)
    app.router.add_post("/runner/v1/complete", post_complete)
    app.router.add_get("/api/v1/runs", list_runs)
    app.router.add_get("/api/v1/runs/{id}", get_run)
    app.router.add_get("/api/v1/runs/{id}/logs", get_logs)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def start_api(app: web.Application, host: str, port: int, *, access_log: bool = False) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` in the running event loop. Stop it with
    ``await runner.cleanup()``."""
    runner = web.AppRunner(app, access_log=logging.getLogger("aiohttp.access") if access_log else None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("kubetask API listening on %s:%s", host, port)
    return runner
