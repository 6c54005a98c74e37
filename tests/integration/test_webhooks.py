"""Signed webhooks against the real API server and PostgreSQL: the Webhook and its Secret
are real resources, a good delivery creates a real Run resource, a bad one creates nothing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.api import make_app
from kubetask.api.actions import TRIGGERED_BY
from kubetask.kube import Kube
from kubetask.settings import Settings
from kubetask.spec import GROUP, VERSION
from kubetask.store import tables as t
from tests.e2e.harness import Stack, namespace

pytestmark = [pytest.mark.db, pytest.mark.asyncio(loop_scope="session")]

Sessions = async_sessionmaker[AsyncSession]
Client = TestClient[Any, Any]

SECRET = b"s3cret-for-webhooks"


def _webhook(cluster: Stack, ns: str, name: str, spec: dict[str, Any]) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Webhook", "metadata": {"name": name}, "spec": spec}
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "webhooks", body)


@pytest.fixture(scope="module")
def hooks(cluster: Stack) -> Iterator[str]:
    """A namespace with Task ``hello``, Secret ``hook`` and Webhooks ``gh``, ``stripe``."""
    with namespace(cluster, "it-webhooks", label="kubetask.dev/integration") as ns:
        cluster.apply_task(ns, "hello", {"entrypoint": "app.tasks:hello"})
        cluster.core.create_namespaced_secret(
            ns, {"metadata": {"name": "hook"}, "data": {"token": base64.b64encode(SECRET).decode()}}
        )
        ref = {"name": "hook", "key": "token"}
        _webhook(
            cluster,
            ns,
            "gh",
            {
                "task": "hello",
                "format": "github",
                "secretRef": ref,
                "idempotencyKeyHeader": "X-GitHub-Delivery",
            },
        )
        _webhook(cluster, ns, "stripe", {"task": "hello", "format": "stripe", "secretRef": ref})
        yield ns


@pytest_asyncio.fixture(loop_scope="session")
async def api(sessions: Sessions, kube: Kube) -> AsyncIterator[Client]:
    apps = make_app(sessions=sessions, settings=Settings(), kube=kube)
    async with TestClient(TestServer(apps.public)) as c:
        yield c


def github(body: bytes, secret: bytes = SECRET, **headers: str) -> dict[str, str]:
    digest = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={digest}", "Content-Type": "application/json", **headers}


def stripe(body: bytes, at: int) -> dict[str, str]:
    digest = hmac.new(SECRET, f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={at},v1={digest}", "Content-Type": "application/json"}


def path(ns: str, name: str) -> str:
    return f"/api/v1/namespaces/{ns}/webhooks/{name}"


async def runs_in(sessions: Sessions, ns: str) -> int:
    async with sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(t.Run).where(t.Run.namespace == ns)) or 0)


def run_resources(cluster: Stack, ns: str) -> list[dict[str, Any]]:
    found = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, ns, "runs")
    return list(found["items"])


async def test_bad_signatures_get_401_and_create_nothing(
    api: Client, hooks: str, sessions: Sessions, cluster: Stack
) -> None:
    body = json.dumps({"ref": "refs/heads/main"}).encode()
    for headers in (
        {},
        github(body, secret=b"wrong"),
        github(body + b" "),
        {"X-Hub-Signature-256": "sha256=nothex", "Authorization": "Bearer whatever"},
    ):
        resp = await api.post(path(hooks, "gh"), data=body, headers=headers)
        assert resp.status == 401, await resp.text()
        assert (await resp.json())["error"]["code"] == "invalid_signature"
    now = int(time.time())
    for stale in (now - 301, now + 301):
        resp = await api.post(path(hooks, "stripe"), data=body, headers=stripe(body, stale))
        assert resp.status == 401, await resp.text()
        err = (await resp.json())["error"]
        assert err["code"] == "invalid_signature" and "timestamp" in err["message"]
    assert await runs_in(sessions, hooks) == 0
    assert run_resources(cluster, hooks) == []


async def test_good_github_signature_creates_a_run_with_the_body_as_payload(
    api: Client, hooks: str, sessions: Sessions, cluster: Stack
) -> None:
    body = json.dumps({"ref": "refs/heads/main", "commits": [{"id": "abc"}]}).encode()
    resp = await api.post(path(hooks, "gh"), data=body, headers={**github(body), "X-GitHub-Delivery": "d-1"})
    assert resp.status == 202, await resp.text()
    got = await resp.json()
    assert got["task"] == "hello" and got["namespace"] == hooks and got["isCached"] is False
    resource = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, hooks, "runs", got["name"])
    assert resource["spec"]["payload"] == json.loads(body)
    assert resource["spec"]["idempotencyKey"] == "d-1"
    assert resource["metadata"]["annotations"][TRIGGERED_BY] == f"webhook:{hooks}/gh"
    async with sessions() as s:
        row = await s.get(t.Run, got["id"])
    assert row is not None and row.payload == json.loads(body)

    # GitHub redelivers with the same X-GitHub-Delivery: the same run, nothing new.
    again = await api.post(path(hooks, "gh"), data=body, headers={**github(body), "X-GitHub-Delivery": "d-1"})
    assert again.status == 202, await again.text()
    second = await again.json()
    assert second["id"] == got["id"] and second["isCached"] is True
    names = [r["metadata"]["name"] for r in run_resources(cluster, hooks)]
    assert names == [got["name"]]


async def test_good_stripe_signature_within_tolerance_triggers(api: Client, hooks: str) -> None:
    body = json.dumps({"id": "evt_1", "type": "charge.succeeded"}).encode()
    resp = await api.post(path(hooks, "stripe"), data=body, headers=stripe(body, int(time.time()) - 60))
    assert resp.status == 202, await resp.text()
    assert (await resp.json())["isCached"] is False


async def test_unknown_webhook_is_404_and_a_signed_non_json_body_is_400(api: Client, hooks: str) -> None:
    resp = await api.post(path(hooks, "nope"), data=b"{}", headers=github(b"{}"))
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "webhook_not_found"
    form = b"payload=%7B%7D"
    resp = await api.post(path(hooks, "gh"), data=form, headers=github(form))
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_json"
    big = b'{"x": "' + b"a" * (1024 * 1024) + b'"}'
    resp = await api.post(path(hooks, "gh"), data=big, headers=github(big))
    assert resp.status == 413
