"""Real faults while runs are in flight: every run still ends, no limit is exceeded, no
attempt has two pods, no slot or token Secret is left behind.

The operator under test talks to the real API server through a fault-injecting HTTP
proxy and to the real PostgreSQL through a fault-injecting TCP proxy (tests/faults);
the API server pause is a SIGSTOP of the real kube-apiserver process."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

from tests.e2e.conftest import wait_for
from tests.e2e.harness import Operator, PodWatcher, Stack, api_server_timing
from tests.e2e.test_control_loop import assert_one_pod_per_attempt, token_secrets
from tests.faults.kubeapi import KubeApiProxy
from tests.faults.tcp import TcpProxy

pytestmark = pytest.mark.e2e

LIMIT = 2
SLEEPER = {
    "source": "from kubetask import task\nimport time\n\n@task(id='sleeper')\n"
    "def f(payload, ctx):\n    time.sleep(payload.get('s', 1))\n    return payload.get('s')\n",
    "queue": {"concurrencyLimit": LIMIT},
    "retry": {"maxAttempts": 3, "minTimeoutMs": 300, "maxTimeoutMs": 2000},
}
#: Faults are retried quickly: a stuck reconcile is cut after 5 s, the resync runs every 5 s.
FAST = {"KUBETASK_WORK_TIMEOUT_SECONDS": "5"}


@pytest.fixture
def kube_proxy(
    stack: Stack, ns: str, tmp_path: Path, start_operator: Callable[..., Operator]
) -> Iterator[KubeApiProxy]:
    """The sleeper Task, and an operator that reaches the API server through the proxy."""
    with KubeApiProxy(stack.kubeconfig) as proxy:
        stack.apply_task(ns, "sleeper", SLEEPER)
        start_operator(KUBECONFIG=str(proxy.write_kubeconfig(tmp_path / "kubeconfig")), **FAST)
        yield proxy


@pytest.fixture
def db_proxy(stack: Stack) -> Iterator[TcpProxy]:
    url = make_url(stack.database_url)
    assert url.host and url.port
    with TcpProxy(url.host, url.port) as proxy:
        yield proxy


def leftovers(e2e_database: str, ns: str) -> dict[str, int]:
    """What the database still holds for the namespace's queues: slots, live attempts."""
    engine = create_engine(e2e_database, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            slots = conn.execute(
                text("SELECT count(*) FROM slots WHERE queue LIKE :q"), {"q": f"{ns}/%"}
            ).scalar()
            running = conn.execute(
                text("SELECT coalesce(sum(running), 0) FROM queues WHERE name LIKE :q"), {"q": f"{ns}/%"}
            ).scalar()
            live = conn.execute(
                text(
                    "SELECT count(*) FROM attempts a JOIN runs r ON r.id = a.run_id "
                    "WHERE r.namespace = :ns AND a.finished_at IS NULL"
                ),
                {"ns": ns},
            ).scalar()
    finally:
        engine.dispose()
    return {"slots": int(slots or 0), "running": int(running or 0), "live_attempts": int(live or 0)}


def burst(stack: Stack, ns: str, n: int, seconds: float) -> list[str]:
    return [stack.create_run(ns, "sleeper", payload={"s": seconds}) for _ in range(n)]


def settle(stack: Stack, ns: str, names: list[str], watcher: PodWatcher, e2e_database: str) -> dict[str, Any]:
    done = stack.wait_all(ns, names, timeout=300)
    wait_for(lambda: token_secrets(stack, ns) == [], 60, "every token Secret to be deleted")
    wait_for(lambda: not stack.pods(ns), 60, "every attempt pod to be deleted")
    assert {r["status"]["phase"] for r in done.values()} == {"Succeeded"}, {
        n: (r["status"]["phase"], r["status"]["message"]) for n, r in done.items()
    }
    assert watcher.max_alive.get("sleeper", 0) <= LIMIT, watcher.max_alive
    assert_one_pod_per_attempt(watcher)
    assert leftovers(e2e_database, ns) == {"slots": 0, "running": 0, "live_attempts": 0}
    return done


def test_api_server_errors_and_timeouts_on_create(
    stack: Stack, ns: str, e2e_database: str, kube_proxy: KubeApiProxy
) -> None:
    proxy = kube_proxy
    # 503s on the first creates of token Secrets and pods, then a pod create that the
    # API server performs but whose answer never comes (the client times out on a
    # create that succeeded: the retry's 409 must be recognised as this Run's pod).
    proxy.fail("POST", r"/namespaces/[^/]+/secrets$", status=503, times=3)
    proxy.fail("POST", r"/namespaces/[^/]+/pods$", status=500, times=2)
    proxy.hang("POST", r"/namespaces/[^/]+/pods$", times=1, applied=True)
    with PodWatcher(stack, ns) as watcher:
        names = burst(stack, ns, 6, 1)
        wait_for(lambda: len(proxy.requests("POST", r"/pods$", fault="hang")) == 1, 60, "the held create")
        time.sleep(6)  # the operator's reconcile gives up on the held create; it answers now
        proxy.clear()
        done = settle(stack, ns, names, watcher, e2e_database)
    assert len(proxy.requests("POST", r"/secrets$", fault="fail")) == 3
    assert len(proxy.requests("POST", r"/pods$", fault="fail")) == 2
    # Every run ran once: the faults cost time, never an attempt.
    assert all(len(r["status"]["attempts"]) == 1 for r in done.values())


@pytest.mark.parametrize("fault", ["reject", "blackhole"])
def test_postgresql_unreachable_for_twenty_seconds(
    stack: Stack,
    ns: str,
    e2e_database: str,
    start_operator: Callable[..., Operator],
    db_proxy: TcpProxy,
    fault: str,
) -> None:
    stack.apply_task(ns, "sleeper", SLEEPER)
    start_operator(KUBETASK_DATABASE_URL=db_proxy.url_for(e2e_database), **FAST)
    with PodWatcher(stack, ns) as watcher:
        names = burst(stack, ns, 6, 4)
        wait_for(lambda: len(watcher.first_created()) >= LIMIT, 90, "the first pods")
        getattr(db_proxy, fault)()
        time.sleep(20)  # pods end, runners cannot report, new Runs arrive: all while it is down
        names += burst(stack, ns, 2, 1)
        db_proxy.heal()
        done = settle(stack, ns, names, watcher, e2e_database)
    # The runners waited for the API (which waited for the database): nothing ran twice.
    assert all(len(r["status"]["attempts"]) == 1 for r in done.values()), {
        n: [a["reason"] for a in r["status"]["attempts"]] for n, r in done.items()
    }


def apiserver_pid() -> int:
    pid_file = (
        Path(os.environ.get("KUBETASK_STATE", "/var/lib/kubetask-local")) / "pids" / "kube-apiserver.pid"
    )
    if os.environ.get("KUBECONFIG") or not pid_file.exists():
        pytest.skip("needs the local stack's kube-apiserver process (not a kind or remote cluster)")
    return int(pid_file.read_text().strip())


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The kube-apiserver (``pid``) frozen, while no test of the other lane measures timing
    through it (:func:`api_server_timing`)."""
    with api_server_timing(freeze=True):
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)


def test_the_api_server_stopped_for_ten_seconds(
    stack: Stack, ns: str, e2e_database: str, start_operator: Callable[..., Operator]
) -> None:
    pid = apiserver_pid()
    stack.apply_task(ns, "sleeper", SLEEPER)
    start_operator(**FAST)
    with PodWatcher(stack, ns) as watcher:
        names = burst(stack, ns, 6, 3)
        wait_for(lambda: len(watcher.first_created()) >= LIMIT, 90, "the first pods")
        with stopped(pid):
            time.sleep(10)  # SIGSTOP: every client of the cluster (kubelet, operator) stalls
        done = settle(stack, ns, names, watcher, e2e_database)
    assert all(len(r["status"]["attempts"]) == 1 for r in done.values())


def test_the_pod_watch_expires_while_a_pod_disappears(
    stack: Stack, ns: str, e2e_database: str, kube_proxy: KubeApiProxy
) -> None:
    proxy = kube_proxy
    with PodWatcher(stack, ns) as watcher:
        names = burst(stack, ns, 3, 20)
        wait_for(lambda: len(watcher.alive) >= LIMIT, 90, "two running pods")
        victim = sorted(watcher.alive.values(), key=lambda lab: lab["kubetask.dev/run"])[0]
        victim_run = victim["kubetask.dev/run"]
        proxy.pause()  # the operator's watch sees nothing from now on...
        pod = next(p for p in stack.pods(ns) if p.metadata.labels["kubetask.dev/run"] == victim_run)
        stack.core.delete_namespaced_pod(pod.metadata.name, ns, grace_period_seconds=0)
        wait_for(lambda: all(p.metadata.uid != pod.metadata.uid for p in stack.pods(ns)), 30, "the pod to go")
        # ... and its watch expires (410, then 410 again for the stale re-watch): only a
        # relist can tell it that the pod is gone.
        proxy.expire_watches(r"/pods")
        proxy.resume()
        done = settle(stack, ns, names, watcher, e2e_database)
    reasons = {n: [a["reason"] for a in r["status"]["attempts"]] for n, r in done.items()}
    assert reasons[victim_run] == ["PodDeleted", "Succeeded"], reasons
    assert all(v == ["Succeeded"] for n, v in reasons.items() if n != victim_run), reasons
