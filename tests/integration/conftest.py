"""Fixtures of the tests that need PostgreSQL (marker ``db``), and, for the public API's
tests, the cluster (its API server answers TokenReviews and SubjectAccessReviews).

``database_url`` is the server to use: env ``KUBETASK_TEST_DATABASE_URL``, or the local
stack's database (``make db-up``; started with ``bash hack/db.sh up`` when it does not
answer). Each test session gets its own database, ``kubetask_test_<random>``, created
through that URL's connection, migrated, and dropped at the end.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from kubernetes_asyncio import config as kube_config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from kubetask.kube import Kube
from kubetask.store import db
from tests.databases import scratch_database
from tests.e2e.harness import (
    READER_RULES,
    Stack,
    hack,
    hack_verbose,
    install_crds,
    namespace,
    service_account_token,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATABASE_URL = "postgresql+psycopg://kubetask:kubetask@127.0.0.1:54329/kubetask"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "db: needs PostgreSQL (started by the fixtures when missing)")


def _answers(url: str) -> str | None:
    """None if PostgreSQL at ``url`` answers, else why not."""
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except OperationalError as e:
        return str(e.orig or e).strip()
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def database_url() -> str:
    """URL of a PostgreSQL server and a database on it the tests may create databases from."""
    url = os.environ.get("KUBETASK_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    why = _answers(url)
    if why is None:
        return url
    script = REPO_ROOT / "hack" / "db.sh"
    if not script.exists():
        pytest.fail(
            f"PostgreSQL at {make_url(url).render_as_string()} does not answer ({why}) and hack/db.sh "
            "is missing; start PostgreSQL and point KUBETASK_TEST_DATABASE_URL at it"
        )
    subprocess.run(["bash", str(script), "up"], cwd=REPO_ROOT, check=True)
    deadline = time.monotonic() + 60
    while (why := _answers(url)) is not None and time.monotonic() < deadline:
        time.sleep(1)
    if why is not None:
        pytest.fail(f"PostgreSQL at {make_url(url).render_as_string()} still does not answer: {why}")
    return url


@pytest.fixture(scope="session")
def test_database_url(database_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test session (dropped at the end)."""
    with scratch_database(database_url, "kubetask_test") as url:
        yield url


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def sessions(test_database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_async_engine(test_database_url, pool_size=5)
    try:
        yield db.session_factory(engine)
    finally:
        await engine.dispose()


# ---- the cluster (the public API's tests: TokenReview and SubjectAccessReview are real) ---


@pytest.fixture(scope="session")
def cluster() -> Stack:
    """The local cluster (started when missing), or the one KUBECONFIG points at, with the
    CRDs installed. Only the public API's tests use it; nothing is scaled or paused."""
    kubeconfig = os.environ.get("KUBECONFIG")
    if not kubeconfig:
        hack_verbose("cluster-up.sh")
        kubeconfig = hack("print.sh", "kubeconfig")
    install_crds(kubeconfig)
    return Stack(kubeconfig=kubeconfig, runner_image="", database_url="", host_ip="127.0.0.1")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def kube(cluster: Stack) -> AsyncIterator[Kube]:
    """The operator's Kubernetes client (kubernetes_asyncio), as the admin of the cluster."""
    await kube_config.load_kube_config(config_file=cluster.kubeconfig)
    k = Kube()
    try:
        yield k
    finally:
        await k.close()


@pytest.fixture(scope="session")
def reader_token(cluster: Stack) -> Iterator[str]:
    """A token that may read every kubetask resource in the cluster (get, list)."""
    with (
        namespace(cluster, "it-api-reader", label="kubetask.dev/integration") as ns,
        service_account_token(cluster, ns, "reader", cluster_rules=READER_RULES) as token,
    ):
        yield token
