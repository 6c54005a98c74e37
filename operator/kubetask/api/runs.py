"""Reading runs (``/api/v1/runs``): the list, one run, a run's logs (paged or followed),
and the filters the bulk actions share with the list.

Reading needs ``get`` (one run, its logs) or ``list`` (the list) on ``runs.kubetask.dev``
in the run's namespace (:mod:`kubetask.api.auth`). A list without ``namespace`` covers
every namespace the caller may list runs in. Query parameters are checked strictly (an
unknown one is an error), so a typo does not silently widen a query. Every time is
ISO-8601 UTC with a ``Z``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from multidict import MultiMapping
from pydantic import BaseModel
from sqlalchemy import ColumnElement, Select, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.api.auth import REVIEWER, Permission, TtlCache, authenticate, authorize
from kubetask.api.errors import ApiError, bad
from kubetask.api.state import SESSIONS
from kubetask.apimodels import TERMINAL_PHASES, LogLine, LogPage, LogStreamEnd, RunDetail, RunList, storable
from kubetask.engine.machine import Phase
from kubetask.spec import DNS1123_LABEL
from kubetask.store.runs import attempt_view, checkpoint_view, counted_attempt, iso
from kubetask.store.tables import Attempt, Checkpoint, Run
from kubetask.store.tables import LogLine as LogLineRow

RUNS_LIMIT_DEFAULT, RUNS_LIMIT_MAX = 50, 500
LOGS_LIMIT_DEFAULT, LOGS_LIMIT_MAX = 1000, 5000

# ---- query parameters -----------------------------------------------------------------


def parse_time(value: str, *, now: datetime) -> datetime:
    """An ISO-8601 time (naive means UTC) or a duration before ``now`` like ``30m``,
    ``24h``, ``7d``, ``1h30m`` (units s, m, h, d, w). Raises ValueError."""
    value = value.strip()
    if _RELATIVE.fullmatch(value):
        total = timedelta()
        try:
            for amount, unit in _RELATIVE_PART.findall(value):
                total += timedelta(**{_UNITS[unit]: int(amount)})
            return now - total
        except OverflowError:  # e.g. 999999999w: before year 1
            raise ValueError(f"{value!r} reaches before year 1") from None
    dt = datetime.fromisoformat(value)
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


_RELATIVE = re.compile(r"(?:\d{1,9}[smhdw])+")
_RELATIVE_PART = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _check_params(query: MultiMapping[str], known: Iterable[str]) -> None:
    known = sorted(known)
    for name, value in query.items():
        if name not in known:
            bad("unknown_parameter", f"unknown query parameter {name!r}; known: {', '.join(known)}")
        if not storable(value):
            bad("invalid_parameter", f"{name} has a NUL character or invalid Unicode; no run can match it")


def _values(query: MultiMapping[str], name: str) -> list[str]:
    """All values of a repeatable, comma-separable query parameter."""
    return [v.strip() for raw in query.getall(name, []) for v in raw.split(",") if v.strip()]


def _one(query: MultiMapping[str], name: str) -> str | None:
    values = query.getall(name, [])
    if len(values) > 1:
        bad("invalid_parameter", f"{name} may be given once, got {len(values)} values")
    return values[0] if values else None


def _int_param(
    query: MultiMapping[str], name: str, *, default: int | None, low: int, high: int
) -> int | None:
    raw = _one(query, name)
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


def _phases(query: MultiMapping[str]) -> list[str]:
    out = []
    for value in _values(query, "phase"):
        phase = _PHASES.get(value.lower())
        if phase is None:
            bad(
                "invalid_phase",
                f"unknown phase {value!r}; use one of {', '.join(p.value for p in Phase)}",
            )
        out.append(phase)
    return out


def _time_param(query: MultiMapping[str], name: str, now: datetime) -> datetime | None:
    return parse_time_field(name, _one(query, name), now)


def dns_label(kind: str, value: str) -> str:
    """A namespace, Task or Queue name from the path (``400`` naming it otherwise)."""
    if len(value) > 63 or not re.fullmatch(DNS1123_LABEL, value):
        bad(
            "invalid_parameter", f"{value!r} is not a {kind} name (a DNS-1123 label of at most 63 characters)"
        )
    return value


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


# ---- filters (the list and the bulk actions) -----------------------------------------------


@dataclass(frozen=True)
class RunFilter:
    """Which runs: each given filter must match; a list matches any of its values, tags
    must all be present."""

    tasks: Sequence[str] = ()
    phases: Sequence[str] = ()
    tags: Sequence[str] = ()
    namespaces: Sequence[str] = ()
    since: datetime | None = None
    until: datetime | None = None
    #: Children of this run (ctx.trigger).
    parent: str | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        out: list[ColumnElement[bool]] = []
        if self.tasks:
            out.append(Run.task.in_(self.tasks))
        if self.namespaces:
            out.append(Run.namespace.in_(self.namespaces))
        if self.phases:
            out.append(Run.phase.in_(self.phases))
        if self.tags:
            out.append(Run.tags.contains(list(self.tags)))  # tags @> '["a", "b"]': all of them
        if self.since is not None:
            out.append(Run.created_at >= self.since)
        if self.until is not None:
            out.append(Run.created_at < self.until)
        if self.parent is not None:
            out.append(Run.parent_run_id == self.parent)
        return out


def parse_time_field(name: str, raw: str | None, now: datetime) -> datetime | None:
    """``since``/``until`` as the list takes them; ``400 invalid_time`` naming the value."""
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


#: How long the set of namespaces that have runs is reused (a list without ``namespace``
#: asks one SubjectAccessReview per such namespace).
RUN_NAMESPACES_TTL_SECONDS = 30.0


class RunNamespaces:
    """The namespaces that have runs, read at most every :data:`RUN_NAMESPACES_TTL_SECONDS`."""

    def __init__(self) -> None:
        self._cache: TtlCache[str, frozenset[str]] = TtlCache(max_entries=1)

    async def get(self, sessions: async_sessionmaker[AsyncSession]) -> frozenset[str]:
        async def read() -> frozenset[str]:
            async with sessions() as s:
                return frozenset((await s.execute(select(Run.namespace).distinct())).scalars())

        return await self._cache.get_or_compute("all", read, lambda _: RUN_NAMESPACES_TTL_SECONDS)


RUN_NAMESPACES: web.AppKey[RunNamespaces] = web.AppKey("run_namespaces", RunNamespaces)


@dataclass(frozen=True)
class Scope:
    """The namespaces a caller may act in: ``None`` is every namespace; ``denied`` are
    namespaces with runs that the caller may not act in."""

    namespaces: frozenset[str] | None
    denied: frozenset[str] = frozenset()


async def scope(request: web.Request, verb: str, asked: Sequence[str]) -> Scope:
    """Where the caller may ``verb`` runs: the ``asked`` namespaces (403 naming the first one
    that is not allowed), or without any, every namespace they may (one review for the
    whole cluster, else one per namespace that has runs)."""
    if asked:
        for ns in sorted(set(asked)):
            await authorize(request, verb, "runs", ns)
        return Scope(frozenset(asked))
    user = await authenticate(request)
    reviewer = request.app[REVIEWER]
    if await reviewer.allowed(user, Permission(verb, "runs")):
        return Scope(None)
    known = await request.app[RUN_NAMESPACES].get(request.app[SESSIONS])
    allowed = await reviewer.allowed_namespaces(user, verb, "runs", known)
    return Scope(frozenset(allowed), frozenset(known - allowed))


# ---- endpoints --------------------------------------------------------------------------

_SUMMARY = (
    Run.id, Run.namespace, Run.name, Run.task, Run.queue, Run.phase, Run.attempt, Run.max_attempts, Run.tags,
    Run.concurrency_key, Run.idempotency_key, Run.priority, Run.created_at, Run.started_at, Run.finished_at,
    Run.error, Run.reason, Run.message, Run.original_run_id, Run.parent_run_id, Run.resumes, Run.infra_failures,
)  # fmt: skip


def run_summary(run: Any) -> dict[str, Any]:
    """The summary of a run (:class:`~kubetask.apimodels.RunSummary` on the wire); ``run`` is
    a :class:`Run` or a row of ``_SUMMARY``."""
    return {
        "id": run.id,
        "namespace": run.namespace,
        "name": run.name,
        "task": run.task,
        "queue": run.queue,
        "phase": run.phase,
        "attempt": counted_attempt(run),
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
        "parentRunId": run.parent_run_id,
        "resumes": run.resumes,
    }


def reply(model: BaseModel, status: int = 200) -> web.Response:
    """A model as the JSON body (camelCase)."""
    return web.json_response(model.model_dump(by_alias=True, mode="json"), status=status)


#: The query parameters of ``GET /api/v1/runs`` (the dashboard's runs list takes the same).
LIST_PARAMS = ("task", "phase", "tag", "namespace", "since", "until", "parent", "limit", "cursor")


async def run_list(request: web.Request, query: MultiMapping[str] | None = None) -> RunList:
    """One keyset page of runs, newest first, that the caller may list, filtered by
    ``query`` (default: the request's; :data:`LIST_PARAMS`). The list endpoint and the
    dashboard both read runs through this."""
    query = request.query if query is None else query
    _check_params(query, LIST_PARAMS)
    now = datetime.now(UTC)
    filters = RunFilter(
        tasks=_values(query, "task"),
        phases=_phases(query),
        tags=[t for t in query.getall("tag", []) if t],
        since=_time_param(query, "since", now),
        until=_time_param(query, "until", now),
        parent=_one(query, "parent"),
    )
    limit = _int_param(query, "limit", default=RUNS_LIMIT_DEFAULT, low=1, high=RUNS_LIMIT_MAX)
    assert limit is not None
    cursor = _one(query, "cursor")
    position = decode_cursor(cursor) if cursor else None
    allowed = await scope(request, "list", _values(query, "namespace"))
    if allowed.namespaces is not None and not allowed.namespaces:
        return RunList(items=[], next_cursor=None)
    conditions = RunFilter(
        **{**filters.__dict__, "namespaces": sorted(allowed.namespaces or ())}
    ).conditions()
    if position is not None:
        conditions.append(tuple_(Run.created_at, Run.id) < tuple_(*position))
    stmt = (
        select(*_SUMMARY).where(*conditions).order_by(Run.created_at.desc(), Run.id.desc()).limit(limit + 1)
    )
    async with request.app[SESSIONS]() as session:
        rows = (await session.execute(stmt)).all()
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if len(rows) > limit else None
    return RunList.model_validate({"items": [run_summary(r) for r in page], "nextCursor": next_cursor})


async def list_runs(request: web.Request) -> web.Response:
    """``GET /api/v1/runs``: runs, newest first, one keyset page at a time (``list runs``)."""
    return reply(await run_list(request))


def not_found(run_id: str) -> ApiError:
    return ApiError(404, "run_not_found", f"no run with id {run_id!r}; `kubetask runs list` shows run ids")


async def find_run(request: web.Request, verb: str) -> Run:
    """The run of the path's ``{id}`` (404), if the caller may ``verb`` runs in its namespace
    (401/403). The caller is authenticated first, so an anonymous caller learns nothing."""
    await authenticate(request)
    run_id = request.match_info["id"]
    async with request.app[SESSIONS]() as session:
        run = await session.get(Run, run_id) if len(run_id) <= 40 and storable(run_id) else None
    if run is None:
        raise not_found(run_id)
    await authorize(request, verb, "runs", run.namespace)
    return run


async def run_detail(request: web.Request, run: Run) -> RunDetail:
    """``run`` (from :func:`find_run`) with its payload, output, attempts and checkpoints."""
    async with request.app[SESSIONS]() as session:
        attempts = (
            await session.execute(select(Attempt).where(Attempt.run_id == run.id).order_by(Attempt.number))
        ).scalars()
        body = run_summary(run)
        body["payload"] = run.payload or {}
        body["hasOutput"] = run.has_output
        body["outputBytes"] = run.output_bytes
        body["output"] = run.output if run.has_output else None
        body["attempts"] = [attempt_view(a, pod_key="podName", detail=True) for a in attempts]
        checkpoints = (
            await session.execute(
                select(Checkpoint)
                .where(Checkpoint.run_id == run.id)
                .order_by(Checkpoint.position, Checkpoint.key)
            )
        ).scalars()
        body["checkpoints"] = [checkpoint_view(cp) for cp in checkpoints]
        if run.phase == Phase.WAITING and run.wait_key:
            waiting = next((cp for cp in body["checkpoints"] if cp["key"] == run.wait_key), None)
            body["waitingFor"] = run.message if waiting is not None else None
    return RunDetail.model_validate(body)


async def get_run(request: web.Request) -> web.Response:
    """``GET /api/v1/runs/{id}``: one run with its payload, output and attempts (``get runs``)."""
    _check_params(request.query, ())
    return reply(await run_detail(request, await find_run(request, "get")))


#: How often ``follow`` looks for new lines and the run's end.
FOLLOW_POLL_SECONDS = 1.0


def _log_line(line: LogLineRow) -> LogLine:
    return LogLine(
        id=line.id,
        attempt=line.attempt,
        ts=iso(line.ts) or "",
        level=line.level,
        stream=line.stream,
        message=line.message,
    )


async def get_logs(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/runs/{id}/logs``: a run's log lines in the order they arrived (``get
    runs``); with ``follow=true``, NDJSON lines as they arrive until the run ends."""
    query = request.query
    _check_params(query, ("attempt", "after", "limit", "follow"))
    attempt = _int_param(query, "attempt", default=None, low=1, high=1_000_000)
    after = _int_param(query, "after", default=None, low=0, high=2**63 - 1)
    limit = _int_param(query, "limit", default=LOGS_LIMIT_DEFAULT, low=1, high=LOGS_LIMIT_MAX)
    assert limit is not None
    follow = (_one(query, "follow") or "false").lower()
    if follow not in ("true", "false", "1", "0"):
        bad("invalid_parameter", f"follow must be true or false, got {follow!r}")
    run = await find_run(request, "get")

    def page(after: int | None) -> Select[LogLineRow]:
        stmt = select(LogLineRow).where(LogLineRow.run_id == run.id).order_by(LogLineRow.id).limit(limit)
        if attempt is not None:
            stmt = stmt.where(LogLineRow.attempt == attempt)
        if after is not None:
            stmt = stmt.where(LogLineRow.id > after)
        return stmt

    if follow in ("false", "0"):
        async with request.app[SESSIONS]() as session:
            lines = (await session.execute(page(after))).scalars().all()
        items = [_log_line(line) for line in lines]
        return reply(LogPage(items=items, next=items[-1].id if items else after))

    response = web.StreamResponse(
        headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        while True:
            async with request.app[SESSIONS]() as session:
                # The phase first: lines that arrived before the run ended are read after it.
                phase = await session.scalar(select(Run.phase).where(Run.id == run.id))
                lines = (await session.execute(page(after))).scalars().all()
            if lines:
                after = lines[-1].id
                await response.write(b"".join(_ndjson(_log_line(line)) for line in lines))
                if len(lines) == limit:
                    continue  # more are there already
            if phase is None or phase in TERMINAL_PHASES:
                await response.write(_ndjson(LogStreamEnd(phase=phase or run.phase)))
                break
            await asyncio.sleep(FOLLOW_POLL_SECONDS)
        await response.write_eof()
    except ConnectionResetError:  # the client went away
        pass
    return response


def _ndjson(model: BaseModel) -> bytes:
    return model.model_dump_json(by_alias=True).encode() + b"\n"
