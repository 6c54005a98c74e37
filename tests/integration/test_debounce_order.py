"""Debounced triggers are decided in the order they reached the API server, whatever the
order the operator resolves them in (kopf handles each Run in its own task, so three Runs
created one after the other can be resolved in any order). Real PostgreSQL, the real
intake and transitions; the Task is known to the catalogue, no cluster is needed."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.admission import Admission
from kubetask.control.catalogue import Catalogue
from kubetask.control.intake import Intake
from kubetask.control.transitions import Transitions
from kubetask.kube import Kube
from kubetask.settings import Settings
from kubetask.spec import RetrySpec
from kubetask.store import tables as t

pytestmark = [pytest.mark.db, pytest.mark.asyncio(loop_scope="session")]

Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture
async def kube() -> AsyncIterator[Kube]:
    k = Kube()  # never called: the Task is in the catalogue's index
    try:
        yield k
    finally:
        await k.close()


def run_body(ns: str, n: int, debounce: dict[str, Any]) -> dict[str, Any]:
    """The n-th Run of a burst: created in the same second, resourceVersions in order."""
    return {
        "metadata": {
            "namespace": ns,
            "name": f"trigger-{n}",
            "uid": str(uuid.uuid4()),
            "creationTimestamp": "2026-11-30T12:00:00Z",
            "resourceVersion": str(5000 + n),
        },
        "spec": {"task": "quick", "payload": {"n": n}, "debounce": debounce},
    }


async def burst(sessions: Sessions, kube: Kube, mode: str) -> dict[int, t.Run]:
    """Three triggers recorded in creation order, resolved last first (each resolve that is
    put off is done again, as the run queue does); the rows at the end, by trigger."""
    ns = f"it-debounce-{secrets.token_hex(3)}"
    settings = Settings()
    admission = Admission(sessions)
    catalogue = Catalogue(kube=kube, admission=admission, settings=settings, queue_changed=lambda _: None)
    catalogue.index_task(
        {"metadata": {"name": "quick", "namespace": ns, "uid": str(uuid.uuid4())}, "spec": {"image": "x"}}
    )
    transitions = Transitions(
        sessions=sessions,
        admission=admission,
        retry_for=lambda _run: RetrySpec(),
        ttl_for=lambda _run: None,
        infra_limit=3,
        committed=lambda _applied: None,
    )
    put_off: list[str] = []
    intake = Intake(
        sessions=sessions,
        catalogue=catalogue,
        settings=settings,
        apply=transitions.apply,
        later=lambda run_id, _delay: put_off.append(run_id),
    )
    debounce = {"key": "user-1", "delaySeconds": 30, "mode": mode}
    ids = [await intake.record(run_body(ns, n, debounce)) for n in range(3)]

    async def resolve(run_id: str) -> None:
        async with sessions() as s:
            row = (await s.execute(select(t.Run).where(t.Run.id == run_id))).scalar_one()
        await intake.resolve(row)

    for run_id in reversed(ids):
        await resolve(run_id)
    # The two later triggers were put off: the first had not been resolved.
    assert put_off == [ids[2], ids[1]]
    while put_off:
        await resolve(put_off.pop())
    async with sessions() as s:
        rows = (await s.execute(select(t.Run).where(t.Run.id.in_(ids)))).scalars().all()
    by_id = {r.id: r for r in rows}
    return {n: by_id[run_id] for n, run_id in enumerate(ids)}


async def test_leading_runs_the_first_trigger_created_though_resolved_last(
    sessions: Sessions, kube: Kube
) -> None:
    rows = await burst(sessions, kube, "leading")
    assert rows[0].phase == "Running" and rows[0].payload == {"n": 0}  # granted a slot at once
    for n in (1, 2):
        assert (rows[n].phase, rows[n].reason, rows[n].original_run_id) == (
            "Deduplicated",
            "Debounced",
            rows[0].id,
        )


async def test_trailing_runs_once_with_the_last_trigger_created(sessions: Sessions, kube: Kube) -> None:
    rows = await burst(sessions, kube, "trailing")
    assert rows[0].phase == "Delayed" and rows[0].payload == {"n": 2}
    for n in (1, 2):
        assert (rows[n].phase, rows[n].reason, rows[n].original_run_id) == (
            "Deduplicated",
            "Debounced",
            rows[0].id,
        )
