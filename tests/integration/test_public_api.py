"""The public API against real PostgreSQL and the real Kubernetes API server: tokens are
checked by real TokenReviews, permissions by real SubjectAccessReviews, and triggers,
cancels, replays and queue changes create or patch real resources.

Who is who (ServiceAccounts of scratch namespaces, tokens from the TokenRequest API):

- ``alice`` may create, get and list runs in namespace A only;
- ``bob`` may do nothing;
- ``ops`` may create, get, list and patch runs, list tasks, list and patch queues, in A;
- the session's reader may get and list every kubetask resource in the cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from kubernetes import client as k8s
from openapi_spec_validator import validate
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.api import make_app
from kubetask.api.actions import REPLAY_OF, TRIGGERED_BY
from kubetask.api.server import PUBLIC_ENDPOINTS
from kubetask.kube import Kube
from kubetask.settings import Settings
from kubetask.spec import GROUP, VERSION
from kubetask.store import tables as t
from tests.e2e.harness import Stack, namespace, token_for

pytestmark = [pytest.mark.db, pytest.mark.asyncio(loop_scope="session")]

Sessions = async_sessionmaker[AsyncSession]
Client = TestClient[Any, Any]


@dataclass(frozen=True)
class World:
    a: str
    b: str
    alice: str
    bob: str
    ops: str
    reader: str


def _role(ns: str, name: str, rules: list[dict[str, Any]], subject: tuple[str, str]) -> None:
    rbac = k8s.RbacAuthorizationV1Api()
    rbac.create_namespaced_role(ns, {"metadata": {"name": name}, "rules": rules})
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "namespace": subject[0], "name": subject[1]}],
        },
    )


def _wait_allowed(user: str, verb: str, resource: str, ns: str) -> None:
    """RBAC reaches the authorizer through an informer: wait until it allows what we granted."""
    authz = k8s.AuthorizationV1Api()
    body = {
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{user.split(':')[2]}"],
            "resourceAttributes": {"group": GROUP, "resource": resource, "verb": verb, "namespace": ns},
        }
    }
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if authz.create_subject_access_review(body).status.allowed:
            return
        time.sleep(0.2)
    raise AssertionError(f"{user} still may not {verb} {resource} in {ns}")


@pytest.fixture(scope="module")
def world(cluster: Stack, reader_token: str) -> Iterator[World]:
    with (
        namespace(cluster, "it-api-a", label="kubetask.dev/integration") as a,
        namespace(cluster, "it-api-b", label="kubetask.dev/integration") as b,
    ):
        for sa in ("alice", "bob", "ops"):
            cluster.core.create_namespaced_service_account(a, {"metadata": {"name": sa}})
        runs_rule = {"apiGroups": [GROUP], "resources": ["runs"], "verbs": ["create", "get", "list"]}
        _role(a, "alice", [runs_rule], (a, "alice"))
        _role(
            a,
            "ops",
            [
                {"apiGroups": [GROUP], "resources": ["runs"], "verbs": ["create", "get", "list", "patch"]},
                {"apiGroups": [GROUP], "resources": ["tasks"], "verbs": ["list"]},
                {"apiGroups": [GROUP], "resources": ["queues"], "verbs": ["list", "patch"]},
            ],
            (a, "ops"),
        )
        for ns in (a, b):
            for task in ("hello", "batchy"):
                cluster.apply_task(ns, task, {"entrypoint": "app.tasks:hello", "retry": {"maxAttempts": 2}})
        _wait_allowed(f"system:serviceaccount:{a}:alice", "create", "runs", a)
        _wait_allowed(f"system:serviceaccount:{a}:ops", "patch", "queues", a)
        yield World(
            a=a,
            b=b,
            alice=token_for(cluster, a, "alice"),
            bob=token_for(cluster, a, "bob"),
            ops=token_for(cluster, a, "ops"),
            reader=reader_token,
        )


@pytest_asyncio.fixture(loop_scope="session")
async def api(sessions: Sessions, kube: Kube) -> AsyncIterator[Client]:
    apps = make_app(sessions=sessions, settings=Settings(), kube=kube)
    async with TestClient(TestServer(apps.public)) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def error_of(resp: Any, status: int) -> dict[str, str]:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return dict(body["error"])


async def ok(resp: Any, status: int = 200) -> Any:
    assert resp.status == status, await resp.text()
    return await resp.json()


def trigger_path(ns: str, task: str = "hello") -> str:
    return f"/api/v1/namespaces/{ns}/tasks/{task}/trigger"


def run_resource(cluster: Stack, ns: str, name: str) -> dict[str, Any]:
    return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, ns, "runs", name)  # type: ignore[no-any-return]


def given(spec: dict[str, Any]) -> dict[str, Any]:
    """A Run's spec without the values the CRD defaults."""
    return {k: v for k, v in spec.items() if (k, v) not in (("cancel", False), ("priority", 0))}


