"""Leader election against the real API server: electors with their own ApiClient each,
as if they were separate processes (one of them is one). Short timings (lease 2 s, renew
deadline 1.4 s, retry 0.3 s) unless a case needs otherwise. The assertions are the
election's guarantees, measured on this process's monotonic clock; only the upper bounds
on take-over times leave the machine slack."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from kubernetes_asyncio import client, config
from prometheus_client.parser import text_string_to_metric_families

from kubetask.control.leader import LeaderElector, LeaseSettings
from tests.e2e.conftest import wait_for
from tests.e2e.harness import Operator, Stack, api_server_timing
from tests.faults.kubeapi import KubeApiProxy


@pytest.fixture(autouse=True)
def _api_server_not_frozen() -> Iterator[None]:
    """These tests measure lease timings through the API server: the other lane of
    ``make test`` does not freeze it meanwhile."""
    with api_server_timing(freeze=False):
        yield


#: The timings of most cases (namespace and identity are set per replica).
SHORT = LeaseSettings(namespace="-", identity="-", lease_duration=2.0, renew_deadline=1.4, retry_period=0.3)


async def kube_config(stack: Stack) -> client.Configuration:
    cfg = client.Configuration()
    await config.load_kube_config(config_file=stack.kubeconfig, client_configuration=cfg)
    return cfg


async def api_client(stack: Stack, *, host: str | None = None) -> client.ApiClient:
    """An ApiClient of its own (its own connection pool), optionally through ``host``."""
    cfg = await kube_config(stack)
    if host:
        cfg.host = host
    return client.ApiClient(cfg)


@dataclass
class Replica:
    """One elector running in a task, and when (monotonic) its lead() started and was
    cancelled."""

    elector: LeaderElector
    run: asyncio.Task[None]
    started: list[float] = field(default_factory=list)
    stopped: list[float] = field(default_factory=list)

    @property
    def identity(self) -> str:
        return self.elector.settings.identity

    async def stop(self) -> None:
        self.run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.run


@contextlib.asynccontextmanager
async def replicas() -> AsyncIterator[Callable[..., Awaitable[Replica]]]:
    """``start(api, ns, identity, timings)`` starts a replica; all are stopped (their
    leases released) and their clients closed at the end."""
    started: list[tuple[Replica, client.ApiClient]] = []

    async def start(api: client.ApiClient, ns: str, identity: str, timings: LeaseSettings = SHORT) -> Replica:
        settings = dataclasses.replace(timings, namespace=ns, identity=identity)
        elector = LeaderElector(api_client=api, settings=settings)
        started_at: list[float] = []
        stopped_at: list[float] = []

        async def lead() -> None:
            started_at.append(time.monotonic())
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                stopped_at.append(time.monotonic())
                raise

        replica = Replica(elector, asyncio.create_task(elector.run(lead)), started_at, stopped_at)
        started.append((replica, api))
        return replica

    try:
        yield start
    finally:
        for replica, api in started:
            await replica.stop()
            await api.close()


async def until(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Samples:
    """is_leader of each replica, sampled every 50 ms: (monotonic time, [is_leader, ...])."""

    rows: list[tuple[float, list[bool]]] = field(default_factory=list)

    def both(self) -> list[float]:
        return [t for t, leading in self.rows if sum(leading) > 1]


@contextlib.asynccontextmanager
async def sampling(*of: Replica) -> AsyncIterator[Samples]:
    samples = Samples()

    async def sample() -> None:
        while True:
            samples.rows.append((time.monotonic(), [r.elector.is_leader for r in of]))
            await asyncio.sleep(0.05)

    task = asyncio.create_task(sample())
    try:
        yield samples
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def read_lease(stack: Stack, ns: str, name: str = "kubetask-operator") -> dict[str, Any]:
    """The Lease as ``kubectl get lease -o json`` shows it (in a thread: the electors run
    on this event loop meanwhile)."""
    out = await asyncio.to_thread(stack.kubectl, ns, "get", "lease", name, "-o", "json")
    assert out.returncode == 0, out.stderr
    lease: dict[str, Any] = json.loads(out.stdout)
    return lease


def overlapping(a: Replica, b: Replica) -> bool:
    """Whether a lead() of ``a`` and one of ``b`` ever ran at the same time."""

    def terms(r: Replica) -> list[tuple[float, float]]:
        ends = [*r.stopped, *[float("inf")] * (len(r.started) - len(r.stopped))]
        return list(zip(r.started, ends, strict=True))

    return any(s1 < e2 and s2 < e1 for s1, e1 in terms(a) for s2, e2 in terms(b))


class Partition:
    """A TCP forwarder to the API server that can black-hole all traffic (both ways, open
    connections and new ones alike): requests hang, as on a partitioned network."""

    def __init__(self, upstream: str) -> None:
        url = urlsplit(upstream)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 443
        self.frozen = False
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        # 127.0.0.1 is in the API server certificate: TLS is verified as usual.
        return f"https://127.0.0.1:{port}"

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if task := asyncio.current_task():
            self._handlers.add(task)
        if self.frozen:
            await self._pipe(reader, None)
            return
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers.append(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if writer is not None and not self.frozen:
                    writer.write(data)
                    await writer.drain()
        if writer is not None:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        # Closed connections end their handlers; left pending, the loop would cancel them
        # at its end, and asyncio would log that as an error.
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)


async def test_two_replicas_never_lead_at_once_and_the_lease_names_the_leader(stack: Stack, ns: str) -> None:
    async with replicas() as start:
        a = await start(await api_client(stack), ns, "replica-a")
        b = await start(await api_client(stack), ns, "replica-b")
        await until(lambda: a.elector.is_leader or b.elector.is_leader, 10, "a leader")
        async with sampling(a, b) as samples:
            await asyncio.sleep(4)
        leader, other = (a, b) if a.elector.is_leader else (b, a)

        assert not samples.both(), f"both replicas led at {samples.both()}"
        assert not overlapping(a, b)
        assert sum(leading.count(True) for _, leading in samples.rows) > 0.9 * len(samples.rows)
        assert leader.started and not other.started
        assert other.elector.holder == leader.identity
        lease = await read_lease(stack, ns)
        assert lease["spec"]["holderIdentity"] == leader.identity
        assert lease["spec"]["leaseDurationSeconds"] == 2
        assert lease["spec"]["leaseTransitions"] == 0  # created by its first holder
        # MicroTime, as client-go writes it: RFC 3339, UTC, microseconds.
        for key in ("acquireTime", "renewTime"):
            assert datetime.strptime(lease["spec"][key], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert lease["spec"]["renewTime"] > lease["spec"]["acquireTime"]


async def test_a_leader_shutting_down_releases_the_lease_and_the_other_takes_over_at_once(
    stack: Stack, ns: str
) -> None:
    # A longer lease than elsewhere, so that a take-over by expiry (>= 3.7 s) could not
    # pass for one after a release (about one retry period).
    timings = LeaseSettings(
        namespace="-", identity="-", lease_duration=4.0, renew_deadline=2.8, retry_period=0.3
    )
    async with replicas() as start:
        a = await start(await api_client(stack), ns, "replica-a", timings)
        await until(lambda: a.elector.is_leader, 10, "a to lead")
        b = await start(await api_client(stack), ns, "replica-b", timings)
        await until(lambda: b.elector.holder == a.identity, 10, "b to see a's lease")

        shutdown = time.monotonic()
        await a.stop()
        released = time.monotonic()
        assert not a.elector.is_leader
        assert a.elector.holder in ("", b.identity)
        await until(lambda: bool(b.started), 10, "b to lead")

        takeover = b.started[0] - shutdown
        print(
            f"\ngraceful take-over: {takeover:.2f}s after run() was cancelled (release took {released - shutdown:.2f}s)"
        )
        assert a.stopped[0] < released <= b.started[0]
        assert takeover < timings.lease_duration / 2
        lease = await read_lease(stack, ns)
        assert lease["spec"]["holderIdentity"] == b.identity
        assert lease["spec"]["leaseTransitions"] == 1
        assert lease["spec"]["leaseDurationSeconds"] == 4
        assert b.elector.leader_transitions == 1


async def test_a_partitioned_leader_stops_before_the_other_takes_over(stack: Stack, ns: str) -> None:
    s = SHORT
    partition = Partition(str((await kube_config(stack)).host))
    try:
        async with replicas() as start:
            a = await start(await api_client(stack, host=await partition.start()), ns, "replica-a")
            await until(lambda: a.elector.is_leader, 10, "a to lead")
            b = await start(await api_client(stack), ns, "replica-b")
            await until(lambda: b.elector.holder == a.identity, 10, "b to see a's lease")
            async with sampling(a, b) as samples:
                await asyncio.sleep(1)  # a few renewals
                assert a.elector.is_leader and not b.started
                partition.frozen = True
                await until(lambda: bool(b.started), s.lease_duration + s.renew_deadline + 5, "b to lead")
                await asyncio.sleep(0.5)
            last_renewal = a.elector.last_renewal
            assert last_renewal is not None

            # a stops acting no later than renew_deadline after its last renewal
            # (is_leader at once, by the clock; lead() when the loop cancels it) ...
            assert not a.elector.is_leader
            a_leading = [t for t, (leading, _) in samples.rows if leading]
            assert max(a_leading) < last_renewal + s.renew_deadline
            assert len(a.stopped) == 1
            assert a.stopped[0] <= last_renewal + s.renew_deadline + s.retry_period
            # ... before b starts, which waits a lease duration from when it saw that
            # renewal, itself later than a sent it.
            assert a.stopped[0] < b.started[0]
            assert b.started[0] - last_renewal >= s.lease_duration
            assert not samples.both()
            assert not overlapping(a, b)
            print(
                f"\npartition: a stopped {a.stopped[0] - last_renewal:.2f}s and b started "
                f"{b.started[0] - last_renewal:.2f}s after a's last renewal"
            )

            # Healed, a finds b holding the lease and stays a candidate.
            partition.frozen = False
            await until(lambda: a.elector.holder == b.identity, 10, "a to see b's lease")
            await asyncio.sleep(1)
            assert len(a.started) == 1 and not a.elector.is_leader and b.elector.is_leader
            lease = await read_lease(stack, ns)
            assert lease["spec"]["holderIdentity"] == b.identity
            assert lease["spec"]["leaseTransitions"] == 1
    finally:
        await partition.close()


# A replica in a process of its own, with the default timings, that prints "leading".
REPLICA = """
import asyncio, sys
from kubernetes_asyncio import client, config
from kubetask.control.leader import LeaderElector, LeaseSettings

