"""The aiohttp application: every route in one place, plus ``/healthz`` and ``/metrics``.
docs/api.md describes every endpoint."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.api.errors import error_response, middleware
from kubetask.api.runner import get_attempt, post_complete, post_logs
from kubetask.api.runs import get_logs, get_run, list_runs
from kubetask.api.state import SESSIONS, SETTINGS
from kubetask.protocol import MAX_LOGS_BODY_BYTES
from kubetask.settings import Settings

log = logging.getLogger("kubetask.api")


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: 200 when PostgreSQL answers ``SELECT 1`` within 5 s."""
    try:
        async with asyncio.timeout(5), request.app[SESSIONS]() as session:
            await session.execute(text("SELECT 1"))
    except (TimeoutError, OperationalError, InterfaceError) as e:
        log.warning("health check failed: %r", e)
        return error_response(503, "database_unavailable", "the database does not answer `SELECT 1`")
    return web.Response(text="ok")


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the process's Prometheus registry."""
    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(*, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> web.Application:
    """The API application. Request bodies are read by the handlers under their own
    limits, so the application-wide ``client_max_size`` is the largest of them."""
    app = web.Application(middlewares=[middleware], client_max_size=MAX_LOGS_BODY_BYTES)
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
    # SO_REUSEPORT: operators on one host may share the port, the kernel spreading
    # connections over them as a Service spreads them over replicas (the e2e tests run
    # two at once); a port held by another program still fails to bind.
    site = web.TCPSite(runner, host, port, reuse_port=True)
    await site.start()
    log.info("kubetask API listening on %s:%s", host, port)
    return runner
