"""Durable execution in PostgreSQL: a run's journal (``checkpoints``), events, tokens and
the wake-ups that resume waiting runs.

Shared by the runner API (which records steps and registers waits), the public API
(events, token completions) and the controller (child runs ending, timeouts). Every
function works inside the caller's transaction, so what satisfies a wait and what wakes
its run commit together.

Resuming a run is the leader's work: satisfying a wait sets the waiting run's timer to
now (``runs.wake_at``) and sends ``NOTIFY kubetask_wake``; the leader's timer loop
listens, fires the run, and its reconcile applies ``WaitSatisfied``. A lost
notification costs time (the loop polls anyway), never the resume.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from kubetask.engine.machine import Phase
from kubetask.store import tables as t

#: The channel of NOTIFY that tells the leader a waiting run may resume now.
WAKE_CHANNEL = "kubetask_wake"

WAITING = "waiting"
SATISFIED = "satisfied"
TIMED_OUT = "timed_out"
CANCELED = "canceled"
#: Kinds of checkpoint a run can suspend on.
WAIT_KINDS = frozenset({"sleep", "event", "token_wait", "child"})


async def wake_waiting(s: AsyncSession, run_ids: Iterable[str]) -> list[str]:
    """Make the timers of those runs that are Waiting due now, and tell the leader.
    Returns the runs woken (a run still Running finds its wait satisfied when its pod
    ends: see :func:`describe_wait`)."""
    ids = sorted(set(run_ids))
    if not ids:
        return []
    woken = list(
        (
            await s.execute(
                update(t.Run)
                .where(t.Run.id.in_(ids), t.Run.phase == Phase.WAITING.value)
                .values(wake_at=func.now())
                .returning(t.Run.id)
                .execution_options(synchronize_session=False)
            )
        ).scalars()
    )
    if woken:
        await s.execute(text("SELECT pg_notify(:channel, '')"), {"channel": WAKE_CHANNEL})
    return woken


async def satisfy(
    s: AsyncSession, where: Any, *, result: Any, status: str = SATISFIED, event_id: int | None = None
) -> list[str]:
    """Satisfy the open waits ``where`` selects (a SQL condition on checkpoints); wake
    their runs. Returns the runs whose wait was satisfied."""
    runs = list(
        (
            await s.execute(
                update(t.Checkpoint)
                .where(where, t.Checkpoint.status == WAITING)
                .values(status=status, result=result, finished_at=func.now(), event_id=event_id)
                .returning(t.Checkpoint.run_id)
                .execution_options(synchronize_session=False)
            )
        ).scalars()
    )
    await wake_waiting(s, runs)
    return runs


def child_result(row: t.Run) -> dict[str, Any]:
    """What ``trigger_and_wait`` gets back when the child ends."""
    return {
        "runId": row.id,
        "phase": row.phase,
        "output": row.output,
        "error": row.error,
    }


async def child_ended(s: AsyncSession, child: t.Run) -> list[str]:
    """A child run finished: satisfy its parent's wait for it (same transaction as the
    child's last transition, so the parent can never miss it)."""
    return await satisfy(
        s,
        (t.Checkpoint.kind == "child") & (t.Checkpoint.ref == child.id),
        result=child_result(child),
    )


async def cancel_children(s: AsyncSession, parent_id: str) -> list[str]:
    """Ask the parent's unfinished children to cancel (their reconcile does it)."""
    children = list(
        (
            await s.execute(
                update(t.Run)
                .where(
                    t.Run.parent_run_id == parent_id,
                    t.Run.finished_at.is_(None),
                    t.Run.cancel_requested.is_(False),
                )
                .values(cancel_requested=True, wake_at=func.now())
                .returning(t.Run.id)
                .execution_options(synchronize_session=False)
            )
        ).scalars()
    )
    if children:
        await s.execute(text("SELECT pg_notify(:channel, '')"), {"channel": WAKE_CHANNEL})
    return children


async def close_waits(s: AsyncSession, run_id: str) -> None:
    """A run ended while waiting (canceled): its waits are over."""
    await s.execute(
        update(t.Checkpoint)
        .where(t.Checkpoint.run_id == run_id, t.Checkpoint.status == WAITING)
        .values(status=CANCELED, finished_at=func.now())
        .execution_options(synchronize_session=False)
    )


# ---- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivered:
    event_id: int
    runs: list[str]


async def deliver_event(s: AsyncSession, *, namespace: str, name: str, data: dict[str, Any]) -> Delivered:
    """Store an event and satisfy every open wait in ``namespace`` for ``name`` whose
    ``match`` the data contains (JSON containment). At most one wait per run: a run
    waits on one thing at a time."""
    event_id: int = (
        await s.execute(
            insert(t.Event)
            .values(namespace=namespace, name=name, data=data, delivered=0)
            .returning(t.Event.id)
        )
    ).scalar_one()
    cond = (
        (t.Checkpoint.kind == "event")
        & (t.Checkpoint.namespace == namespace)
        & (t.Checkpoint.event_name == name)
        & text("CAST(:data AS jsonb) @> checkpoints.match").bindparams(data=_json(data))
    )
    runs = await satisfy(s, cond, result=data, event_id=event_id)
    if runs:
        await s.execute(update(t.Event).where(t.Event.id == event_id).values(delivered=len(runs)))
    return Delivered(event_id=event_id, runs=runs)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def stored_event(
    s: AsyncSession, *, run_id: str, namespace: str, name: str, match: dict[str, Any], since: datetime
) -> t.Event | None:
    """The oldest event received since ``since`` that matches and that no wait of this
    run consumed yet (so a loop waiting twice for the same name needs two events)."""
    used = exists().where(t.Checkpoint.run_id == run_id, t.Checkpoint.event_id == t.Event.id)
    return (
        await s.execute(
            select(t.Event)
            .where(
                t.Event.namespace == namespace,
                t.Event.name == name,
                t.Event.received_at >= since,
                text("events.data @> CAST(:match AS jsonb)").bindparams(match=_json(match)),
                ~used,
            )
            .order_by(t.Event.id)
            .limit(1)
        )
    ).scalar_one_or_none()


# ---- what a waiting run waits for ---------------------------------------------------------


def describe(cp: t.Checkpoint) -> str:
    """A wait in words, for the Run's status."""
    match cp.kind:
        case "sleep":
            return f"the end of sleep {cp.name!r}"
        case "event":
            what = f"event {cp.event_name!r}"
            return what + (f" matching {_json(cp.match)}" if cp.match else "")
        case "token_wait":
            return f"token {cp.name!r} to be completed"
        case "child":
            return f"child run {cp.ref} to finish"
    return f"{cp.kind} {cp.name!r}"


def expire(cp: t.Checkpoint, now: datetime) -> bool:
    """If an open wait's time has come, settle it in place (a sleep is satisfied, any
    other wait times out). Returns whether it changed."""
    if cp.status != WAITING or cp.due_at is None or cp.due_at > now:
        return False
    cp.status = SATISFIED if cp.kind == "sleep" else TIMED_OUT
    cp.finished_at = now
    return True


def deadline(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds)