def _sample_path(path: str, ns: str) -> str:
    return (
        path.replace("{namespace}", ns)
        .replace("{task}", "hello")
        .replace("{queue}", "q")
        .replace("{id}", "run_0000")
        .replace("{name}", "s")
    )


def _public_calls(ns: str) -> list[tuple[str, str]]:
    return [
        (ep.method, _sample_path(ep.path, ns))
        for ep in PUBLIC_ENDPOINTS
        if ep.auth  # health, metrics and signed webhooks take no token
    ]


async def add_attempt_token(sessions: Sessions, ns: str) -> str:
    """A Running run with an attempt; returns the attempt's runner token."""
    token = secrets.token_urlsafe(32)
    run_id = f"run_{secrets.token_hex(10)}"
    async with sessions() as s, s.begin():
        s.add(
            t.Run(
                id=run_id, namespace=ns, name=run_id, uid=secrets.token_hex(16), task="hello",
                queue=f"{ns}/hello", phase="Running", attempt=1, max_attempts=3, payload={}, tags=[],
            )
        )  # fmt: skip
        await s.flush()
        s.add(
            t.Attempt(
                run_id=run_id, number=1, pod_name=f"{run_id}-1",
                token_hash=hashlib.sha256(token.encode()).hexdigest(),
            )
        )  # fmt: skip
    return token


# ---- authentication ----------------------------------------------------------------------


async def test_every_public_endpoint_needs_a_token_the_cluster_accepts(
    api: Client, world: World, sessions: Sessions
) -> None:
    runner_token = await add_attempt_token(sessions, world.a)
    for method, path in _public_calls(world.a):
        err = await error_of(await api.request(method, path, json={}), 401)
        assert err["code"] == "missing_token" and "Bearer" in err["message"], (method, path)
        err = await error_of(await api.request(method, path, json={}, headers=bearer("garbage")), 401)
        assert err["code"] == "invalid_token", (method, path)
        err = await error_of(await api.request(method, path, json={}, headers=bearer(runner_token)), 401)
        assert err["code"] == "invalid_token" and "runner" in err["message"], (method, path)
    # Health and metrics are open: no tenant data there.
    assert (await api.get("/healthz")).status == 200
    assert (await api.get("/metrics")).status == 200
    # The runner endpoints are not served here at all.
    err = await error_of(await api.get("/runner/v1/attempt", headers=bearer(runner_token)), 404)
    assert err["code"] == "not_found"


async def test_the_runner_listener_serves_no_public_endpoint(
    sessions: Sessions, kube: Kube, world: World
) -> None:
    apps = make_app(sessions=sessions, settings=Settings(), kube=kube)
    async with TestClient(TestServer(apps.runner)) as runner:
        for method, path in _public_calls(world.a):
            resp = await runner.request(method, path, headers=bearer(world.reader))
            assert resp.status in (404, 405), (method, path)
        assert (await runner.get("/healthz")).status == 200


# ---- authorization -----------------------------------------------------------------------


