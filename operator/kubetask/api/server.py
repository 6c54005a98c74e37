"""The two listeners and every route, in one place. docs/api.md describes them.

- The **public** application (``api_port``, default 8080): ``/api/v1`` (bearer tokens the
  cluster accepts, RBAC through SubjectAccessReviews), ``/healthz`` and ``/metrics``. Its
  routes come from :data:`PUBLIC_ENDPOINTS`, from which the OpenAPI document is generated
  too.
- The **runner** application (``runner_api_port``, default 8081): ``/runner/v1`` (the
  per-attempt token; the journal of durable execution, :mod:`kubetask.api.journal`) and ``/healthz``, with a database pool of its own
  (``runner_db_pool_size``) so that log ingestion never takes the connections the
  reconciler and the public API use.

Neither serves the other's paths, so a NetworkPolicy can give attempt pods the runner
port only.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy import select, text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from kubetask.api import actions, catalog, events, journal, runs, schedules
from kubetask.api.actions import RUNS, Runs
from kubetask.api.auth import REVIEWER, Reviewer, authenticate
from kubetask.api.errors import error_response, middleware
from kubetask.api.openapi import Body, Endpoint, Param, document
from kubetask.api.runner import LOG_BUDGET, LOG_WRITERS, LogBudget, get_attempt, post_complete, post_logs
from kubetask.api.runs import RUN_NAMESPACES, RunNamespaces
from kubetask.api.state import LEADERSHIP, SESSIONS, SETTINGS
from kubetask.api.webhooks import WEBHOOKS, Webhooks, receive
from kubetask.apimodels import (
    MAX_BATCH_BODY_BYTES,
    MAX_BATCH_ITEMS,
    PHASES,
    BatchTriggerRequest,
    BatchTriggerResponse,
    BulkProgress,
    BulkRequest,
    BulkSummary,
    CancelResponse,
    ErrorResponse,
    EventRequest,
    EventResponse,
    Health,
    LogLine,
    LogPage,
    LogStreamEnd,
    QueueItem,
    QueueList,
    QueueUpdate,
    ReplayRequest,
    ReplayResponse,
    RunDetail,
    RunList,
    ScheduleItem,
    ScheduleList,
    ScheduleUpdate,
    TaskList,
    TokenCompleted,
    TriggerRequest,
    TriggerResponse,
)
from kubetask.control.leadership import Leadership
from kubetask.kube import Kube
from kubetask.protocol import MAX_LOGS_BODY_BYTES
from kubetask.settings import Settings
from kubetask.spec import DNS1123_LABEL
from kubetask.store.db import session_factory
from kubetask.store.tables import Attempt

log = logging.getLogger("kubetask.api")

#: What ``/healthz`` reports without a leadership wired in (an API served on its own):
#: not leading. (Made once: each Leadership made binds the ``kubetask_leader`` gauge.)
STANDALONE = Leadership()


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: 200 when PostgreSQL answers ``SELECT 1`` within 5 s, with what
    this replica knows about leadership (:class:`~kubetask.apimodels.Health`)."""
    try:
        async with asyncio.timeout(5), request.app[SESSIONS]() as session:
            await session.execute(text("SELECT 1"))
    except (TimeoutError, OperationalError, InterfaceError) as e:
        log.warning("health check failed: %r", e)
        return error_response(503, "database_unavailable", "the database does not answer `SELECT 1`")
    leadership = request.app[LEADERSHIP]
    health = Health(
        identity=leadership.identity,
        leader=leadership.leading,
        lease=leadership.lease or None,
        lease_holder=leadership.holder or None,
    )
    return web.json_response(health.model_dump(by_alias=True, mode="json"))


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the process's Prometheus registry. Not authenticated: it holds
    request counts and latencies by route, no run, payload or tenant data."""
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    """``GET /api/v1/openapi.json``: this API's OpenAPI 3.1 document (any valid token)."""
    await authenticate(request)
    return web.json_response(OPENAPI)


# ---- the public endpoints -----------------------------------------------------------------

