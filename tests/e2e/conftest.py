"""Fixtures of the end-to-end tests: the real local stack (cluster, PostgreSQL, images),
started when missing; or the cluster KUBECONFIG points at (kind, say)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.databases import scratch_database
from tests.e2e.harness import (
    READER_RULES,
    HeldPort,
    Operator,
    Stack,
    ensure_crds,
    hack,
    hack_verbose,
    install_crds,
    namespace,
    service_account_token,
)

pytestmark = pytest.mark.e2e


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def stack() -> Stack:
    user_cluster = os.environ.get("KUBECONFIG")
    if not user_cluster:
        hack_verbose("cluster-up.sh")
    hack_verbose("db.sh", "up")
    hack_verbose("images.sh", "all")
    kubeconfig = user_cluster or hack("print.sh", "kubeconfig")
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    install_crds(kubeconfig)
    # An operator installed in the cluster would act on the tests' Runs too: pause it.
    subprocess.run(
        ["kubectl", "-n", "kubetask-system", "scale", "deployment/kubetask-operator", "--replicas=0"],
        env=env,
        capture_output=True,
    )
    # ... and wait until its pod is really gone (scaling down is asynchronous).
    subprocess.run(
        [
            "kubectl",
            "-n",
            "kubetask-system",
            "wait",
            "--for=delete",
            "pod",
            "-l",
            "app.kubernetes.io/name=kubetask,app.kubernetes.io/component=operator",
            "--timeout=90s",
        ],
        env=env,
        capture_output=True,
    )
    return Stack(
        kubeconfig=kubeconfig,
        runner_image=os.environ.get("KUBETASK_RUNNER_IMAGE") or hack("print.sh", "runner-image"),
        database_url=hack("print.sh", "database-url"),
        host_ip=os.environ.get("KUBETASK_TEST_HOST_IP", "10.88.0.1"),
    )


@pytest.fixture(scope="session")
def e2e_database(stack: Stack) -> Iterator[str]:
    """A fresh database for this session's operators (they migrate it), dropped at the end."""
    with scratch_database(stack.database_url, "kubetask_e2e", migrate=False) as url:
        yield url


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = Path(os.environ.get("KUBETASK_TEST_LOGS", str(tmp_path_factory.mktemp("logs"))))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def ns(stack: Stack, request: pytest.FixtureRequest) -> Iterator[str]:
    prefix = "e2e-" + request.node.name.replace("_", "-").lower()[5:24].strip("-")
    ensure_crds(stack.kubeconfig)
    with namespace(stack, prefix) as name:
        yield name


@pytest.fixture(scope="session")
def api_token(stack: Stack) -> Iterator[str]:
    """A token that may read every kubetask resource in the cluster, for the public API
    (:meth:`Operator.get`): a ServiceAccount bound to a ClusterRole, token from TokenRequest."""
    with (
        namespace(stack, "e2e-api-reader") as ns,
        service_account_token(stack, ns, "reader", cluster_rules=READER_RULES) as token,
    ):
        yield token


@pytest.fixture
def start_operator(
    stack: Stack, e2e_database: str, log_dir: Path, ns: str, api_token: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Operator]]:
    started: list[Operator] = []
    ports = HeldPort(), HeldPort()
    port, runner_port = (held.port for held in ports)

    def start(
        name: str = "op",
        *,
        namespaces: list[str] | None = None,
        own_port: bool = False,
        wait_ready: bool = True,
        **env: str,
    ) -> Operator:
        """An operator for this test's namespace (or ``namespaces``). Operators of one test
        share the API ports (public and runner), as replicas behind a Service do (they bind
        them with SO_REUSEPORT, KUBETASK_API_SHARE_PORT, so two can run at once); ``own_port``
        gives one ports of its own. No other test's operator is given them (HeldPort)."""
        op = Operator(
            stack,
            database_url=e2e_database,
            namespaces=namespaces or [ns],
            log_dir=log_dir,
            name=name,
            env=env,
            port=None if own_port else port,
            runner_port=None if own_port else runner_port,
            token=api_token,
        )
        started.append(op)
        return op.start(wait_ready=wait_ready)

    yield start
    failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else False
    for op in started:
        op.stop()
        op.release_ports()
        if failed:
            print(f"--- operator {op.log_path} ---\n{op.log_tail(120)}")
    for held in ports:
        held.release()


@pytest.fixture
def operator(start_operator: Callable[..., Operator]) -> Operator:
    return start_operator()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