async def test_403_names_the_missing_permission(api: Client, world: World) -> None:
    err = await error_of(await api.post(trigger_path(world.a), json={}, headers=bearer(world.bob)), 403)
    assert err["code"] == "forbidden"
    assert err["message"] == (
        f"user system:serviceaccount:{world.a}:bob may not create runs.kubetask.dev in namespace {world.a}"
    )
    err = await error_of(await api.post(trigger_path(world.b), json={}, headers=bearer(world.alice)), 403)
    assert f"may not create runs.kubetask.dev in namespace {world.b}" in err["message"]
    err = await error_of(
        await api.get(f"/api/v1/namespaces/{world.a}/queues", headers=bearer(world.alice)), 403
    )
    assert "may not list queues.kubetask.dev" in err["message"]
    err = await error_of(
        await api.get(f"/api/v1/namespaces/{world.a}/tasks", headers=bearer(world.alice)), 403
    )
    assert "may not list tasks.kubetask.dev" in err["message"]


async def test_users_read_only_the_namespaces_rbac_lets_them(
    api: Client, world: World, sessions: Sessions
) -> None:
    mine = await ok(await api.post(trigger_path(world.a), json={}, headers=bearer(world.alice)), 201)
    theirs = await add_attempt_token(sessions, world.b)  # a run in B
    async with sessions() as s:
        b_run = await s.scalar(select(t.Run.id).where(t.Run.namespace == world.b))
    assert b_run is not None and theirs

    assert (await ok(await api.get(f"/api/v1/runs/{mine['id']}", headers=bearer(world.alice))))["id"] == mine[
        "id"
    ]
    err = await error_of(await api.get(f"/api/v1/runs/{b_run}", headers=bearer(world.alice)), 403)
    assert f"may not get runs.kubetask.dev in namespace {world.b}" in err["message"]
    err = await error_of(await api.get(f"/api/v1/runs/{b_run}/logs", headers=bearer(world.alice)), 403)
    assert err["code"] == "forbidden"
    err = await error_of(
        await api.get("/api/v1/runs", params={"namespace": world.b}, headers=bearer(world.alice)), 403
    )
    assert f"may not list runs.kubetask.dev in namespace {world.b}" in err["message"]

    listed = await ok(await api.get("/api/v1/runs", params={"limit": "500"}, headers=bearer(world.alice)))
    namespaces = {item["namespace"] for item in listed["items"]}
    assert namespaces == {world.a} and mine["id"] in {i["id"] for i in listed["items"]}
    everything = await ok(
        await api.get("/api/v1/runs", params={"limit": "500"}, headers=bearer(world.reader))
    )
    assert {world.a, world.b} <= {item["namespace"] for item in everything["items"]}
    nothing = await ok(await api.get("/api/v1/runs", headers=bearer(world.bob)))
    assert nothing == {"items": [], "nextCursor": None}


# ---- trigger and batch -----------------------------------------------------------------------


async def test_trigger_creates_a_run_resource_and_records_it(
    api: Client, world: World, sessions: Sessions, cluster: Stack
) -> None:
    body = {"payload": {"who": "api"}, "priority": 7, "tags": ["from-api"], "concurrencyKey": "tenant-1"}
    got = await ok(await api.post(trigger_path(world.a), json=body, headers=bearer(world.alice)), 201)
    assert set(got) == {"id", "name", "namespace", "task", "isCached"}
    assert got["namespace"] == world.a and got["task"] == "hello" and got["isCached"] is False
    resource = run_resource(cluster, world.a, got["name"])
    assert given(resource["spec"]) == {
        "task": "hello",
        "payload": {"who": "api"},
        "priority": 7,
        "tags": ["from-api"],
        "concurrencyKey": "tenant-1",
    }
    assert resource["metadata"]["annotations"][TRIGGERED_BY] == f"system:serviceaccount:{world.a}:alice"
    async with sessions() as s:
        row = await s.get(t.Run, got["id"])
    assert row is not None
    assert (row.uid, row.name, row.namespace, row.task) == (
        resource["metadata"]["uid"], got["name"], world.a, "hello",
    )  # fmt: skip
    assert row.payload == {"who": "api"} and row.priority == 7 and row.queue == f"{world.a}/hello"
    detail = await ok(await api.get(f"/api/v1/runs/{got['id']}", headers=bearer(world.alice)))
    assert detail["payload"] == {"who": "api"} and detail["phase"] == "Pending" and detail["attempts"] == []