_NS = Param("namespace", "path", {"type": "string", "pattern": DNS1123_LABEL, "maxLength": 63})
_TASK = Param("task", "path", {"type": "string", "pattern": DNS1123_LABEL, "maxLength": 63})
_SCHEDULE = Param("name", "path", {"type": "string", "pattern": DNS1123_LABEL, "maxLength": 63})
_ID = Param("id", "path", {"type": "string", "maxLength": 40}, "A run id (run_...).")
_FILTERS = (
    Param("task", "query", {"type": "string"}, "Task name; repeatable or comma-separated (any).", True),
    Param("phase", "query", {"type": "string", "enum": list(PHASES)}, "Phase (any), case-insensitive.", True),
    Param("tag", "query", {"type": "string"}, "A tag the run must have (all given).", True),
    Param("namespace", "query", {"type": "string"}, "Namespace (any); default: every readable one.", True),
    Param("since", "query", {"type": "string"}, "Created at or after: ISO-8601, or a duration like 24h."),
    Param("until", "query", {"type": "string"}, "Created before: ISO-8601, or a duration like 24h."),
    Param("parent", "query", {"type": "string", "maxLength": 40}, "Children of this run (ctx.trigger)."),
)
_NDJSON = "application/x-ndjson"

PUBLIC_ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "POST",
        "/api/v1/namespaces/{namespace}/tasks/{task}/trigger",
        actions.trigger,
        "Trigger one run of a task",
        "create runs",
        request=TriggerRequest,
        params=(_NS, _TASK),
        responses={
            201: Body((TriggerResponse,), description="created a Run resource"),
            200: Body((TriggerResponse,), description="the idempotencyKey is held: that run (isCached)"),
        },
    ),
    Endpoint(
        "POST",
        "/api/v1/namespaces/{namespace}/tasks/{task}/batch",
        actions.batch,
        f"Trigger up to {MAX_BATCH_ITEMS} runs of a task",
        "create runs",
        request=BatchTriggerRequest,
        params=(_NS, _TASK),
        responses={201: Body((BatchTriggerResponse,), description="one answer per item, in order")},
    ),
    Endpoint(
        "GET",
        "/api/v1/runs",
        runs.list_runs,
        "List runs, newest first",
        "list runs",
        params=(
            *_FILTERS,
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 500}, "Page size (50)."),
            Param("cursor", "query", {"type": "string"}, "nextCursor of the previous page."),
        ),
        responses={200: Body((RunList,))},
    ),
    Endpoint(
        "POST",
        "/api/v1/runs/cancel",
        actions.bulk_cancel,
        "Cancel every unfinished run the filters match",
        "patch runs",
        request=BulkRequest,
        responses={200: Body((BulkProgress, BulkSummary), _NDJSON, "one line per run, then the summary")},
    ),
    Endpoint(
        "POST",
        "/api/v1/runs/replay",
        actions.bulk_replay,
        "Replay every run the filters match",
        "create runs",
        request=BulkRequest,
        responses={200: Body((BulkProgress, BulkSummary), _NDJSON, "one line per run, then the summary")},
    ),
    Endpoint(
        "GET",
        "/api/v1/runs/{id}",
        runs.get_run,
        "One run: payload, output, attempts",
        "get runs",
        params=(_ID,),
        responses={200: Body((RunDetail,))},
    ),
    Endpoint(
        "GET",
        "/api/v1/runs/{id}/logs",
        runs.get_logs,
        "A run's log lines (paged, or followed as NDJSON)",
        "get runs",
        params=(
            _ID,
            Param(
                "attempt",
                "query",
                {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                "Only this attempt.",
            ),
            Param("after", "query", {"type": "integer", "minimum": 0}, "Only lines after this id (next)."),
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 5000}, "Most lines (1000)."),
            Param("follow", "query", {"type": "boolean"}, "Stream NDJSON lines until the run ends."),
        ),
        responses={
            200: (
                Body((LogPage,), description="a page of lines; with follow=true, NDJSON"),
                Body((LogLine, LogStreamEnd), _NDJSON, "follow=true: LogLine lines, then one LogStreamEnd"),
            )
        },
    ),
    Endpoint(
        "POST",
        "/api/v1/runs/{id}/cancel",
        actions.cancel,
        "Cancel a run (sets spec.cancel on its Run resource)",
        "patch runs",
        params=(_ID,),
        responses={200: Body((CancelResponse,))},
    ),
    Endpoint(
        "POST",
        "/api/v1/runs/{id}/replay",
        actions.replay,
        "Replay a run: a new Run of the same task and payload (or the body's payload)",
        "create runs",
        request=ReplayRequest,
        request_optional=True,
        params=(_ID,),
        responses={201: Body((ReplayResponse,))},
    ),
    Endpoint(
        "POST",
        "/api/v1/events",
        events.send_event,
        "Send an event: resumes the runs waiting for it (ctx.wait_for_event)",
        "patch runs",
        request=EventRequest,
        responses={202: Body((EventResponse,), description="stored (before this answer) and delivered")},
    ),
    Endpoint(
        "POST",
        "/api/v1/tokens/{id}/complete",
        events.complete_token,
        "Complete a wait token (ctx.create_token): the JSON body is its result",
        None,
        auth=False,
        raw_request=Body(description="any JSON value: what ctx.wait_for_token returns"),
        params=(Param("id", "path", {"type": "string", "maxLength": 200}, "The token's id (tok_...)."),),
        responses={
            200: Body((TokenCompleted,)),
            404: Body((ErrorResponse,), description="token_not_found"),
            409: Body((ErrorResponse,), description="token_completed: a token completes once"),
            410: Body((ErrorResponse,), description="token_expired or run_finished"),
        },
    ),
    Endpoint(
        "GET",
        "/api/v1/namespaces/{namespace}/tasks",
        catalog.list_tasks,
        "The namespace's Tasks with live run counts and recent runs' statistics",
        "list tasks",
        params=(
            _NS,
            Param(
                "since",
                "query",
                {"type": "string"},
                "Statistics of runs created since: ISO-8601 or 24h (24h).",
            ),
        ),
        responses={200: Body((TaskList,))},
    ),
    Endpoint(
        "GET",
        "/api/v1/namespaces/{namespace}/queues",
        catalog.list_queues,
        "The namespace's queues: limits and live counts",
        "list queues",
        params=(_NS,),
        responses={200: Body((QueueList,))},
    ),
    Endpoint(
        "PATCH",
        "/api/v1/namespaces/{namespace}/queues/{queue}",
        catalog.patch_queue,
        "Pause, resume or change the limits of a queue (its Queue resource)",
        "patch queues",
        request=QueueUpdate,
        params=(_NS, Param("queue", "path", {"type": "string", "pattern": DNS1123_LABEL, "maxLength": 63})),
        responses={200: Body((QueueItem,))},
    ),
    Endpoint(
        "GET",
        "/api/v1/namespaces/{namespace}/schedules",
        schedules.list_schedules,
        "The namespace's Schedules: when they fire next and last, their unfinished runs",
        "list schedules",
        params=(_NS,),
        responses={200: Body((ScheduleList,))},
    ),
    Endpoint(
        "GET",
        "/api/v1/namespaces/{namespace}/schedules/{name}",
        schedules.get_schedule,
        "One Schedule",
        "get schedules",
        params=(_NS, _SCHEDULE),
        responses={200: Body((ScheduleItem,))},
    ),
    Endpoint(
        "PATCH",
        "/api/v1/namespaces/{namespace}/schedules/{name}",
        schedules.patch_schedule,
        "Pause or resume a Schedule (its spec.paused)",
        "patch schedules",
        request=ScheduleUpdate,
        params=(_NS, _SCHEDULE),
        responses={200: Body((ScheduleItem,))},
    ),
    Endpoint(
        "POST",
        "/api/v1/namespaces/{namespace}/schedules/{name}/trigger",
        schedules.trigger_schedule,
        "Run a Schedule's task now, with its payload (also needs `get schedules`)",
        "create runs",
        params=(_NS, _SCHEDULE),
        responses={
            201: Body((TriggerResponse,), description="created a Run labelled kubetask.dev/schedule"),
            409: Body((ErrorResponse,), description="schedule_invalid: its cron or timezone is not usable"),
        },
    ),
    Endpoint(
        "POST",
        "/api/v1/namespaces/{namespace}/webhooks/{name}",
        receive,
        "Deliver a signed webhook: one run of the Webhook's task",
        None,
        auth=False,
        raw_request=Body(description="the sender's JSON, signed as sent (docs/webhooks.md)"),
        params=(_NS, Param("name", "path", {"type": "string", "pattern": DNS1123_LABEL, "maxLength": 63})),
        responses={
            202: Body(
                (TriggerResponse,), description="the run triggered (or, isCached, the one holding the key)"
            ),
            401: Body(
                (ErrorResponse,), description="invalid_signature: bad, missing or stale; nothing created"
            ),
        },
    ),
    Endpoint(
        "GET",
        "/api/v1/openapi.json",
        openapi,
        "This document",
        None,
        responses={200: Body(description="the OpenAPI 3.1 document (JSON)")},
    ),
    Endpoint(
        "GET",
        "/healthz",
        healthz,
        "Health: PostgreSQL answers; whether this replica leads",
        None,
        auth=False,
        responses={200: Body((Health,))},
    ),
    Endpoint(
        "GET",
        "/metrics",
        metrics,
        "Prometheus metrics",
        None,
        auth=False,
        responses={200: Body(media="text/plain", description="the Prometheus text format")},
    ),
)


