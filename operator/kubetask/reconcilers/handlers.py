"""The kopf handlers. No business rules here: each one hands the event to the leader's
:class:`~kubetask.control.controller.Controller` (a replica that does not lead has none
and drops the event: the next leader's first resync looks at everything)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any, cast

import kopf
from kubernetes_asyncio import client

from kubetask import metrics
from kubetask.api import make_app, start_api
from kubetask.control.controller import Controller
from kubetask.control.leader import LeaderElector, LeaseSettings, new_identity
from kubetask.control.leadership import Leadership
from kubetask.kube import Kube, load_config
from kubetask.settings import Settings
from kubetask.settings import settings as kubetask_settings
from kubetask.spec import GROUP, VERSION
from kubetask.store import db

log = logging.getLogger("kubetask.operator")

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def lease_namespace(cfg: Settings) -> str:
    """Where the Lease lives: set explicitly, else the operator pod's own namespace, else
    the first watched namespace (an operator run by hand for one namespace), else default."""
    if cfg.lease_namespace:
        return cfg.lease_namespace
    if SERVICE_ACCOUNT_NAMESPACE.exists():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return cfg.namespaces[0] if cfg.namespaces else "default"


@kopf.on.startup()
async def startup(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
    cfg = kubetask_settings()
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 240
    # kopf waits this long for more events of one object before handling them; our
    # handlers only enqueue, so react (almost) at once.
    settings.batching.batch_window = 0.01
    # Watching some namespaces: kopf takes their names as given, rather than listing and
    # watching the cluster's namespaces (and CRDs) to match them, which would need
    # cluster-wide rights; the resources are found once, at start-up, by API discovery.
    settings.scanning.disabled = bool(cfg.namespaces)
    identity = new_identity(cfg.operator_id or None)
    # What /healthz and /metrics say about leadership.
    leadership = Leadership(
        identity=identity, lease=f"{lease_namespace(cfg)}/{cfg.lease_name}" if cfg.leader_election else ""
    )
    log.info("kubetask operator %s starting (database %s)", identity, cfg.database_url.rsplit("@", 1)[-1])
    # Migrations first, so every replica runs against the schema it was built for.
    await asyncio.to_thread(db.upgrade, cfg.database_url)
    engine = db.make_engine(cfg.database_url, pool_size=cfg.db_pool_size)
    metrics.time_statements(engine)
    sessions = db.session_factory(engine)
    kube: Kube | None = None
    try:
        await load_config()
        kube = Kube(cfg.namespaces)
        # Every replica serves the API; only the leader reconciles.
        memo.runner = await start_api(
            make_app(sessions=sessions, settings=cfg, leadership=leadership),
            cfg.api_host,
            cfg.api_port,
            share_port=cfg.api_share_port,
        )
    except BaseException:
        # kopf retries a failed start-up: leave nothing behind that the retry would trip on.
        if kube is not None:
            await kube.close()
        await engine.dispose()
        raise
    memo.engine = engine
    memo.kube = kube
    memo.controller = None

    async def lead() -> None:
        assert kube is not None
        controller = Controller(sessions=sessions, kube=kube, settings=cfg)
        memo.controller = controller
        try:
            await controller.run()
        finally:
            memo.controller = None

    if cfg.leader_election:
        memo.lease_client = client.ApiClient()  # its own connections: renewals never queue behind work
        elector = LeaderElector(
            api_client=memo.lease_client,
            settings=LeaseSettings(
                namespace=lease_namespace(cfg),
                name=cfg.lease_name,
                identity=identity,
                lease_duration=cfg.lease_duration_seconds,
                renew_deadline=cfg.renew_deadline_seconds,
                retry_period=cfg.lease_retry_seconds,
            ),
        )
        leadership.follow(elector)
        memo.leading = asyncio.create_task(elector.run(lead), name="leader-election")
    else:

        async def lead_alone() -> None:
            leadership.changed(True, identity)
            try:
                await lead()
            finally:
                leadership.changed(False, "")

        memo.leading = asyncio.create_task(lead_alone(), name="controller")
    log.info("kubetask operator up: API on %s:%d, runners call %s", cfg.api_host, cfg.api_port, cfg.api_url)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if (leading := memo.get("leading")) is not None:
        leading.cancel()  # the elector cancels the controller, then releases the Lease
        await asyncio.gather(leading, return_exceptions=True)
    if (lease_client := memo.get("lease_client")) is not None:
        with contextlib.suppress(Exception):
            await lease_client.close()
    if (runner := memo.get("runner")) is not None:
        await runner.cleanup()
    if (kube := memo.get("kube")) is not None:
        await kube.close()
    if (engine := memo.get("engine")) is not None:
        await engine.dispose()


def _body(event: kopf.RawEvent) -> dict[str, Any]:
    return cast(dict[str, Any], event["object"])


def _kind(event: kopf.RawEvent) -> str:
    return str(event.get("type") or "ADDED")


def _controller(memo: Any) -> Controller | None:
    """The leader's controller (its queues take events even before its first resync ends)."""
    controller: Controller | None = memo.get("controller")
    return controller


@kopf.on.event(GROUP, VERSION, "runs")
async def run_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    if (c := _controller(memo)) is not None:
        await c.on_run_event(_kind(event), _body(event))


@kopf.on.event(GROUP, VERSION, "tasks")
async def task_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    if (c := _controller(memo)) is not None:
        try:
            await c.on_task_event(_kind(event), _body(event))
        except Exception as e:  # the resync relists Tasks: a lost event costs a resync period
            log.warning("task event: %r (the resync will pick it up)", e)


@kopf.on.event(GROUP, VERSION, "queues")
async def queue_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    if (c := _controller(memo)) is not None:
        try:
            await c.on_queue_event(_kind(event), _body(event))
        except Exception as e:
            log.warning("queue event: %r (the resync will pick it up)", e)


@kopf.on.event(GROUP, VERSION, "schedules")
async def schedule_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    if (c := _controller(memo)) is not None:
        await c.on_schedule_event(_kind(event), _body(event))
