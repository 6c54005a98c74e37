"""``kubetask.Client`` and ``kubetask.AsyncClient`` against a real operator API (real
PostgreSQL; tokens checked by real TokenReviews, permissions by real
SubjectAccessReviews), and their credential discovery against the real cluster: a
kubeconfig with a token, the local client-certificate admin kubeconfig (a token minted
with the TokenRequest API), and the Kubernetes API server's service proxy, which removes
``Authorization`` (the token travels in ``X-Kubetask-Token``).

Who is who (ServiceAccounts of a scratch namespace, tokens from the TokenRequest API):
``dev`` may do everything the API offers in the namespace (and ``get services/proxy``);
``viewer`` may only get and list runs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import yaml
from aiohttp.test_utils import TestServer
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import kubetask
from kubetask import ApiError, AsyncClient, Client
from kubetask.api import make_app
from kubetask.api.actions import REPLAY_OF, TRIGGERED_BY
from kubetask.apimodels import BulkProgress, BulkSummary, TriggerRequest
from kubetask.kube import Kube
from kubetask.sdk import client as client_module
from kubetask.sdk import credentials
from kubetask.settings import Settings
from kubetask.spec import GROUP, VERSION
from kubetask.store import tables as t
from tests.e2e.harness import Stack, hack, namespace, service_account_token, token_for

pytestmark = [pytest.mark.db, pytest.mark.asyncio(loop_scope="session")]

Sessions = async_sessionmaker[AsyncSession]
HOST_IP = "10.88.0.1"  # how pods reach this host (the local stack's bridge)
ALL_KUBETASK = [{"apiGroups": [GROUP], "resources": ["runs", "tasks", "queues", "schedules"], "verbs": ["*"]}]


@dataclass(frozen=True)
class World:
    ns: str
    dev: str
    viewer: str


def _role(ns: str, name: str, rules: list[dict[str, Any]]) -> None:
    rbac = k8s.RbacAuthorizationV1Api()
    rbac.create_namespaced_role(ns, {"metadata": {"name": name}, "rules": rules})
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "namespace": ns, "name": name}],
        },
    )


def _wait_allowed(
    ns: str, sa: str, verb: str, resource: str, group: str = GROUP, subresource: str = ""
) -> None:
    """RBAC reaches the authorizer through an informer: wait until it allows what we granted."""
    attributes = {
        "group": group,
        "resource": resource,
        "verb": verb,
        "namespace": ns,
        "subresource": subresource,
    }
    body = {
        "spec": {
            "user": f"system:serviceaccount:{ns}:{sa}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}"],
            "resourceAttributes": attributes,
        }
    }
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if k8s.AuthorizationV1Api().create_subject_access_review(body).status.allowed:
            return
        time.sleep(0.2)
    raise AssertionError(f"{sa} still may not {verb} {resource} in {ns}")


@pytest.fixture(scope="module")
def world(cluster: Stack) -> Iterator[World]:
    with namespace(cluster, "it-client", label="kubetask.dev/integration") as ns:
        for sa in ("dev", "viewer"):
            cluster.core.create_namespaced_service_account(ns, {"metadata": {"name": sa}})
        _role(
            ns,
            "dev",
            [
                *ALL_KUBETASK,
                {"apiGroups": [""], "resources": ["services/proxy"], "verbs": ["get", "create", "patch"]},
            ],
        )
        _role(ns, "viewer", [{"apiGroups": [GROUP], "resources": ["runs"], "verbs": ["get", "list"]}])
        for task in ("hello", "other"):
            cluster.apply_task(ns, task, {"entrypoint": "app.tasks:hello", "retry": {"maxAttempts": 2}})
        _wait_allowed(ns, "dev", "patch", "queues")
        _wait_allowed(ns, "viewer", "list", "runs")
        yield World(ns=ns, dev=token_for(cluster, ns, "dev"), viewer=token_for(cluster, ns, "viewer"))


@dataclass(frozen=True)
class Api:
    url: str
    """Reachable from this host."""
    port: int
    """Bound on every address: pods reach it at HOST_IP:port."""


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def api(sessions: Sessions, kube: Kube) -> AsyncIterator[Api]:
    apps = make_app(sessions=sessions, settings=Settings(), kube=kube)
    # Port 0: bound in one step (a port looked up first could be given to another process).
    server = TestServer(apps.public, host="0.0.0.0")
    await server.start_server()
    assert server.port is not None
    try:
        yield Api(url=f"http://127.0.0.1:{server.port}", port=server.port)
    finally:
        await server.close()


def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """The sync client in a thread: the API serves from this event loop."""
    return asyncio.to_thread(fn, *args, **kwargs)


def run_resource(cluster: Stack, ns: str, name: str) -> dict[str, Any]:
    return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, ns, "runs", name)  # type: ignore[no-any-return]


async def set_phase(sessions: Sessions, run_id: str, phase: str) -> None:
    async with sessions() as s, s.begin():
        run = await s.get(t.Run, run_id)
        assert run is not None
        run.phase = phase
        if phase in ("Succeeded", "Failed"):
            run.finished_at = datetime.now(UTC).replace(tzinfo=None)


# ---- the sync client ----------------------------------------------------------------------


async def test_trigger_creates_a_run_resource_and_idempotency_answers_the_same_run(
    api: Api, world: World, cluster: Stack
) -> None:
    client = Client(api.url, world.dev, namespace=world.ns)
    key = f"order-{secrets.token_hex(4)}"
    first = await in_thread(
        client.tasks.trigger,
        "hello",
        {"name": "x"},
        idempotency_key=key,
        concurrency_key="tenant-7",
        priority=5,
        tags=["py"],
        max_attempts=3,
    )
    assert first.id.startswith("run_") and first.task == "hello" and not first.is_cached
    run = run_resource(cluster, world.ns, first.name)
    assert run["spec"]["payload"] == {"name": "x"} and run["spec"]["idempotencyKey"] == key
    assert run["spec"]["concurrencyKey"] == "tenant-7" and run["spec"]["priority"] == 5
    assert run["spec"]["tags"] == ["py"] and run["spec"]["maxAttempts"] == 3
    assert run["metadata"]["annotations"][TRIGGERED_BY] == f"system:serviceaccount:{world.ns}:dev"
    again = await in_thread(client.tasks.trigger, "hello", {"name": "y"}, idempotency_key=key)
    assert again.is_cached and again.id == first.id
    # Checked here, with the server's message, before anything is sent.
    with pytest.raises(ValueError, match="priority"):
        client.tasks.trigger("hello", priority=5000)
    client.close()


async def test_batch_list_retrieve_cancel_replay(
    api: Api, world: World, cluster: Stack, sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Client(api.url, world.dev, namespace=world.ns) as client:
        tag = f"b-{secrets.token_hex(3)}"
        items: list[Any] = [{"payload": {"i": i}, "tags": [tag]} for i in range(4)]
        items.append(TriggerRequest(payload={"i": 4}, tags=[tag]))
        made = await in_thread(client.tasks.batch_trigger, "other", items)
        assert [m.task for m in made] == ["other"] * 5 and len({m.id for m in made}) == 5

        # Pages are fetched as needed: two runs a page here.
        monkeypatch.setattr(client_module, "LIST_PAGE", 2)
        listed = await in_thread(lambda: list(client.runs.list("other", tags=[tag], namespace=world.ns)))
        assert sorted(r.id for r in listed) == sorted(m.id for m in made) and len(listed) == 5
        three = await in_thread(
            lambda: list(client.runs.list("other", tags=tag, namespace=world.ns, limit=3))
        )
        assert len(three) == 3
        since = datetime.now(UTC) - timedelta(minutes=5)
        pending = await in_thread(
            lambda: list(client.runs.list(["other"], status=["PENDING"], since=since, tags=[tag]))
        )
        assert len(pending) == 5  # every namespace the caller may read: this one
        assert await in_thread(lambda: list(client.runs.list("other", status=["Failed"], tags=[tag]))) == []

        detail = await in_thread(client.runs.retrieve, made[0].id)
        assert detail.payload == {"i": 0} and detail.phase == "Pending" and detail.tags == [tag]

        canceled = await in_thread(client.runs.cancel, made[0].id)
        assert canceled.cancel_requested and canceled.id == made[0].id
        assert run_resource(cluster, world.ns, made[0].name)["spec"]["cancel"] is True

        replayed = await in_thread(client.runs.replay, made[1].id)
        assert replayed.replay_of == made[1].id and replayed.task == "other"
        labels = run_resource(cluster, world.ns, replayed.name)["metadata"]["labels"]
        assert labels[REPLAY_OF] == made[1].id
        edited = await in_thread(client.runs.replay, made[1].id, {"edited": True})
        assert run_resource(cluster, world.ns, edited.name)["spec"]["payload"] == {"edited": True}

        # wait: a clear TimeoutError while the run goes on, the run once it has ended.
        with pytest.raises(TimeoutError, match=rf"run {made[2].id} is still Pending after 0.5 s"):
            await in_thread(client.runs.wait, made[2].id, timeout=0.5, poll_interval=0.1)
        await set_phase(sessions, made[2].id, "Succeeded")
        done = await in_thread(client.runs.wait, made[2].id, timeout=10)
        assert done.phase == "Succeeded"

        # The seed's query, as docs/client.md writes it.
        await set_phase(sessions, made[3].id, "Failed")
        failed = await in_thread(
            lambda: list(
                client.runs.list("other", status=["FAILED"], since=datetime.now(UTC) - timedelta(days=1))
            )
        )
        assert made[3].id in [r.id for r in failed] and {r.phase for r in failed} == {"Failed"}

        with pytest.raises(ApiError) as missing:
            await in_thread(client.runs.retrieve, "run_nope")
        assert missing.value.status == 404 and missing.value.code == "run_not_found"
        with pytest.raises(ApiError) as finished:
            await in_thread(client.runs.cancel, made[2].id)
        assert finished.value.status == 409 and finished.value.code == "run_finished"


async def test_logs_paged_and_followed(
    api: Api, world: World, sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Client(api.url, world.dev, namespace=world.ns) as client:
        made = await in_thread(client.tasks.trigger, "hello", {})
        now = datetime.now(UTC).replace(tzinfo=None)
        async with sessions() as s, s.begin():
            for i in range(5):
                s.add(
                    t.LogLine(
                        run_id=made.id, attempt=1, ts=now, level="info", stream="stdout", message=f"m{i}"
                    )
                )
        monkeypatch.setattr(client_module, "LOG_PAGE", 2)  # several pages
        lines = await in_thread(lambda: [ln.message for ln in client.runs.logs(made.id)])
        assert lines == [f"m{i}" for i in range(5)]
        await set_phase(sessions, made.id, "Succeeded")
        followed = await in_thread(lambda: [ln.message for ln in client.runs.logs(made.id, follow=True)])
        assert followed == lines


async def test_queues_pause_resume_and_limits(api: Api, world: World) -> None:
    with Client(api.url, world.dev, namespace=world.ns) as client:
        tasks = {task.name: task for task in await in_thread(client.tasks.list)}
        assert tasks["hello"].max_attempts == 2 and tasks["hello"].queue == "hello"
        paused = await in_thread(client.queues.pause, "hello")
        assert paused.paused and paused.has_resource
        # Queues known from Queue resources (and, with an operator, from its records).
        listed = {q.name: q for q in await in_thread(client.queues.list)}
        assert listed["hello"].paused
        assert not (await in_thread(client.queues.resume, "hello")).paused
        limited = await in_thread(client.queues.set_limit, "hello", 3, per_key_concurrency_limit=1)
        assert (limited.concurrency_limit, limited.per_key_concurrency_limit) == (3, 1)
        unlimited = await in_thread(client.queues.set_limit, "hello", None)
        assert unlimited.concurrency_limit is None and unlimited.per_key_concurrency_limit == 1


async def test_api_errors_keep_the_servers_status_code_and_message(api: Api, world: World) -> None:
    viewer = Client(api.url, world.viewer, namespace=world.ns)
    with pytest.raises(ApiError) as denied:
        await in_thread(viewer.tasks.trigger, "hello", {})
    e = denied.value
    assert (e.status, e.code) == (403, "forbidden")
    assert (
        f"system:serviceaccount:{world.ns}:viewer may not create runs.kubetask.dev in namespace {world.ns}"
        in (e.message)
    )
    assert "403" in str(e) and isinstance(e, kubetask.ApiError)
    with pytest.raises(ApiError) as bad_token:
        await in_thread(Client(api.url, "not-a-token", namespace=world.ns).tasks.list)
    assert (bad_token.value.status, bad_token.value.code) == (401, "invalid_token")
    with pytest.raises(ApiError) as down:
        await in_thread(Client("http://127.0.0.1:9", "x").runs.retrieve, "run_x")
    assert down.value.code == "unreachable" and "http://127.0.0.1:9" in down.value.message
    viewer.close()


# ---- the async client ---------------------------------------------------------------------


async def test_async_client(api: Api, world: World, cluster: Stack) -> None:
    async with AsyncClient(api.url, world.dev, namespace=world.ns) as client:
        tag = f"a-{secrets.token_hex(3)}"
        made = await client.tasks.trigger("hello", {"n": 1}, tags=[tag])
        assert run_resource(cluster, world.ns, made.name)["spec"]["payload"] == {"n": 1}
        batch = await client.tasks.batch_trigger(
            "hello", [{"payload": {"n": i}, "tags": [tag]} for i in range(3)]
        )
        listed = [r.id async for r in client.runs.list("hello", tags=[tag], namespace=world.ns)]
        assert sorted(listed) == sorted([b.id for b in batch] + [made.id])
        assert (await client.runs.retrieve(made.id)).payload == {"n": 1}
        assert (await client.runs.replay(made.id)).replay_of == made.id
        edited = await client.runs.replay(made.id, {"n": 9})
        assert (await client.runs.retrieve(edited.id)).payload == {"n": 9}
        assert (await client.runs.cancel(made.id)).cancel_requested
        with pytest.raises(TimeoutError, match=batch[0].id):
            await client.runs.wait(batch[0].id, timeout=0.3, poll_interval=0.1)

        lines = [line async for line in client.runs.bulk_cancel("hello", tags=[tag], namespace=world.ns)]
        progress = [x for x in lines if isinstance(x, BulkProgress)]
        summary = lines[-1]
        assert isinstance(summary, BulkSummary)
        # Every tagged run is unfinished (no operator here): the batch, the first run (its
        # cancel asked above) and its two replays (which keep its tags).
        assert summary.summary.matched == len(progress) == 6 and summary.summary.failed == 0
        assert {p.result for p in progress} <= {"canceled", "skipped"}
        assert (await client.queues.pause("other")).paused
        assert not (await client.queues.resume("other")).paused
        assert {task.name for task in await client.tasks.list()} >= {"hello", "other"}

    viewer = AsyncClient(api.url, world.viewer, namespace=world.ns)
    with pytest.raises(ApiError) as denied:
        await viewer.runs.cancel(made.id)
    assert denied.value.status == 403 and "may not patch runs.kubetask.dev" in denied.value.message
    await viewer.aclose()


# ---- credentials and discovery ------------------------------------------------------------


def _admin_kubeconfig(cluster: Stack) -> dict[str, Any]:
    return yaml.safe_load(Path(cluster.kubeconfig).read_text())  # type: ignore[no-any-return]


def _token_kubeconfig(cluster: Stack, tmp_path: Path, token: str, ns: str) -> str:
    """A kubeconfig of the same cluster whose user is a bearer token."""
    admin = _admin_kubeconfig(cluster)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [
            {
                "name": "sa",
                "context": {"cluster": admin["clusters"][0]["name"], "user": "sa", "namespace": ns},
            }
        ],
        "current-context": "sa",
    }
    path = tmp_path / "token.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return str(path)


async def test_discovery_order_from_the_environment(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "clusters": [{"name": "c", "cluster": {"server": "https://k8s.example:6443"}}],
                "users": [{"name": "u", "user": {"tokenFile": "tok"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "shop"}}],
                "current-context": "x",
            }
        )
    )
    (tmp_path / "tok").write_text("file-token\n")
    env = {"KUBECONFIG": str(kubeconfig)}
    # The environment's URL and token win over the kubeconfig.
    conn = credentials.discover(env={**env, "KUBETASK_API_URL": "http://api:8080/", "KUBETASK_TOKEN": "t"})
    assert (conn.base_url, conn.token.get(), conn.proxied) == ("http://api:8080", "t", False)
    assert conn.headers("t") == {"Authorization": "Bearer t", "X-Kubetask-Token": "t"}
    # Explicit arguments win over the environment.
    conn = credentials.discover(api_url="http://mine", token="m", env={**env, "KUBETASK_TOKEN": "t"})
    assert (conn.base_url, conn.token.get()) == ("http://mine", "m")
    # The kubeconfig: its token (a tokenFile relative to the file), its namespace, the proxy.
    conn = credentials.discover(env=env)
    assert conn.token.get() == "file-token" and conn.namespace == "shop" and conn.proxied
    assert conn.base_url == (
        "https://k8s.example:6443/api/v1/namespaces/kubetask-system/services/http:kubetask-api:8080/proxy"
    )
    assert conn.headers("file-token") == {
        "Authorization": "Bearer file-token",
        "X-Kubetask-Token": "file-token",
    }
    conn = credentials.discover(
        env={**env, "KUBETASK_API_SERVICE": "ops/api:9000", "KUBETASK_NAMESPACE": "n"}
    )
    assert (
        conn.base_url.endswith("/api/v1/namespaces/ops/services/http:api:9000/proxy")
        and conn.namespace == "n"
    )
    # In an attempt pod KUBETASK_API_URL is the runner listener's: not used for /api/v1.
    conn = credentials.discover(
        env={
            **env,
            "KUBETASK_API_URL": "http://runner:8081",
            "KUBETASK_TOKEN_FILE": "/x",
            "KUBETASK_TOKEN": "t",
        }
    )
    assert conn.proxied
    with pytest.raises(credentials.CredentialsError, match="KUBETASK_API_SERVICE"):
        credentials.discover(env={**env, "KUBETASK_API_SERVICE": "nope"})
    with pytest.raises(credentials.CredentialsError, match="no kubeconfig"):
        credentials.discover(env={"KUBECONFIG": str(tmp_path / "missing")})
    with pytest.raises(ApiError, match="no kubeconfig") as e:
        Client(kubeconfig=str(tmp_path / "missing"))
    assert e.value.code == "no_credentials"


async def test_a_kubeconfig_token_is_sent_as_is(
    api: Api, world: World, cluster: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("KUBETASK_API_URL", "KUBETASK_TOKEN", "KUBETASK_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    path = _token_kubeconfig(cluster, tmp_path, world.dev, world.ns)
    client = Client(api.url, kubeconfig=path)
    assert client.namespace == world.ns  # the context's
    made = await in_thread(client.tasks.trigger, "hello", {"from": "kubeconfig"})
    run = run_resource(cluster, world.ns, made.name)
    assert run["metadata"]["annotations"][TRIGGERED_BY] == f"system:serviceaccount:{world.ns}:dev"
    client.close()


@contextlib.contextmanager
def _forwarder(cluster: Stack, ns: str, port: int) -> Iterator[str]:
    """A Service ``kubetask-api-<random>`` in ``ns`` whose pod forwards TCP to this host's ``port``
    (where the test's API listens): the API server's service proxy reaches the test's API
    as it reaches the operator's in a real install. Yields ``ns/name:8080``."""
    script = (
        "import asyncio\n"
        "async def pipe(r, w):\n"
        "    try:\n"
        "        while data := await r.read(65536):\n"
        "            w.write(data); await w.drain()\n"
        "    finally:\n"
        "        w.close()\n"
        "async def handle(r, w):\n"
        f"    tr, tw = await asyncio.open_connection({HOST_IP!r}, {port})\n"
        "    await asyncio.gather(pipe(r, tw), pipe(tr, w), return_exceptions=True)\n"
        "async def main():\n"
        "    server = await asyncio.start_server(handle, '0.0.0.0', 8080)\n"
        "    async with server:\n"
        "        await server.serve_forever()\n"
        "asyncio.run(main())\n"
    )
    name = f"kubetask-api-{secrets.token_hex(3)}"
    labels = {"app": name}
    cluster.core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
                "containers": [
                    {
                        "name": "main",
                        "image": hack("print.sh", "runner-image"),
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["python", "-c", script],
                        "ports": [{"containerPort": 8080}],
                        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                    }
                ],
            },
        },
    )
    cluster.core.create_namespaced_service(
        ns,
        {
            "metadata": {"name": name},
            "spec": {"selector": labels, "ports": [{"name": "http", "port": 8080, "targetPort": 8080}]},
        },
    )
    try:
        yield f"{ns}/{name}:8080"
    finally:
        with contextlib.suppress(ApiException):
            cluster.core.delete_namespaced_service(name, ns)
        with contextlib.suppress(ApiException):
            cluster.core.delete_namespaced_pod(name, ns, grace_period_seconds=0)


