"""The kopf handlers. No business rules here: each one hands the event to the
:class:`~kubetask.controller.Controller` kept in kopf's memo."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import kopf

from kubetask import pods
from kubetask.api import make_app, start_api
from kubetask.controller import Controller
from kubetask.kube import Kube, load_config
from kubetask.settings import settings as kubetask_settings
from kubetask.spec import GROUP, VERSION
from kubetask.store import db

log = logging.getLogger("kubetask.operator")


@kopf.on.startup()
async def startup(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
    cfg = kubetask_settings()
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 240
    # kopf waits this long for more events of one object before handling them; our
    # handlers are level-based and cheap, so react (almost) at once.
    settings.batching.batch_window = 0.01
    log.info(
        "kubetask operator %s starting (database %s)",
        cfg.operator_id or f"{socket.gethostname()}:{os.getpid()}",
        cfg.database_url.rsplit("@", 1)[-1],
    )
    # Migrations first, so every replica runs against the schema it was built for.
    await asyncio.to_thread(db.upgrade, cfg.database_url)
    engine = db.make_engine(cfg.database_url)
    sessions = db.session_factory(engine)
    kube: Kube | None = None
    controller: Controller | None = None
    try:
        await load_config()
        kube = Kube()
        controller = Controller(sessions=sessions, kube=kube, settings=cfg)
        live, rv = await kube.list_pods(pods.POD_SELECTOR)
        await controller.resync(live)
        # The API last: its /healthz is the readiness probe, so it answers only once the
        # operator is ready (runner pods retry for a while if they are quicker).
        memo.runner = await start_api(make_app(sessions=sessions, settings=cfg), cfg.api_host, cfg.api_port)
    except BaseException:
        # kopf retries a failed start-up: leave nothing behind that the retry would trip on.
        if controller is not None:
            await controller.close()
        if kube is not None:
            await kube.close()
        await engine.dispose()
        raise
    memo.engine = engine
    memo.kube = kube
    memo.controller = controller
    memo.pod_watch = asyncio.create_task(
        kube.watch_pods(pods.POD_SELECTOR, _pod_handler(controller), resource_version=rv)
    )
    log.info(
        "kubetask operator ready: API on %s:%d, runners call %s", cfg.api_host, cfg.api_port, cfg.api_url
    )


def _pod_handler(controller: Controller) -> Any:
    async def handle(kind: str, pod: dict[str, Any]) -> None:
        # Each ended pod is handled in its own task so one slow API call does not hold
        # up the watch; the database serialises what must be serialised.
        controller.spawn(controller.on_pod_event(kind, pod))

    return handle


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if (watch := memo.get("pod_watch")) is not None:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    if (controller := memo.get("controller")) is not None:
        await controller.close()
    if (runner := memo.get("runner")) is not None:
        await runner.cleanup()
    if (kube := memo.get("kube")) is not None:
        await kube.close()
    if (engine := memo.get("engine")) is not None:
        await engine.dispose()


def _kind(event: kopf.RawEvent) -> str:
    return str(event.get("type") or "ADDED")


@kopf.on.event(GROUP, VERSION, "runs")
async def run_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    await memo.controller.on_run_event(_kind(event), event["object"])


@kopf.on.event(GROUP, VERSION, "tasks")
async def task_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    await memo.controller.on_task_event(_kind(event), event["object"])


@kopf.on.event(GROUP, VERSION, "queues")
async def queue_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    await memo.controller.on_queue_event(_kind(event), event["object"])
