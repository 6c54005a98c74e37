"""The Schedule endpoints of the public API against real PostgreSQL and the real API
server (TokenReviews, SubjectAccessReviews, Schedule and Run resources); no operator
runs, so only what the API itself does is looked at."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.api import make_app
from kubetask.kube import Kube
from kubetask.settings import Settings
from kubetask.spec import GROUP, VERSION
from kubetask.store import tables as t
from tests.e2e.harness import Stack, namespace, token_for
from tests.integration.test_public_api import _role, _wait_allowed, bearer, error_of

pytestmark = [pytest.mark.db, pytest.mark.asyncio(loop_scope="session")]

Client = TestClient[Any, Any]


@dataclass(frozen=True)
class World:
    ns: str
    ops: str  # get, list, patch schedules; create runs
    viewer: str  # list and get schedules only


@pytest.fixture(scope="module")
def world(cluster: Stack) -> Iterator[World]:
    with namespace(cluster, "it-sched", label="kubetask.dev/integration") as ns:
        for sa in ("ops", "viewer"):
            cluster.core.create_namespaced_service_account(ns, {"metadata": {"name": sa}})
        _role(
            ns,
            "ops",
            [
                {"apiGroups": [GROUP], "resources": ["schedules"], "verbs": ["get", "list", "patch"]},
                {"apiGroups": [GROUP], "resources": ["runs"], "verbs": ["create"]},
            ],
            (ns, "ops"),
        )
        _role(
            ns,
            "viewer",
            [{"apiGroups": [GROUP], "resources": ["schedules"], "verbs": ["get", "list"]}],
            (ns, "viewer"),
        )
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Schedule",
            "metadata": {"name": "nightly"},
            "spec": {
                "task": "report",
                "cron": "30 2 * * *",
                "timezone": "Europe/Berlin",
                "payload": {"region": "eu"},
            },
        }
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "schedules", body)
        _wait_allowed(f"system:serviceaccount:{ns}:ops", "patch", "schedules", ns)
        _wait_allowed(f"system:serviceaccount:{ns}:viewer", "list", "schedules", ns)
        yield World(ns=ns, ops=token_for(cluster, ns, "ops"), viewer=token_for(cluster, ns, "viewer"))


@pytest_asyncio.fixture(loop_scope="session")
async def api(sessions: async_sessionmaker[AsyncSession], kube: Kube) -> AsyncIterator[Client]:
    apps = make_app(sessions=sessions, settings=Settings(), kube=kube)
    async with TestClient(TestServer(apps.public)) as c:
        yield c


async def test_list_and_get_show_the_spec(api: Client, world: World) -> None:
    resp = await api.get(f"/api/v1/namespaces/{world.ns}/schedules", headers=bearer(world.viewer))
    assert resp.status == 200, await resp.text()
    (item,) = (await resp.json())["items"]
    assert (item["name"], item["task"], item["cron"], item["timezone"]) == (
        "nightly",
        "report",
        "30 2 * * *",
        "Europe/Berlin",
    )
    assert (item["overlapPolicy"], item["catchUp"], item["paused"]) == ("Allow", "Latest", False)
    resp = await api.get(f"/api/v1/namespaces/{world.ns}/schedules/nightly", headers=bearer(world.viewer))
    assert (await resp.json())["payload"] == {"region": "eu"}
    missing = await api.get(f"/api/v1/namespaces/{world.ns}/schedules/nope", headers=bearer(world.viewer))
    assert (await error_of(missing, 404))["code"] == "schedule_not_found"


async def test_pause_and_resume_patch_spec_paused(api: Client, world: World, cluster: Stack) -> None:
    path = f"/api/v1/namespaces/{world.ns}/schedules/nightly"
    denied = await api.patch(path, json={"paused": True}, headers=bearer(world.viewer))
    assert "patch schedules" in (await error_of(denied, 403))["message"]
    for paused in (True, False):
        resp = await api.patch(path, json={"paused": paused}, headers=bearer(world.ops))
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["paused"] is paused
        body = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, world.ns, "schedules", "nightly")
        assert body["spec"]["paused"] is paused
    bad = await api.patch(path, json={}, headers=bearer(world.ops))
    assert (await error_of(bad, 400))["code"] == "invalid_body"


async def test_trigger_now_creates_a_labelled_run_with_the_payload(
    api: Client, world: World, cluster: Stack, sessions: async_sessionmaker[AsyncSession]
) -> None:
    path = f"/api/v1/namespaces/{world.ns}/schedules/nightly/trigger"
    denied = await api.post(path, headers=bearer(world.viewer))
    assert "create runs" in (await error_of(denied, 403))["message"]
    resp = await api.post(path, headers=bearer(world.ops))
    assert resp.status == 201, await resp.text()
    answer = await resp.json()
    run = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, world.ns, "runs", answer["name"])
    assert run["metadata"]["labels"]["kubetask.dev/schedule"] == "nightly"
    assert answer["name"].startswith("nightly-") and "-manual-" in answer["name"]
    payload = run["spec"]["payload"]
    assert payload["region"] == "eu" and payload["scheduleId"] == f"{world.ns}/nightly"
    assert payload["timezone"] == "Europe/Berlin" and len(payload["upcoming"]) == 5
    assert "lastTimestamp" not in payload
    async with sessions() as s:
        fire = (
            await s.execute(select(t.ScheduleFire).where(t.ScheduleFire.run_id == answer["id"]))
        ).scalar_one()
        row = await s.get(t.Schedule, f"{world.ns}/nightly")
    assert fire.manual and fire.state == "created" and fire.open
    assert row is not None and row.last_run_name == answer["name"]
    # The next one knows the one before.
    again = await (await api.post(path, headers=bearer(world.ops))).json()
    run = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, world.ns, "runs", again["name"])
    assert run["spec"]["payload"]["lastTimestamp"] == payload["timestamp"]