def _admin_http(cluster: Stack) -> tuple[str, httpx.Client]:
    """The admin kubeconfig's server and an HTTP client with its TLS (client certificate)."""
    kube = credentials.load_kubeconfig(cluster.kubeconfig)
    assert kube is not None and kube.has_client_certificate() and kube.bearer() is None
    return kube.server, httpx.Client(verify=kube.ssl_context(), timeout=10)


def _wait_proxy(cluster: Stack, service: str) -> None:
    ns, rest = service.split("/")
    name, port = rest.split(":")
    server, http = _admin_http(cluster)
    url = f"{server}/api/v1/namespaces/{ns}/services/http:{name}:{port}/proxy/healthz"
    deadline = time.monotonic() + 120
    last = ""
    with http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                response = http.get(url)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:200]}"
            time.sleep(0.5)
    raise AssertionError(f"the service proxy never reached the test's API: {last}")


async def test_the_service_proxy_strips_authorization_and_x_kubetask_token_gets_through(
    api: Api, world: World, cluster: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("KUBETASK_API_URL", "KUBETASK_TOKEN", "KUBETASK_NAMESPACE", "KUBETASK_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    with _forwarder(cluster, world.ns, api.port) as service:
        await asyncio.to_thread(_wait_proxy, cluster, service)
        monkeypatch.setenv("KUBETASK_API_SERVICE", service)

        # What the API server does: it authenticates the request (the admin's client
        # certificate) and removes Authorization before proxying it.
        server, http = _admin_http(cluster)
        ns, name = service.removesuffix(":8080").split("/")
        url = f"{server}/api/v1/namespaces/{ns}/services/http:{name}:8080/proxy/api/v1/namespaces/{ns}/tasks"
        with http:
            stripped = await asyncio.to_thread(
                http.get, url, headers={"Authorization": f"Bearer {world.dev}"}
            )
            assert stripped.status_code == 401 and stripped.json()["error"]["code"] == "missing_token"
            through = await asyncio.to_thread(http.get, url, headers={"X-Kubetask-Token": world.dev})
            assert through.status_code == 200, through.text

        # A kubeconfig with a token: it authenticates to the API server (which needs `get
        # services/proxy`) and, as X-Kubetask-Token, to kubetask.
        path = _token_kubeconfig(cluster, tmp_path, world.dev, world.ns)
        _wait_allowed(world.ns, "dev", "get", "services", group="", subresource="proxy")
        client = Client(kubeconfig=path)
        assert client.api_url.endswith(f"/api/v1/namespaces/{world.ns}/services/http:{name}:8080/proxy")
        made = await in_thread(client.tasks.trigger, "hello", {"via": "proxy"})
        assert (await in_thread(client.runs.retrieve, made.id)).payload == {"via": "proxy"}
        client.close()

        # Without `get services/proxy` the API server refuses, and the error says what is missing.
        viewer = Client(kubeconfig=_token_kubeconfig(cluster, tmp_path, world.viewer, world.ns))
        with pytest.raises(ApiError) as denied:
            await in_thread(viewer.runs.retrieve, made.id)
        assert denied.value.status == 403 and "services/proxy" in denied.value.message
        viewer.close()


async def test_a_client_certificate_kubeconfig_mints_a_service_account_token(
    api: Api, world: World, cluster: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local admin kubeconfig holds a client certificate: the client mints a token of
    the admin ServiceAccount (here a scratch one, as the chart's would be) and reaches the
    API through the service proxy."""
    for name in ("KUBETASK_API_URL", "KUBETASK_TOKEN", "KUBETASK_NAMESPACE", "KUBETASK_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig)
    with (
        namespace(cluster, "it-client-admin", label="kubetask.dev/integration") as admin_ns,
        service_account_token(cluster, admin_ns, "kubetask-admin", cluster_rules=ALL_KUBETASK),
        _forwarder(cluster, world.ns, api.port) as service,
    ):
        _wait_allowed(admin_ns, "kubetask-admin", "create", "runs")
        await asyncio.to_thread(_wait_proxy, cluster, service)
        monkeypatch.setenv("KUBETASK_API_SERVICE", service)
        monkeypatch.setenv("KUBETASK_SERVICE_ACCOUNT", f"{admin_ns}/kubetask-admin")
        credentials._MINTED.clear()
        async with AsyncClient(namespace=world.ns) as client:
            assert client._conn.proxied and isinstance(client._conn.token, credentials.MintedToken)
            made = await client.tasks.trigger("hello", {"who": "admin"})
            run = run_resource(cluster, world.ns, made.name)
            assert (
                run["metadata"]["annotations"][TRIGGERED_BY]
                == f"system:serviceaccount:{admin_ns}:kubetask-admin"
            )
            minted = client._conn.token.cached()
            assert minted is not None
            claims = minted.split(".")[1]
            exp = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["exp"]
            assert 3000 < exp - time.time() <= 3600  # an hour
        # Cached in memory: a second client of this process reuses the token.
        sync = Client(namespace=world.ns)
        assert sync._conn.token.cached() == minted
        assert made.id in {
            r.id for r in await in_thread(lambda: list(sync.runs.list("hello", namespace=world.ns)))
        }
        sync.close()

        # A ServiceAccount that does not exist: the message says what to do.
        credentials._MINTED.clear()
        monkeypatch.setenv("KUBETASK_SERVICE_ACCOUNT", f"{admin_ns}/nobody")
        with pytest.raises(ApiError, match=r"adminServiceAccount.create=true") as missing:
            await in_thread(Client(namespace=world.ns).tasks.list)
        assert missing.value.code == "no_credentials"


async def test_the_sdk_client_needs_no_operator_dependencies() -> None:
    import subprocess

    code = (
        "import sys, kubetask\n"
        "from kubetask import Client, AsyncClient, ApiError\n"
        "import kubetask.sdk.credentials\n"
        "heavy = {'kopf', 'sqlalchemy', 'aiohttp', 'kubernetes', 'kubernetes_asyncio', 'psycopg'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
