"""The fault-injection tools themselves (tests/faults), against the real PostgreSQL and
the real kube-apiserver: each fault looks to a client the way the real failure does."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes_asyncio import client as async_client
from kubernetes_asyncio import config as async_config
from sqlalchemy.engine import make_url
from urllib3.exceptions import HTTPError

from tests.e2e.conftest import wait_for
from tests.e2e.harness import Stack
from tests.faults import KubeApiProxy, TcpProxy

# ---- PostgreSQL behind TcpProxy ------------------------------------------------------------


@pytest.fixture
def db_proxy(stack: Stack) -> Iterator[TcpProxy]:
    url = make_url(stack.database_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        yield proxy


def connect(proxy: TcpProxy, stack: Stack, timeout: int = 2) -> psycopg.Connection[Any]:
    """A psycopg connection through the proxy (libpq's URL: no ``+psycopg`` driver suffix)."""
    url = make_url(proxy.url_for(stack.database_url)).set(drivername="postgresql")
    return psycopg.connect(
        url.render_as_string(hide_password=False), connect_timeout=timeout, autocommit=True
    )


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Run ``fn`` in a daemon thread; the list gets its result or its exception."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as e:
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_tcp_proxy_forwards_queries_and_counts(db_proxy: TcpProxy, stack: Stack) -> None:
    with connect(db_proxy, stack) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    stats = db_proxy.stats()
    assert stats.accepted == 1
    assert stats.bytes_to_server > 0 and stats.bytes_to_client > 0
    assert stats.bytes_forwarded == stats.bytes_to_server + stats.bytes_to_client
    assert db_proxy.url_for("postgresql+psycopg://u:p@10.0.0.1:5432/db") == (
        f"postgresql+psycopg://u:p@127.0.0.1:{db_proxy.port}/db"
    )


def test_tcp_reject_fails_queries_and_connects_fast_until_heal(db_proxy: TcpProxy, stack: Stack) -> None:
    conn = connect(db_proxy, stack)
    conn.execute("select 1")
    db_proxy.reject()
    start = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        conn.execute("select 1")
    with pytest.raises(psycopg.OperationalError):
        connect(db_proxy, stack)
    assert time.monotonic() - start < 1.0
    assert db_proxy.stats().rejected >= 1
    db_proxy.heal()
    with connect(db_proxy, stack) as again:
        assert again.execute("select 2").fetchone() == (2,)


def test_tcp_blackhole_times_out_and_heal_resets_held_connections(db_proxy: TcpProxy, stack: Stack) -> None:
    held = connect(db_proxy, stack)
    held.execute("select 1")
    db_proxy.blackhole()
    start = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        connect(db_proxy, stack, timeout=2)  # accepted, then silence: libpq's connect timeout
    assert 1.5 < time.monotonic() - start < 5
    query, result = in_thread(lambda: held.execute("select 1").fetchone())
    query.join(1.0)
    assert query.is_alive(), f"a query got through the blackhole: {result}"
    db_proxy.heal()
    query.join(5)
    assert len(result) == 1 and isinstance(result[0], psycopg.OperationalError)
    with connect(db_proxy, stack) as again:
        assert again.execute("select 3").fetchone() == (3,)


def test_tcp_heal_with_resume_delivers_what_was_held(db_proxy: TcpProxy, stack: Stack) -> None:
    with connect(db_proxy, stack) as held:
        held.execute("select 1")
        db_proxy.blackhole()
        query, result = in_thread(lambda: held.execute("select 4").fetchone())
        query.join(0.5)
        assert query.is_alive()
        db_proxy.heal(resume=True)
        query.join(5)
        assert result == [(4,)]


# ---- the kube-apiserver behind KubeApiProxy ------------------------------------------------------


@pytest.fixture
def kube_proxy(stack: Stack) -> Iterator[KubeApiProxy]:
    with KubeApiProxy(stack.kubeconfig) as proxy:
        yield proxy


@pytest.fixture
def core(kube_proxy: KubeApiProxy, tmp_path: Path) -> Iterator[Any]:
    """A CoreV1Api that talks through the proxy, with the kubeconfig an operator would get."""
    cfg = client.Configuration()
    path = kube_proxy.write_kubeconfig(tmp_path / "kubeconfig")
    config.load_kube_config(config_file=str(path), client_configuration=cfg)
    cfg.retries = False  # a timed-out request raises at once instead of being retried
    api = client.ApiClient(cfg)
    yield client.CoreV1Api(api)
    api.close()


def test_kube_proxy_lists_namespaces(kube_proxy: KubeApiProxy, core: Any) -> None:
    names = {n.metadata.name for n in core.list_namespace().items}
    assert {"default", "kube-system"} <= names
    assert [r.status for r in kube_proxy.requests(method="GET", path_regex="^/api/v1/namespaces$")] == [200]


async def test_kubernetes_asyncio_accepts_the_proxy_kubeconfig(
    kube_proxy: KubeApiProxy, tmp_path: Path
) -> None:
    cfg = async_client.Configuration()
    path = kube_proxy.write_kubeconfig(tmp_path / "kubeconfig")
    await async_config.load_kube_config(config_file=str(path), client_configuration=cfg)
    async with async_client.ApiClient(cfg) as api:
        namespaces = await async_client.CoreV1Api(api).list_namespace()
    assert "default" in {n.metadata.name for n in namespaces.items}


def test_fail_answers_one_create_with_503_status(
    kube_proxy: KubeApiProxy, core: Any, stack: Stack, ns: str
) -> None:
    kube_proxy.fail(method="POST", path_regex="/configmaps$", times=1)
    body = {"metadata": {"name": "once"}, "data": {"k": "v"}}
    with pytest.raises(ApiException) as failed:
        core.create_namespaced_config_map(ns, body)
    assert failed.value.status == 503
    status = json.loads(failed.value.body)
    assert (status["kind"], status["status"], status["reason"], status["code"]) == (
        "Status",
        "Failure",
        "ServiceUnavailable",
        503,
    )
    core.create_namespaced_config_map(ns, body)  # the retry goes through
    posts = kube_proxy.requests(method="POST", path_regex="/configmaps")
    assert [(r.status, r.fault) for r in posts] == [(503, "fail"), (201, None)]
    assert stack.core.read_namespaced_config_map("once", ns).data == {"k": "v"}


def test_watch_through_the_proxy_streams_events_as_they_happen(
    kube_proxy: KubeApiProxy, core: Any, stack: Stack, ns: str
) -> None:
    rv = core.list_namespaced_config_map(ns).metadata.resource_version

    def create_once_watching() -> None:
        # Created only once the watch stream is open, so the event comes live, not replayed.
        wait_for(lambda: any(r.status == 200 for r in kube_proxy.requests(watch=True)), 10, "the watch")
        stack.core.create_namespaced_config_map(ns, {"metadata": {"name": "live"}})

    creator, _ = in_thread(create_once_watching)
    w = watch.Watch()
    for event in w.stream(core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=20):
        if event["object"].metadata.name == "live":
            assert event["type"] == "ADDED"
            w.stop()
    creator.join(10)
    assert [r.status for r in kube_proxy.requests(watch=True)] == [200]


def test_expire_watches_sends_410_and_refuses_the_old_version_once(
    kube_proxy: KubeApiProxy, core: Any, stack: Stack, ns: str
) -> None:
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    stack.core.create_namespaced_config_map(ns, {"metadata": {"name": "before"}})
    # No timeout_seconds: the client then re-watches once from its last version after a 410,
    # and raises only when that is refused too.
    seen: list[tuple[str, str]] = []
    with pytest.raises(ApiException) as gone:
        for event in watch.Watch().stream(
            core.list_namespaced_config_map, ns, resource_version=rv, _request_timeout=20
        ):
            seen.append((event["type"], event["object"].metadata.name))
            if event["object"].metadata.name == "before":
                assert kube_proxy.expire_watches() == 1
    assert gone.value.status == 410
    assert ("ADDED", "before") in seen
    assert [r.fault for r in kube_proxy.requests(watch=True)] == [None, "gone"]
    # Relisted, the client watches from a fresh version, and that works.
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    stack.core.create_namespaced_config_map(ns, {"metadata": {"name": "after"}})
    w = watch.Watch()
    for event in w.stream(core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=20):
        assert (event["type"], event["object"].metadata.name) == ("ADDED", "after")
        w.stop()


def test_pause_stalls_requests_until_resume(kube_proxy: KubeApiProxy, core: Any) -> None:
    kube_proxy.pause()
    start = time.monotonic()
    with pytest.raises(HTTPError):  # urllib3's read timeout
        core.list_namespace(_request_timeout=1)
    assert time.monotonic() - start < 3
    kube_proxy.resume()
    assert core.list_namespace(_request_timeout=5).items


def test_hang_withholds_answers_and_applied_creates_still_happen(
    kube_proxy: KubeApiProxy, core: Any, stack: Stack, ns: str
) -> None:
    # The classic: the create succeeded, the client timed out, its retry finds it there.
    kube_proxy.hang(method="POST", path_regex="/configmaps$", times=1, applied=True)
    body = {"metadata": {"name": "applied"}}
    with pytest.raises(HTTPError):
        core.create_namespaced_config_map(ns, body, _request_timeout=1)
    with pytest.raises(ApiException) as again:
        core.create_namespaced_config_map(ns, body, _request_timeout=5)
    assert again.value.status == 409
    # A plain hang: the request never reaches the server.
    kube_proxy.hang(method="POST", path_regex="/configmaps$", times=1)
    with pytest.raises(HTTPError):
        core.create_namespaced_config_map(ns, {"metadata": {"name": "held"}}, _request_timeout=1)
    # Neither client got an answer, though the server did answer the first.
    assert [r.status for r in kube_proxy.requests(method="POST", fault="hang")] == [None, None]
    names = {c.metadata.name for c in stack.core.list_namespaced_config_map(ns).items}
    assert "applied" in names and "held" not in names