async def test_trigger_problems(api: Client, world: World) -> None:
    err = await error_of(
        await api.post(trigger_path(world.a, "nope"), json={}, headers=bearer(world.alice)), 404
    )
    assert err["code"] == "task_not_found" and "'nope'" in err["message"] and world.a in err["message"]
    err = await error_of(
        await api.post(trigger_path(world.a), json={"priority": 5000}, headers=bearer(world.alice)), 400
    )
    assert err["code"] == "invalid_body" and err["message"].startswith("priority: ")
    err = await error_of(
        await api.post(trigger_path(world.a), json={"delay": 5}, headers=bearer(world.alice)), 400
    )
    assert "delay" in err["message"]
    big = {"payload": {"x": "a" * 300_000}}
    err = await error_of(await api.post(trigger_path(world.a), json=big, headers=bearer(world.alice)), 413)
    assert err["code"] == "payload_too_large"
    err = await error_of(
        await api.post(trigger_path(world.a), data=b"{nope", headers=bearer(world.alice)), 400
    )
    assert err["code"] == "invalid_json"
    # What PostgreSQL cannot hold is refused by name, not a 500 (the fuzzer found these).
    err = await error_of(await api.get("/api/v1/runs?tag=a%00b", headers=bearer(world.alice)), 400)
    assert err["code"] == "invalid_parameter" and "tag" in err["message"]
    err = await error_of(await api.get("/api/v1/runs/run%00x", headers=bearer(world.alice)), 404)
    assert err["code"] == "run_not_found"
    err = await error_of(
        await api.post(trigger_path(world.a), json={"payload": {"a": "\u0000"}}, headers=bearer(world.alice)),
        400,
    )
    assert err["message"].startswith("payload: has a NUL")


async def test_an_idempotent_trigger_returns_the_held_run(
    api: Client, world: World, sessions: Sessions, cluster: Stack
) -> None:
    key = f"order-{secrets.token_hex(4)}"
    body = {"payload": {"n": 1}, "idempotencyKey": key, "idempotencyKeyTTLSeconds": 600}
    first = await ok(await api.post(trigger_path(world.a), json=body, headers=bearer(world.alice)), 201)
    again = await ok(await api.post(trigger_path(world.a), json=body, headers=bearer(world.alice)), 200)
    assert again == first | {"isCached": True}
    # Concurrent triggers with a new key: one run, every answer names it.
    key2 = f"order-{secrets.token_hex(4)}"
    answers = await asyncio.gather(
        *(
            api.post(trigger_path(world.a), json={"idempotencyKey": key2}, headers=bearer(world.alice))
            for _ in range(5)
        )
    )
    bodies = [await r.json() for r in answers]
    assert len({b["id"] for b in bodies}) == 1, bodies
    assert sorted(b["isCached"] for b in bodies).count(False) <= 1
    live = [
        r
        for r in cluster.custom.list_namespaced_custom_object(GROUP, VERSION, world.a, "runs")["items"]
        if r["spec"].get("idempotencyKey") in (key, key2)
    ]
    assert len(live) == 2, [r["metadata"]["name"] for r in live]
    async with sessions() as s:
        held = await s.get(t.IdempotencyKey, (world.a, "hello", key))
    assert held is not None and held.run_id == first["id"]
    assert timedelta(seconds=500) < held.expires_at - datetime.now(UTC) <= timedelta(seconds=600)