def _version() -> str:
    try:
        return version("kubetask")
    except PackageNotFoundError:
        return "0.0.0"


OPENAPI: dict[str, Any] = document(PUBLIC_ENDPOINTS, version=_version())
"""The OpenAPI 3.1 document of :data:`PUBLIC_ENDPOINTS`."""


# ---- applications -------------------------------------------------------------------------


def _attempt_tokens(sessions: async_sessionmaker[AsyncSession]) -> Any:
    async def is_attempt_token(digest: str) -> bool:
        async with sessions() as s:
            return (await s.scalar(select(Attempt.run_id).where(Attempt.token_hash == digest))) is not None

    return is_attempt_token


def make_public_app(
    *,
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    kube: Kube | None = None,
    leadership: Leadership | None = None,
) -> web.Application:
    """The public API. Call it in a running event loop; without ``kube`` it makes its own
    client (the configuration loaded, e.g. by :func:`kubetask.kube.load_config`) and closes
    it with the application. ``/healthz`` reports ``leadership`` (default: not leading)."""
    app = web.Application(middlewares=[middleware], client_max_size=MAX_BATCH_BODY_BYTES)
    app[SESSIONS] = sessions
    app[SETTINGS] = settings
    app[LEADERSHIP] = leadership or STANDALONE
    own = kube is None
    client = kube or Kube(settings.namespaces)
    app[RUNS] = Runs(kube=client, sessions=sessions, settings=settings)
    app[REVIEWER] = Reviewer(
        client.api,
        token_ttl=settings.token_review_ttl_seconds,
        access_ttl=settings.access_review_ttl_seconds,
        max_entries=settings.auth_cache_entries,
        is_attempt_token=_attempt_tokens(sessions),
    )
    app[RUN_NAMESPACES] = RunNamespaces()
    app[WEBHOOKS] = Webhooks(app[RUNS])
    for ep in PUBLIC_ENDPOINTS:
        app.router.add_route(ep.method, ep.path, ep.handler)
    # Imported here: the dashboard is built on this package's modules (kubetask.api.*).
    from kubetask.dashboard import add_dashboard

    add_dashboard(app, PUBLIC_ENDPOINTS)
    if own:

        async def close(_: web.Application) -> AsyncIterator[None]:
            yield
            await client.close()

        app.cleanup_ctx.append(close)
    return app


