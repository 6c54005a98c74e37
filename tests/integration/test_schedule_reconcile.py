"""The leader's reconcile of a Schedule (kubetask.control.schedules) against real
PostgreSQL and the real API server, on a clock the test moves: the overlap policies that
wait for runs to end (BufferOne) or end them (CancelPrevious), and a reconcile repeated
after its Runs were created (it creates nothing twice). No operator runs: the test ends
runs by writing their rows, as the engine would."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.admission import Admission
from kubetask.control import schedules as sched
from kubetask.control.catalogue import Catalogue
from kubetask.control.intake import Intake
from kubetask.engine import machine as m
from kubetask.kube import Kube
from kubetask.protocol import iso
from kubetask.settings import Settings
from kubetask.spec import GROUP, VERSION
from kubetask.store import tables as t
from tests.e2e.harness import Stack, namespace

pytestmark = [pytest.mark.db, pytest.mark.asyncio(loop_scope="session")]

Sessions = async_sessionmaker[AsyncSession]


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def ns(cluster: Stack) -> Iterator[str]:
    with namespace(cluster, "it-sched-rec", label="kubetask.dev/integration") as name:
        yield name


def make(sessions: Sessions, kube: Kube, applied: list[tuple[str, Any]]) -> sched.Schedules:
    settings = Settings()
    catalogue = Catalogue(
        kube=kube, admission=Admission(sessions), settings=settings, queue_changed=lambda _: None
    )

    async def apply(run_id: str, event: Any) -> None:
        applied.append((run_id, event))

    intake = Intake(sessions=sessions, catalogue=catalogue, settings=settings, apply=apply)
    return sched.Schedules(
        sessions=sessions,
        kube=kube,
        settings=settings,
        intake=intake,
        apply=apply,
        run_recorded=lambda _: None,
        wake=lambda _: None,
    )


def create_schedule(cluster: Stack, ns: str, name: str, **spec: Any) -> datetime:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Schedule", "metadata": {"name": name}, "spec": spec}
    out = cluster.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "schedules", body)
    return datetime.fromisoformat(out["metadata"]["creationTimestamp"].replace("Z", "+00:00"))


def runs(cluster: Stack, ns: str, name: str) -> list[str]:
    items = cluster.custom.list_namespaced_custom_object(
        GROUP, VERSION, ns, "runs", label_selector=f"kubetask.dev/schedule={name}"
    )["items"]
    return sorted(r["spec"]["payload"]["timestamp"] for r in items)


async def finish_all(sessions: Sessions, ns: str) -> None:
    async with sessions.begin() as s:
        await s.execute(
            update(t.Run)
            .where(t.Run.namespace == ns, t.Run.finished_at.is_(None))
            .values(phase="Succeeded", finished_at=datetime.now(UTC))
        )


async def test_buffer_one_waits_for_the_run_and_skips_the_rest(
    cluster: Stack, ns: str, sessions: Sessions, kube: Kube, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = create_schedule(cluster, ns, "buf", task="t", cron="* * * * *", overlapPolicy="BufferOne")
    first = created.replace(second=0, microsecond=0) + timedelta(minutes=1)
    clock = Clock(first + timedelta(seconds=1))
    monkeypatch.setattr(sched, "utcnow", clock)
    s = make(sessions, kube, [])
    key = f"{ns}/buf"
    await s.reconcile(key)
    assert runs(cluster, ns, "buf") == [iso(first)]
    clock.now += timedelta(minutes=1)  # the run goes on: buffered
    await s.reconcile(key)
    clock.now += timedelta(minutes=1)  # one is buffered already: skipped
    await s.reconcile(key)
    await s.reconcile(key)  # repeated: nothing new
    assert len(runs(cluster, ns, "buf")) == 1
    await finish_all(sessions, ns)
    await s.reconcile(key)  # the run ended: the buffered fire runs, with its own time
    stamps = runs(cluster, ns, "buf")
    assert [datetime.fromisoformat(x.replace("Z", "+00:00")) for x in stamps] == [
        first,
        first + timedelta(minutes=1),
    ]
    async with sessions() as db:
        row = await db.get(t.Schedule, key)
    assert row is not None and row.skipped == 1
    status = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, ns, "schedules", "buf")["status"]
    assert status["active"] == 1 and status["skipped"] == 1


async def test_cancel_previous_cancels_the_unfinished_run(
    cluster: Stack, ns: str, sessions: Sessions, kube: Kube, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = create_schedule(cluster, ns, "cp", task="t", cron="* * * * *", overlapPolicy="CancelPrevious")
    first = created.replace(second=0, microsecond=0) + timedelta(minutes=1)
    clock = Clock(first + timedelta(seconds=1))
    monkeypatch.setattr(sched, "utcnow", clock)
    applied: list[tuple[str, Any]] = []
    s = make(sessions, kube, applied)
    await s.reconcile(f"{ns}/cp")
    async with sessions() as db:
        (old,) = (await db.execute(select(t.Run.id).where(t.Run.namespace == ns))).scalars()
    clock.now += timedelta(minutes=1)
    await s.reconcile(f"{ns}/cp")
    assert len(runs(cluster, ns, "cp")) == 2
    assert [(run_id, type(e)) for run_id, e in applied] == [(old, m.CancelRequested)]
    assert applied[0][1].reason == "Superseded"
    async with sessions() as db:
        assert (await db.get(t.Run, old)).cancel_requested  # type: ignore[union-attr]