async def test_a_batch_of_200(api: Client, world: World, sessions: Sessions, cluster: Stack) -> None:
    key = f"b-{secrets.token_hex(4)}"
    items: list[dict[str, Any]] = [{"payload": {"i": i}, "tags": ["batch"]} for i in range(198)]
    items += [{"idempotencyKey": key}, {"idempotencyKey": key}]
    started = time.monotonic()
    got = await ok(
        await api.post(
            f"/api/v1/namespaces/{world.a}/tasks/batchy/batch",
            json={"items": items},
            headers=bearer(world.alice),
        ),
        201,
    )
    elapsed = time.monotonic() - started
    answers = got["items"]
    assert len(answers) == 200 and len({a["id"] for a in answers[:198]}) == 198
    assert answers[198]["id"] == answers[199]["id"]  # one key, one run
    assert all(a["task"] == "batchy" and a["namespace"] == world.a for a in answers)
    names = {
        r["metadata"]["name"]
        for r in cluster.custom.list_namespaced_custom_object(GROUP, VERSION, world.a, "runs")["items"]
        if r["spec"]["task"] == "batchy"
    }
    assert {a["name"] for a in answers} <= names and len(names) == 199
    async with sessions() as s:
        recorded = await s.scalar(
            select(func.count()).select_from(t.Run).where(t.Run.id.in_([a["id"] for a in answers]))
        )
    assert recorded == 199
    assert elapsed < 60, elapsed

    err = await error_of(
        await api.post(
            f"/api/v1/namespaces/{world.a}/tasks/batchy/batch",
            json={"items": [{}] * 1001},
            headers=bearer(world.alice),
        ),
        413,
    )
    assert err["code"] == "too_many_items"
    err = await error_of(
        await api.post(
            f"/api/v1/namespaces/{world.a}/tasks/batchy/batch",
            json={"items": [{}, {"priority": "x"}]},
            headers=bearer(world.alice),
        ),
        400,
    )
    assert err["message"].startswith("items[1].priority")


# ---- cancel and replay -----------------------------------------------------------------------


async def test_cancel_sets_spec_cancel(api: Client, world: World, cluster: Stack) -> None:
    run = await ok(await api.post(trigger_path(world.a), json={}, headers=bearer(world.alice)), 201)
    err = await error_of(await api.post(f"/api/v1/runs/{run['id']}/cancel", headers=bearer(world.alice)), 403)
    assert f"may not patch runs.kubetask.dev in namespace {world.a}" in err["message"]
    got = await ok(await api.post(f"/api/v1/runs/{run['id']}/cancel", headers=bearer(world.ops)))
    assert got == {
        "id": run["id"],
        "name": run["name"],
        "namespace": world.a,
        "phase": "Pending",
        "cancelRequested": True,
    }
    assert run_resource(cluster, world.a, run["name"])["spec"]["cancel"] is True

    gone = await ok(await api.post(trigger_path(world.a), json={}, headers=bearer(world.alice)), 201)
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, world.a, "runs", gone["name"])
    err = await error_of(await api.post(f"/api/v1/runs/{gone['id']}/cancel", headers=bearer(world.ops)), 409)
    assert err["code"] == "run_resource_gone" and gone["name"] in err["message"]
    err = await error_of(await api.post("/api/v1/runs/run_nope/cancel", headers=bearer(world.ops)), 404)
    assert err["code"] == "run_not_found"


async def test_replay_creates_a_linked_run(
    api: Client, world: World, sessions: Sessions, cluster: Stack
) -> None:
    body = {"payload": {"again": True}, "tags": ["t"], "idempotencyKey": f"k-{secrets.token_hex(3)}"}
    original = await ok(await api.post(trigger_path(world.a), json=body, headers=bearer(world.alice)), 201)
    err = await error_of(
        await api.post(f"/api/v1/runs/{original['id']}/replay", headers=bearer(world.bob)), 403
    )
    assert "may not create runs.kubetask.dev" in err["message"]
    replay = await ok(
        await api.post(f"/api/v1/runs/{original['id']}/replay", headers=bearer(world.alice)), 201
    )
    assert (
        replay["replayOf"] == original["id"] and replay["id"] != original["id"] and replay["task"] == "hello"
    )
    resource = run_resource(cluster, world.a, replay["name"])
    assert resource["metadata"]["labels"][REPLAY_OF] == original["id"]
    assert given(resource["spec"]) == {"task": "hello", "payload": {"again": True}, "tags": ["t"]}
    async with sessions() as s:
        row = await s.get(t.Run, replay["id"])
    assert row is not None and row.payload == {"again": True} and row.uid == resource["metadata"]["uid"]

    # With another payload: the rest of the spec and the link stay.
    edited = await ok(
        await api.post(
            f"/api/v1/runs/{original['id']}/replay", json={"payload": {"n": 2}}, headers=bearer(world.alice)
        ),
        201,
    )
    resource = run_resource(cluster, world.a, edited["name"])
    assert resource["metadata"]["labels"][REPLAY_OF] == original["id"]
    assert given(resource["spec"]) == {"task": "hello", "payload": {"n": 2}, "tags": ["t"]}
    err = await error_of(
        await api.post(
            f"/api/v1/runs/{original['id']}/replay", json={"payload": [1]}, headers=bearer(world.alice)
        ),
        400,
    )
    assert err["message"].startswith("payload")
    # {} is the original's payload, as no body is.
    same = await ok(
        await api.post(f"/api/v1/runs/{original['id']}/replay", json={}, headers=bearer(world.alice)), 201
    )
    assert given(run_resource(cluster, world.a, same["name"])["spec"])["payload"] == {"again": True}