async def main(kubeconfig, namespace, identity):
    cfg = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    async with client.ApiClient(cfg) as api:
        elector = LeaderElector(api_client=api, settings=LeaseSettings(namespace=namespace, identity=identity))

        async def lead():
            print("leading", flush=True)
            await asyncio.Event().wait()

        await elector.run(lead)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_killed_leader_is_replaced_after_a_lease_duration_with_default_timings(
    stack: Stack, ns: str
) -> None:
    defaults = LeaseSettings(namespace=ns, identity="-")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", REPLICA, stack.kubeconfig, ns, "replica-killed", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"leading\n"
        async with replicas() as start:
            b = await start(await api_client(stack), ns, "replica-b", defaults)
            await until(lambda: b.elector.holder == "replica-killed", 10, "b to see the lease")
            await asyncio.sleep(2 * defaults.retry_period)  # a renewal or two

            proc.send_signal(signal.SIGKILL)
            killed, killed_wall = time.monotonic(), time.time()
            await proc.wait()
            last = await read_lease(stack, ns)
            assert last["spec"]["holderIdentity"] == "replica-killed"
            await until(lambda: bool(b.started), 2 * defaults.lease_duration, "b to lead")

            takeover = b.started[0] - killed
            print(
                f"\ndead leader (defaults {defaults.lease_duration:g}/{defaults.renew_deadline:g}/{defaults.retry_period:g}s): taken over {takeover:.2f}s after SIGKILL"
            )
            # Not before a lease duration since its last renewal (renewTime, written by
            # this machine's wall clock before the renewal was sent) ...
            renewed = datetime.strptime(
                last["spec"]["renewTime"].replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z"
            )
            b_started_wall = killed_wall + (b.started[0] - killed)
            assert b_started_wall - renewed.timestamp() >= defaults.lease_duration - 0.05
            # ... and about a lease duration plus up to a retry period after its death.
            assert takeover <= defaults.lease_duration + defaults.retry_period + 3
            lease = await read_lease(stack, ns)
            assert lease["spec"]["holderIdentity"] == "replica-b"
            assert lease["spec"]["leaseTransitions"] == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ---- what the operator process shows: /healthz and /metrics -------------------------------


