"""Crash windows of the operator, hit on purpose rather than by luck.

A SIGKILL can land between any two statements. What PostgreSQL does with a transaction
that dies halfway (it rolls back whole) is the same whether the process was killed or
the transaction raised, so these tests make a transition raise at its most awkward
point, then let a fresh controller (the restarted operator) see the same event again,
against the real cluster and database. The SIGKILL tests in ``test_queues`` and
``test_runs`` hit these windows only by chance; CI once did (an attempt's end committed,
the run's move lost, its queue slot held for ever), which is why this file exists."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import pytest
from kubernetes_asyncio import config
from sqlalchemy import select

from kubetask import pods
from kubetask.control.controller import Controller
from kubetask.engine import machine as m
from kubetask.engine.outcomes import PodEnd
from kubetask.kube import Kube
from kubetask.settings import Settings
from kubetask.store import db
from kubetask.store import tables as t
from tests.e2e.harness import Stack

pytestmark = pytest.mark.e2e

TASK = {
    "source": "from kubetask import task\n\n@task(id='crash')\ndef work(payload, ctx):\n    return 1\n",
    # A long back-off keeps the retried run quiet while the test looks at it.
    "retry": {"maxAttempts": 3, "minTimeoutMs": 600_000, "maxTimeoutMs": 600_000, "randomize": False},
    "queue": {"concurrencyLimit": 1},
}


class OperatorKilled(Exception):
    """Stands for the SIGKILL: raised inside the transition's transaction."""


async def killed(*_: Any, **__: Any) -> NoReturn:
    """Put in place of the step the first operator does not live to finish."""
    raise OperatorKilled


class Operators:
    """Two controllers on the real cluster and database: the one that dies and the one
    that replaces it. Each has its own Kubernetes client, so faults stay in one."""

    def __init__(self, stack: Stack, ns: str, database_url: str) -> None:
        self.stack, self.ns, self.database_url = stack, ns, database_url

    async def __aenter__(self) -> Operators:
        await config.load_kube_config(config_file=self.stack.kubeconfig)
        await asyncio.to_thread(db.upgrade, self.database_url)
        self.engine = db.make_engine(self.database_url, pool_size=4)
        self.sessions = db.session_factory(self.engine)
        settings = Settings(
            database_url=self.database_url,
            namespaces=[self.ns],
            # No API behind it: the attempt's pod never gets to report, which is fine here.
            api_url="http://127.0.0.1:9",
            runner_image=self.stack.runner_image,
        )
        self.first = Controller(sessions=self.sessions, kube=Kube(), settings=settings)
        self.restarted = Controller(sessions=self.sessions, kube=Kube(), settings=settings)
        task = await self.first.kube.get_object("tasks", self.ns, "crash")
        assert task is not None
        for c in (self.first, self.restarted):
            await c.catalogue.on_task_event("ADDED", task)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for c in (self.first, self.restarted):
            await c.kube.close()
        await self.engine.dispose()

    async def row(self, model: Any, *where: Any) -> Any:
        async with self.sessions() as s:
            return (await s.execute(select(model).where(*where))).scalar_one()

    async def start_run(self, name: str) -> t.Run:
        """The first operator records the Run, resolves and admits it, one step at a time
        (its work queues are not running); returns its row, Running."""
        run = await self.first.kube.get_object("runs", self.ns, name)
        assert run is not None
        run_id = await self.first.intake.record(run)
        await self.first.reconcile(run_id)  # Pending -> Queued
        row = await self.row(t.Run, t.Run.id == run_id)
        await self.first.admit(row.queue)  # Queued -> Running, attempt 1
        row = await self.row(t.Run, t.Run.uid == run["metadata"]["uid"])
        assert (row.phase, row.attempt) == (m.Phase.RUNNING, 1), (row.phase, row.reason, row.message)
        return row  # type: ignore[no-any-return]