async def test_bulk_cancel_streams_progress(api: Client, world: World, cluster: Stack) -> None:
    tag = f"bulk-{secrets.token_hex(3)}"
    runs = [
        await ok(
            await api.post(trigger_path(world.a), json={"tags": [tag]}, headers=bearer(world.alice)), 201
        )
        for _ in range(5)
    ]
    err = await error_of(
        await api.post(
            "/api/v1/runs/cancel", json={"tag": [tag], "namespace": [world.a]}, headers=bearer(world.alice)
        ),
        403,
    )
    assert "may not patch runs" in err["message"]
    err = await error_of(await api.post("/api/v1/runs/cancel", json={}, headers=bearer(world.ops)), 400)
    assert "at least one filter" in err["message"]

    # A dry run counts what would be canceled (a confirmation's number) and changes nothing.
    dry = await api.post(
        "/api/v1/runs/cancel", json={"tag": [tag], "dryRun": True, "limit": 4}, headers=bearer(world.ops)
    )
    assert [json.loads(line) for line in (await dry.text()).splitlines()] == [
        {
            "done": 0,
            "total": 4,
            "summary": {
                "matched": 4, "succeeded": 0, "skipped": 0, "failed": 0, "truncated": True,
                "deniedNamespaces": [],
            },
        }
    ]  # fmt: skip
    assert not any(run_resource(cluster, world.a, r["name"])["spec"].get("cancel") for r in runs)

    resp = await api.post("/api/v1/runs/cancel", json={"tag": [tag]}, headers=bearer(world.ops))
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in (await resp.text()).splitlines()]
    progress, summary = lines[:-1], lines[-1]
    assert [p["done"] for p in progress] == [1, 2, 3, 4, 5] and {p["total"] for p in progress} == {5}
    assert {p["runId"] for p in progress} == {r["id"] for r in runs}
    assert {p["result"] for p in progress} == {"canceled"}
    assert summary["done"] == 5 and summary["summary"]["succeeded"] == 5 and summary["summary"]["failed"] == 0
    for r in runs:
        assert run_resource(cluster, world.a, r["name"])["spec"]["cancel"] is True


async def test_bulk_replay(api: Client, world: World) -> None:
    tag = f"rep-{secrets.token_hex(3)}"
    for _ in range(3):
        await ok(
            await api.post(trigger_path(world.a), json={"tags": [tag]}, headers=bearer(world.alice)), 201
        )
    resp = await api.post(
        "/api/v1/runs/replay", json={"tag": tag, "namespace": world.a}, headers=bearer(world.alice)
    )
    lines = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert [line["result"] for line in lines[:-1]] == ["replayed"] * 3
    assert all(line["newRunId"] for line in lines[:-1]) and lines[-1]["summary"]["succeeded"] == 3


# ---- logs --------------------------------------------------------------------------------


async def test_logs_follow_streams_until_the_run_ends(api: Client, world: World, sessions: Sessions) -> None:
    run = await ok(await api.post(trigger_path(world.a), json={}, headers=bearer(world.alice)), 201)

    async def log(message: str) -> None:
        async with sessions() as s, s.begin():
            s.add(
                t.LogLine(
                    run_id=run["id"],
                    attempt=1,
                    ts=datetime.now(UTC),
                    level="INFO",
                    stream="stdout",
                    message=message,
                )
            )

    await log("first")
    resp = await api.get(
        f"/api/v1/runs/{run['id']}/logs", params={"follow": "true"}, headers=bearer(world.alice)
    )
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/x-ndjson")
    first = json.loads(await resp.content.readline())
    assert first["message"] == "first"
    await log("second")
    assert json.loads(await resp.content.readline())["message"] == "second"
    async with sessions() as s, s.begin():
        row = await s.get(t.Run, run["id"])
        assert row is not None
        row.phase = "Succeeded"
    end = json.loads(await asyncio.wait_for(resp.content.readline(), 10))
    assert end == {"end": True, "phase": "Succeeded"}
    assert await resp.content.read() == b""