def health(op: Operator) -> dict[str, Any]:
    with urllib.request.urlopen(f"{op.api}/healthz", timeout=10) as r:
        out: dict[str, Any] = json.loads(r.read())
    return out


def leader_metrics(op: Operator) -> dict[str, float]:
    """``kubetask_leader`` and the transitions by direction, from the process's /metrics."""
    with urllib.request.urlopen(f"{op.api}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kubetask_leader":
                out["leader"] = sample.value
            elif sample.name == "kubetask_leader_transitions_total":
                out[sample.labels["direction"]] = sample.value
    return out


def assert_role(op: Operator, *, leading: bool) -> dict[str, float]:
    """The gauge says ``leading``, and the transitions agree with it: every term but the
    current one ended (a slow API server may end a term early and start another: the
    counts are not exact, this relation is)."""
    m = leader_metrics(op)
    assert m["leader"] == float(leading) == m["acquired"] - m["lost"], (op.name, m)
    return m


def test_health_and_metrics_name_the_leader_and_follow_a_fail_over(
    stack: Stack, ns: str, tmp_path: Path, start_operator: Callable[..., Operator]
) -> None:
    """Two operator processes, each on its own port; the leader reaches the API server
    through a proxy that then freezes (a partition): it stops leading, the other takes
    over, and both say so on /healthz and /metrics. Lease 4 s, renew deadline 3 s."""
    with KubeApiProxy(stack.kubeconfig) as proxy:
        a = start_operator(
            "a", own_port=True, KUBECONFIG=str(proxy.write_kubeconfig(tmp_path / "kubeconfig"))
        )
        b = start_operator("b", own_port=True, wait_ready=False)
        a_id = health(a)["identity"]
        wait_for(lambda: health(b)["leaseHolder"] == a_id, 30, "b to see a's lease")
        ha, hb = health(a), health(b)
        assert (ha["leader"], ha["leaseHolder"]) == (True, a_id), ha
        assert hb["leader"] is False and hb["identity"] != a_id, hb
        assert ha["lease"] == hb["lease"] == f"{ns}/kubetask-operator"
        assert a_id.startswith("a_") and hb["identity"].startswith("b_")
        assert_role(a, leading=True)
        b_before = assert_role(b, leading=False)

        proxy.pause()  # a can no longer renew
        both: list[tuple[dict[str, Any], dict[str, Any]]] = []

        def b_leads() -> bool:
            # b first: if a still says it leads after b said so, both led at that moment.
            hb, ha = health(b), health(a)
            if hb["leader"] and ha["leader"]:
                both.append((ha, hb))
            return bool(hb["leader"])

        wait_for(b_leads, 30, "b to take over")
        assert not both, both
        assert health(a)["leader"] is False
        proxy.resume()
        wait_for(lambda: health(a)["leaseHolder"] == hb["identity"], 30, "a to see b's lease")
        assert health(a)["leader"] is False and health(b)["leaseHolder"] == hb["identity"]
        assert assert_role(a, leading=False)["lost"] >= 1
        assert assert_role(b, leading=True)["acquired"] > b_before["acquired"]