async def _attempt_end_dies_halfway(ops: Operators, name: str) -> None:
    row = await ops.start_run(name)
    queue = row.queue
    assert await ops.first.admission.counts(queue) == (1, 0)
    pod_end = PodEnd(137, "OOMKilled", "killed")

    # The first operator records the attempt's end and dies while moving the run.
    ops.first.admission.release = killed  # type: ignore[method-assign]
    with pytest.raises(OperatorKilled):
        await ops.first.attempts.end(row.id, 1, pod_end)

    # Nothing of it stuck: the attempt is not marked ended, the run still owns its slot.
    attempt = await ops.row(t.Attempt, t.Attempt.run_id == row.id, t.Attempt.number == 1)
    assert attempt.finished_at is None and attempt.reason is None
    assert (await ops.row(t.Run, t.Run.id == row.id)).phase == m.Phase.RUNNING
    assert await ops.first.admission.counts(queue) == (1, 0)

    # The restarted operator sees the same pod end again (its pod watch replays it):
    # the attempt ends and the run moves on, freeing the slot.
    await ops.restarted.attempts.end(row.id, 1, pod_end)
    attempt = await ops.row(t.Attempt, t.Attempt.run_id == row.id, t.Attempt.number == 1)
    assert attempt.finished_at is not None and attempt.reason == "OOMKilled"
    row = await ops.row(t.Run, t.Run.id == row.id)
    assert (row.phase, row.reason) == (m.Phase.RETRYING, "OOMKilled"), (row.phase, row.reason)
    # The back-off is the run's timer, in its row: it survives the process that set it.
    assert row.wake_at == row.next_attempt_at
    assert await ops.restarted.admission.counts(queue) == (0, 0)

    # Seen a third time, the same end changes nothing.
    await ops.restarted.attempts.end(row.id, 1, pod_end)
    again = await ops.row(t.Run, t.Run.id == row.id)
    assert (again.phase, again.attempt, again.next_attempt_at) == (
        row.phase,
        row.attempt,
        row.next_attempt_at,
    )


async def _cancel_dies_before_the_pod_is_deleted(ops: Operators, name: str) -> None:
    row = await ops.start_run(name)
    pod_name = pods.pod_name(name, row.uid, 1)
    await ops.first.reconcile(row.id)  # creates the token Secret and the pod
    assert (await ops.row(t.Attempt, t.Attempt.run_id == row.id)).pod_uid is not None

    # The first operator commits the cancel and dies before deleting the pod.
    ops.first.kube.delete_pod = killed  # type: ignore[method-assign]
    await ops.first.transitions.apply(row.id, m.CancelRequested("Canceled", "spec.cancel was set to true"))
    with pytest.raises(OperatorKilled):
        await ops.first.reconcile(row.id)
    assert (await ops.row(t.Run, t.Run.id == row.id)).phase == m.Phase.CANCELED
    pod = await ops.restarted.kube.get_pod(ops.ns, pod_name)
    assert pod is not None and pod["metadata"].get("deletionTimestamp") is None

    # The restarted operator's first resync finds the run whose attempt is not over...
    await ops.restarted.resync.once(initial=True)
    assert row.id in ops.restarted.runs._queued
    # ... and its reconcile deletes the pod (the slot is freed once the pod is gone).
    await ops.restarted.reconcile(row.id)
    pod = await ops.restarted.kube.get_pod(ops.ns, pod_name)
    assert pod is None or pod["metadata"].get("deletionTimestamp") is not None, pod["status"]


async def _status_patch_dies_with_the_process(ops: Operators, name: str) -> None:
    # The first operator moves the run (Running) and dies before writing its status.
    row = await ops.start_run(name)
    run = await ops.restarted.kube.get_object("runs", ops.ns, name)
    assert run is not None and (run.get("status") or {}).get("phase") != "Running"

    # The restarted operator's resync sees the Run's status lag its row and rewrites it.
    await ops.restarted.resync.once(initial=True)
    await asyncio.sleep(0.2)  # status patches are coalesced for a moment
    assert row.id in ops.restarted.status.runs._queued
    await ops.restarted.status._patch(row.id)
    run = await ops.restarted.kube.get_object("runs", ops.ns, name)
    assert run is not None and run["status"]["phase"] == "Running" and run["status"]["runId"] == row.id


def _play(
    stack: Stack, ns: str, database_url: str, scenario: Callable[[Operators, str], Awaitable[None]]
) -> None:
    """One Run of the crash Task, played through ``scenario`` by two operators."""
    stack.apply_task(ns, "crash", TASK)
    name = stack.create_run(ns, "crash")

    async def play() -> None:
        async with Operators(stack, ns, database_url) as ops:
            await scenario(ops, name)

    asyncio.run(play())


def test_an_attempts_end_and_the_runs_move_commit_together(stack: Stack, ns: str, e2e_database: str) -> None:
    _play(stack, ns, e2e_database, _attempt_end_dies_halfway)


def test_a_canceled_runs_pod_is_deleted_by_the_next_operator(
    stack: Stack, ns: str, e2e_database: str
) -> None:
    _play(stack, ns, e2e_database, _cancel_dies_before_the_pod_is_deleted)


def test_a_status_lost_with_the_process_is_written_by_the_next_one(
    stack: Stack, ns: str, e2e_database: str
) -> None:
    _play(stack, ns, e2e_database, _status_patch_dies_with_the_process)