# ---- tasks and queues ------------------------------------------------------------------------


async def test_tasks_list_with_live_counts(api: Client, world: World) -> None:
    await ok(await api.post(trigger_path(world.a), json={}, headers=bearer(world.alice)), 201)
    got = await ok(await api.get(f"/api/v1/namespaces/{world.a}/tasks", headers=bearer(world.ops)))
    by_name = {item["name"]: item for item in got["items"]}
    assert set(by_name) == {"batchy", "hello"}
    hello = by_name["hello"]
    assert (
        hello["queue"] == "hello" and hello["entrypoint"] == "app.tasks:hello" and hello["maxAttempts"] == 2
    )
    assert hello["runs"]["pending"] >= 1


async def test_tasks_list_has_the_recent_runs_success_rate_and_duration_percentiles(
    api: Client, world: World, sessions: Sessions
) -> None:
    # Namespace B's batchy has no other runs. Ended runs took 1, 2, 3, 4 (succeeded) and 10 s
    # (failed); a canceled one never started (not in the rate, no duration); one is older.
    now = datetime.now(UTC)
    ends = [("Succeeded", 1), ("Succeeded", 2), ("Succeeded", 3), ("Succeeded", 4), ("Failed", 10)]
    async with sessions() as s, s.begin():
        for i, (phase, seconds) in enumerate([*ends, ("Canceled", None), ("Succeeded", 99)]):
            created = now - timedelta(days=3 if seconds == 99 else 0, minutes=10)
            started = created + timedelta(seconds=1) if seconds is not None else None
            s.add(
                t.Run(
                    id=f"run_{secrets.token_hex(10)}", namespace=world.b, name=f"batchy-{i}",
                    uid=secrets.token_hex(16), task="batchy", queue=f"{world.b}/batchy", phase=phase,
                    attempt=1, max_attempts=1, payload={}, tags=[], created_at=created, started_at=started,
                    finished_at=started + timedelta(seconds=seconds) if started and seconds else created,
                )
            )  # fmt: skip
    got = await ok(await api.get(f"/api/v1/namespaces/{world.b}/tasks", headers=bearer(world.reader)))
    recent = {item["name"]: item["recent"] for item in got["items"]}["batchy"]
    assert {k: v for k, v in recent.items() if k != "since"} == {
        "runs": 6, "succeeded": 4, "failed": 1, "successRate": 0.8, "p50Seconds": 3.0,
        "p95Seconds": pytest.approx(8.8),  # percentile_cont: 4 + 0.8 * (10 - 4)
    }  # fmt: skip
    week = await ok(
        await api.get(f"/api/v1/namespaces/{world.b}/tasks?since=7d", headers=bearer(world.reader))
    )
    assert {item["name"]: item["recent"] for item in week["items"]}["batchy"]["runs"] == 7
    hello = {item["name"]: item["recent"] for item in got["items"]}["hello"]
    assert hello["successRate"] is None and hello["p50Seconds"] is None  # none of its runs ended


