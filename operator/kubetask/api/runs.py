"""The public read-only endpoints (``/api/v1``): runs, one run, a run's logs.

They have no authentication yet: serve them only inside the cluster network, behind a
NetworkPolicy that admits the clients you trust (and the attempt pods, which need
``/runner/v1``). Query parameters are checked strictly (an unknown one is an error), so
a typo does not silently widen a query. Every time is ISO-8601 UTC with a ``Z``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import ColumnElement, select, tuple_

from kubetask.api.errors import ApiError, bad
from kubetask.api.state import SESSIONS
from kubetask.engine.machine import Phase
from kubetask.store.runs import attempt_view, iso
from kubetask.store.tables import Attempt, LogLine, Run

RUNS_LIMIT_DEFAULT, RUNS_LIMIT_MAX = 50, 500
LOGS_LIMIT_DEFAULT, LOGS_LIMIT_MAX = 1000, 5000

# ---- query parameters -----------------------------------------------------------------


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


def _check_params(request: web.Request, known: Iterable[str]) -> None:
    known = sorted(known)
    for name in request.query:
        if name not in known:
            bad("unknown_parameter", f"unknown query parameter {name!r}; known: {', '.join(known)}")


def _values(request: web.Request, name: str) -> list[str]:
    """All values of a repeatable, comma-separable query parameter."""
    return [v.strip() for raw in request.query.getall(name, []) for v in raw.split(",") if v.strip()]


def _one(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        bad("invalid_parameter", f"{name} may be given once, got {len(values)} values")
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
        bad("invalid_parameter", f"{name} must be an integer from {low} to {high}, got {raw!r}")
    return value


_PHASES = {p.value.lower(): p.value for p in Phase}


def _phases(request: web.Request) -> list[str]:
    out = []
    for value in _values(request, "phase"):
        phase = _PHASES.get(value.lower())
        if phase is None:
            bad(
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
        bad(
            "invalid_time",
            f"{name}={raw!r} is neither an ISO-8601 time (e.g. 2024-05-01T12:00:00Z) nor a relative "
            "duration like 30m, 24h or 7d",
        )


# ---- cursors ----------------------------------------------------------------------------


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
        bad(
            "invalid_cursor",
            "the cursor is not one this API returned; pass nextCursor from a previous page as is",
        )
    return created, run_id


# ---- endpoints --------------------------------------------------------------------------

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


async def list_runs(request: web.Request) -> web.Response:
    """``GET /api/v1/runs``: runs, newest first, one keyset page at a time."""
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
    """``GET /api/v1/runs/{id}``: one run with its payload, output and attempts."""
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
    """``GET /api/v1/runs/{id}/logs``: a run's log lines in the order they arrived."""
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