def make_runner_app(
    *,
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    runs: Runs | None = None,
    leadership: Leadership | None = None,
) -> web.Application:
    """The runner API on its own database pool (``sessions`` is only used to find the
    database: a pool of ``runner_db_pool_size`` connections is made from its engine's URL).
    ``runs`` (the public application's) creates child runs; without it
    ``POST /runner/v1/children`` answers 503."""
    bind = sessions.kw["bind"]
    engine = create_async_engine(
        bind.url, pool_size=settings.runner_db_pool_size, max_overflow=0, pool_pre_ping=True
    )
    app = web.Application(middlewares=[middleware], client_max_size=MAX_LOGS_BODY_BYTES)
    app[SESSIONS] = session_factory(engine)
    app[SETTINGS] = settings
    app[LEADERSHIP] = leadership or STANDALONE
    # One connection is always left for fetching attempts and reporting results.
    app[LOG_WRITERS] = asyncio.Semaphore(settings.runner_db_pool_size - 1)
    app[LOG_BUDGET] = LogBudget(settings.max_log_bytes_per_run)
    app.router.add_get("/runner/v1/attempt", get_attempt)
    app.router.add_post("/runner/v1/logs", post_logs)
    app.router.add_post("/runner/v1/complete", post_complete)
    app.router.add_get("/runner/v1/journal", journal.get_journal)
    app.router.add_post("/runner/v1/steps", journal.post_step)
    app.router.add_post("/runner/v1/waits", journal.post_wait)
    app.router.add_post("/runner/v1/tokens", journal.post_token)
    app.router.add_post("/runner/v1/children", journal.post_child)
    if runs is not None:
        app[RUNS] = runs
    app.router.add_get("/healthz", healthz)

    async def dispose(_: web.Application) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    app.cleanup_ctx.append(dispose)
    return app