async def test_queue_patch_changes_the_queue_resource(
    api: Client, world: World, sessions: Sessions, cluster: Stack
) -> None:
    # The queue has inline limits from a Task (a row in PostgreSQL): a new Queue resource
    # must start from them, or pausing would lift the limit.
    async with sessions() as s, s.begin():
        s.add(
            t.Queue(
                name=f"{world.a}/q1", concurrency_limit=2, per_key_limit=None, paused=False, source="task"
            )
        )
    path = f"/api/v1/namespaces/{world.a}/queues/q1"
    err = await error_of(await api.patch(path, json={"paused": True}, headers=bearer(world.alice)), 403)
    assert "may not patch queues.kubetask.dev" in err["message"]
    got = await ok(await api.patch(path, json={"paused": True}, headers=bearer(world.ops)))
    assert got["paused"] is True and got["concurrencyLimit"] == 2 and got["hasResource"] is True
    queue = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, world.a, "queues", "q1")
    assert queue["spec"] == {"paused": True, "concurrencyLimit": 2}
    got = await ok(
        await api.patch(path, json={"concurrencyLimit": 5, "paused": False}, headers=bearer(world.ops))
    )
    assert got["concurrencyLimit"] == 5 and got["paused"] is False
    await ok(await api.patch(path, json={"concurrencyLimit": None}, headers=bearer(world.ops)))
    queue = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, world.a, "queues", "q1")
    assert queue["spec"] == {"paused": False}
    err = await error_of(await api.patch(path, json={"concurrencyLimit": 0}, headers=bearer(world.ops)), 400)
    assert err["message"].startswith("concurrencyLimit: ")

    listed = await ok(await api.get(f"/api/v1/namespaces/{world.a}/queues", headers=bearer(world.ops)))
    q1 = next(item for item in listed["items"] if item["name"] == "q1")
    assert q1["hasResource"] is True and q1["source"] == "queue" and q1["running"] == 0


# ---- the document --------------------------------------------------------------------------


async def test_openapi_document(api: Client, world: World) -> None:
    assert (await api.get("/api/v1/openapi.json")).status == 401
    doc = await ok(await api.get("/api/v1/openapi.json", headers=bearer(world.bob)))
    validate(doc)
    assert "/api/v1/namespaces/{namespace}/tasks/{task}/trigger" in doc["paths"]


# ---- fuzzing ---------------------------------------------------------------------------------

#: Examples per operation: enough to find a 500 or a body that breaks its schema, bounded so
#: the test takes seconds.
FUZZ_EXAMPLES = 25


async def test_fuzz_the_public_api_from_its_openapi_document(api: Client, world: World) -> None:
    """schemathesis generates requests from the document (valid and invalid ones) and checks
    every answer: no 5xx, status codes, content types and bodies as documented. The token
    may only read, so the fuzzing changes nothing in the shared cluster."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import checks
    from schemathesis.generation import GenerationMode

    from kubetask.api.server import OPENAPI

    base_url = str(api.make_url("")).rstrip("/")
    headers = bearer(world.reader)
    schema = schemathesis.openapi.from_dict(OPENAPI)
    # Every check but positive_data_acceptance: some parameters' validity is beyond JSON
    # Schema (a cursor must be one the API issued; since/until an ISO time or a duration),
    # and refusing those with a 400 naming them is the intended answer.
    wanted = [
        checks.not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_schema_conformance,
        checks.response_headers_conformance,
        checks.negative_data_rejection,
    ]
    checked: list[str] = []

    def fuzz() -> None:
        for result in schema.get_all_operations():
            operation = result.ok()  # type: ignore[union-attr]  # an Err (our schema invalid) fails here
            # Schema-invalid requests only where a body can be: in a query string every
            # value is text, so "a boolean where an array belongs" is not a different request.
            modes = [GenerationMode.POSITIVE]
            if operation.method.upper() in ("POST", "PATCH") and operation.body:
                modes.append(GenerationMode.NEGATIVE)
            for mode in modes:
                strategy = operation.as_strategy(generation_mode=mode)
                if operation.path == "/api/v1/runs/{id}/logs":
                    # follow=true on a live run streams until it ends: fuzz the pages only.
                    strategy = strategy.filter(
                        lambda case: (
                            str((case.query or {}).get("follow", "false")).lower() not in ("true", "1")
                        )
                    )

                @settings(
                    max_examples=FUZZ_EXAMPLES,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                @given(case=strategy)
                def run(case: Any) -> None:
                    case.call_and_validate(base_url=base_url, headers=headers, checks=wanted, timeout=30)

                run()
            checked.append(f"{operation.method.upper()} {operation.path}")

    await asyncio.to_thread(fuzz)
    assert len(checked) == len(PUBLIC_ENDPOINTS), checked