@dataclass(frozen=True)
class Apps:
    """Both applications, to be served on their own ports by :func:`start_api`."""

    public: web.Application
    runner: web.Application
    settings: Settings


def make_app(
    *,
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    kube: Kube | None = None,
    leadership: Leadership | None = None,
) -> Apps:
    """The public and the runner applications (call it in a running event loop); both
    ``/healthz`` report ``leadership``."""
    leadership = leadership or STANDALONE
    public = make_public_app(sessions=sessions, settings=settings, kube=kube, leadership=leadership)
    return Apps(
        public=public,
        runner=make_runner_app(
            sessions=sessions, settings=settings, runs=public[RUNS], leadership=leadership
        ),
        settings=settings,
    )


@dataclass(frozen=True)
class Listeners:
    """The running listeners; ``await cleanup()`` stops them all."""

    runners: tuple[web.AppRunner, ...]

    async def cleanup(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


class PortInUse(OSError):
    """An API port is held by another program; the message says which and what to set."""


async def _serve(
    app: web.Application, host: str, port: int, *, access_log: bool, what: str, share_port: bool, env: str
) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=logging.getLogger("aiohttp.access") if access_log else None)
    await runner.setup()
    # SO_REUSEPORT only when asked (KUBETASK_API_SHARE_PORT): replicas of one install on one
    # host then share the port as replicas behind a Service do. Never by default: any
    # process of the same user that also asks for it could share the port unseen, and
    # answer for this operator from another database.
    site = web.TCPSite(runner, host, port, reuse_port=share_port)
    try:
        await site.start()
    except BaseException as e:
        await runner.cleanup()
        if isinstance(e, OSError) and e.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"cannot listen on {host}:{port} for the {what}: another program holds the port. "
                f"Set {env} to a free port, or stop the other program"
                + (
                    ""
                    if share_port
                    else " (replicas of one install on one host: KUBETASK_API_SHARE_PORT=true)"
                )
            ) from e
        raise
    log.info("kubetask %s listening on %s:%s%s", what, host, port, " (shared)" if share_port else "")
    return runner


async def start_api(
    app: Apps | web.Application,
    host: str,
    port: int,
    *,
    runner_port: int | None = None,
    access_log: bool = False,
    share_port: bool = False,
) -> Listeners:
    """Serve in the running event loop: the public API on ``host:port`` and (given
    :class:`Apps`) the runner API on ``runner_port`` (default: ``runner_api_port``);
    ``share_port`` binds them with SO_REUSEPORT (``KUBETASK_API_SHARE_PORT``).
    Stop them with ``await listeners.cleanup()``."""
    serve = functools.partial(_serve, host=host, access_log=access_log, share_port=share_port)
    if isinstance(app, web.Application):
        return Listeners((await serve(app, port=port, what="API", env="KUBETASK_API_PORT"),))
    public = await serve(app.public, port=port, what="public API", env="KUBETASK_API_PORT")
    try:
        runner = await serve(
            app.runner,
            port=app.settings.runner_api_port if runner_port is None else runner_port,
            what="runner API",
            env="KUBETASK_RUNNER_API_PORT",
        )
    except BaseException:
        await public.cleanup()
        raise
    return Listeners((public, runner))
