"""Intake: a Run resource becomes a row, and a Pending run is resolved.

Recording a Run is one idempotent INSERT keyed by the Run's uid (a repeated event, a
second replica, a resync all find the row there). Everything else about a new run is
decided by its reconcile while it is Pending, through the engine's transitions:

- a spec the operator cannot use (payload too large, ...) -> ``Rejected``;
- its idempotencyKey already held by another run -> ``Deduplicated``, a terminal phase
  that points at the original and that nothing can promote (the claim is an upsert on a
  unique key, so of N runs created at once exactly one owns the key);
- its Task exists -> ``TaskResolved`` (queued for a slot);
- its Task is unknown -> it waits (a timer) until the grace period ends -> ``Rejected``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from kubetask.control.catalogue import Catalogue, queue_key
from kubetask.control.timers import utcnow
from kubetask.control.transitions import Applied, EventSource
from kubetask.engine import machine as m
from kubetask.pods import LABEL_PARENT_RUN
from kubetask.settings import Settings
from kubetask.spec import MAX_DELAY_SECONDS, MAX_PAYLOAD_BYTES, Debounce, RetrySpec, RunSpec
from kubetask.store import tables as t
from kubetask.store.runs import iso, load_state, save_state

Apply = Callable[[str, m.Event | EventSource], Awaitable[Applied | None]]

#: Reasons recorded at intake for a spec that can never run.
REJECTED_AT_INTAKE = frozenset({"InvalidSpec", "PayloadTooLarge"})


def debouncer(spec: Debounce, resolved: m.TaskResolved) -> EventSource:
    """A debounced run's resolution, in its transition's transaction (queue row, then run
    row locked): it takes the key's open burst (its run's row locked after the key's), or
    opens one.

    - leading: the run that opened the burst runs at once; a trigger within ``delaySeconds``
      of the previous one (and within ``maxDelaySeconds`` of the first) ends ``Deduplicated``
      (reason ``Debounced``), pointing at it.
    - trailing: the burst's run is ``Delayed`` until ``delaySeconds`` after the last trigger
      (at most ``maxDelaySeconds`` after the first) and runs with the last trigger's payload;
      the triggers it took end ``Deduplicated`` (reason ``Debounced``).
    """

    async def decide(s: AsyncSession, row: t.Run) -> m.Event | None:
        if row.phase != m.Phase.PENDING:
            return None
        now = utcnow()
        ident = {"namespace": row.namespace, "task": row.task, "key": spec.key}
        await s.execute(
            pg_insert(t.DebounceEntry)
            .values(**ident, run_id=row.id, first_at=now, last_at=now, triggers=0)
            .on_conflict_do_nothing()
        )
        entry = (
            await s.execute(
                select(t.DebounceEntry)
                .where(*(getattr(t.DebounceEntry, k) == v for k, v in ident.items()))
                .with_for_update()
            )
        ).scalar_one()
        if entry.run_id != row.id:
            taken = await _take(s, spec, entry, row, now)
            if taken is not None:
                return taken
        # This run opens a burst.
        entry.run_id, entry.first_at, entry.last_at, entry.triggers = row.id, now, now, 1
        if spec.mode == "leading":
            return resolved
        until = now + timedelta(seconds=_cap(spec, spec.delay_seconds))
        row.not_before = until
        return m.TaskResolved(
            max_attempts=resolved.max_attempts,
            not_before=until,
            expires_at=None if row.expires_at is None else max(row.expires_at, until),
        )

    return decide


def keeping_version(version: dict[str, Any], event: m.Event | EventSource) -> EventSource:
    """``event`` (a run's resolution), which also records the Task version the run keeps to
    its end (its pods, its retries): in the same transaction and UPDATE of the run's row,
    once (a debounced run resolved again keeps the first)."""

    async def decide(s: AsyncSession, row: t.Run) -> m.Event | None:
        if row.phase == m.Phase.PENDING and row.task_version is None:
            row.task_version = version
        return await event(s, row) if callable(event) else event

    return decide


def _cap(spec: Debounce, seconds: float) -> float:
    return seconds if spec.max_delay_seconds is None else min(seconds, spec.max_delay_seconds)


async def _take(
    s: AsyncSession, spec: Debounce, entry: t.DebounceEntry, row: t.Run, now: datetime
) -> m.Event | None:
    """The open burst takes this trigger (an event ending ``row``), or None: it is over."""
    within_max = spec.max_delay_seconds is None or now < entry.first_at + timedelta(
        seconds=spec.max_delay_seconds
    )
    owner = (
        await s.execute(select(t.Run).where(t.Run.id == entry.run_id).with_for_update())
    ).scalar_one_or_none()
    if owner is None or not within_max:
        return None
    if spec.mode == "leading":
        if now - entry.last_at >= timedelta(seconds=spec.delay_seconds):
            return None
    elif owner.phase != m.Phase.DELAYED:
        return None  # the burst's run started: this trigger opens the next burst
    else:
        until = min(
            now + timedelta(seconds=spec.delay_seconds),
            entry.first_at + timedelta(seconds=spec.max_delay_seconds or MAX_DELAY_SECONDS),
        )
        message = f"delayed until {until.isoformat()}: debounced, {entry.triggers + 1} triggers so far"
        moved = m.step(
            load_state(owner), m.DelayMoved(until, message), now=now, retry=RetrySpec(), rand=lambda: 0.0
        )
        save_state(owner, moved.state, now=now)
        owner.not_before, owner.wake_at, owner.payload = until, until, row.payload
    entry.last_at = now
    entry.triggers += 1
    row.original_run_id = owner.id
    return m.Deduplicated(
        owner.id,
        f"debounced ({spec.mode}): run {owner.id} ({owner.name}) takes this trigger"
        + ("; it runs with this payload unless a later trigger comes" if spec.mode == "trailing" else ""),
        reason="Debounced",
    )


def start_window(spec: RunSpec, created: datetime) -> tuple[datetime | None, datetime | None]:
    """When the run may start (spec.delaySeconds from its creation, or spec.notBefore) and
    when it expires if it has not started (spec.ttlSeconds from the moment it may start)."""
    not_before = spec.not_before
    if spec.delay_seconds:
        not_before = created + timedelta(seconds=spec.delay_seconds)
    expires_at = None
    if spec.ttl_seconds is not None:
        expires_at = max(not_before or created, created) + timedelta(seconds=spec.ttl_seconds)
    return not_before, expires_at


def _parent(meta: dict[str, Any]) -> str | None:
    """The parent run of a child run (its label, set by the runner API), if any."""
    value = (meta.get("labels") or {}).get(LABEL_PARENT_RUN)
    return value if isinstance(value, str) and value.startswith("run_") and len(value) <= 40 else None


def new_run_id() -> str:
    return "run_" + secrets.token_hex(10)


def arrival_order(meta: dict[str, Any]) -> int:
    """Order of a Run's creation in the API server: creationTimestamp (seconds), then
    resourceVersion within the second (etcd's revisions increase; if a server's are not
    numbers, ties fall back to the order the operator saw the Runs)."""
    created = created_at(meta, utcnow())
    rv = str(meta.get("resourceVersion") or "")
    return (int(created.timestamp()) << 32) | (int(rv) & 0xFFFFFFFF if rv.isdigit() else 0)


def created_at(meta: dict[str, Any], now: datetime) -> datetime:
    raw = meta.get("creationTimestamp")
    return datetime.fromisoformat(raw.replace("Z", "+00:00")) if isinstance(raw, str) else now


class Intake:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        catalogue: Catalogue,
        settings: Settings,
        apply: Apply,
        later: Callable[[str, float], None] = lambda _run_id, _delay: None,
    ) -> None:
        self.sessions = sessions
        self.catalogue = catalogue
        self.settings = settings
        self.apply = apply
        #: Reconcile a run again after a delay (the controller's run queue).
        self.later = later

    async def record(self, body: dict[str, Any]) -> str:
        """The run id of this Run resource, inserting its row (Pending) if new."""
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        raw = body.get("spec") or {}
        payload_bytes = len(json.dumps(raw.get("payload") or {}, separators=(",", ":")).encode())
        reason, message = "Created", ""
        try:
            spec = RunSpec.model_validate(raw)
        except ValidationError as e:
            spec = RunSpec(task=str(raw.get("task") or "unknown"))
            reason, message = "InvalidSpec", f"spec is invalid: {e.errors()[0]['msg']}"
        if payload_bytes > MAX_PAYLOAD_BYTES:
            reason, message = (
                "PayloadTooLarge",
                f"spec.payload is {payload_bytes} bytes; the limit is {MAX_PAYLOAD_BYTES} bytes: "
                "put large inputs in object storage and pass a reference",
            )
        info = self.catalogue.tasks.get((ns, spec.task))
        now = utcnow()
        created = created_at(meta, now)
        not_before, expires_at = start_window(spec, created)
        async with self.sessions.begin() as s:
            run_id = (
                await s.execute(
                    pg_insert(t.Run)
                    .values(
                        id=new_run_id(),
                        namespace=ns,
                        name=name,
                        uid=meta["uid"],
                        task=spec.task,
                        queue=queue_key(ns, info.queue if info else spec.task),
                        concurrency_key=spec.concurrency_key,
                        idempotency_key=spec.idempotency_key,
                        priority=spec.priority,
                        arrival=arrival_order(meta),
                        tags=spec.tags,
                        payload=spec.payload if payload_bytes <= MAX_PAYLOAD_BYTES else {},
                        phase=m.Phase.PENDING.value,
                        attempt=0,
                        max_attempts=spec.max_attempts or 0,
                        cancel_requested=spec.cancel,
                        ttl_seconds=spec.ttl_seconds_after_finished,
                        reason=reason,
                        message=message,
                        created_at=created,
                        parent_run_id=_parent(meta),
                        not_before=not_before,
                        expires_at=expires_at,
                        debounce=spec.debounce.model_dump(by_alias=True) if spec.debounce else None,
                    )
                    .on_conflict_do_nothing(index_elements=[t.Run.uid])
                    .returning(t.Run.id)
                )
            ).scalar_one_or_none()
            if run_id is None:  # recorded before (a repeated event, another replica)
                run_id = (await s.execute(select(t.Run.id).where(t.Run.uid == meta["uid"]))).scalar_one()
        return run_id

    async def resolve(self, row: t.Run) -> None:
        """The reconcile of a Pending run."""
        if row.reason in REJECTED_AT_INTAKE:
            await self.apply(row.id, m.Rejected(row.reason, row.message))
            return
        if row.idempotency_key and row.original_run_id is None:
            original = await self.claim(row)
            if original is not None:
                await self.apply(row.id, _deduplicate(row.id, original, row.idempotency_key))
                return
        info = await self.catalogue.task(row.namespace, row.task)
        if info is not None:
            queue = queue_key(row.namespace, info.queue)
            if queue != row.queue:  # not in any queue yet: safe to move
                async with self.sessions.begin() as s:
                    await s.execute(
                        update(t.Run)
                        .where(t.Run.id == row.id, t.Run.phase == m.Phase.PENDING)
                        .values(queue=queue)
                    )
            await self.catalogue.configure_queue(row.namespace, info.queue)
            version = info.version(self.settings.runner_image)
            # max_attempts 0 means "from the Task", which may have been unknown at intake.
            resolved = m.TaskResolved(
                max_attempts=row.max_attempts or info.spec.retry.max_attempts,
                not_before=row.not_before,
                expires_at=row.expires_at,
            )
            if row.debounce:
                spec = Debounce.model_validate(row.debounce)
                if await self._earlier_trigger_pending(row, spec):
                    # A trigger of the same key that reached the API server first is not
                    # resolved yet: it goes first (leading runs the first trigger's payload,
                    # trailing the last one's), and this one after it.
                    self.later(row.id, 0.2)
                    return
                await self.apply(row.id, keeping_version(version, debouncer(spec, resolved)))
            else:
                await self.apply(row.id, keeping_version(version, resolved))
            return
        grace = self.settings.task_grace_seconds
        deadline = row.created_at + timedelta(seconds=grace)
        if utcnow() >= deadline:
            await self.apply(
                row.id,
                m.Rejected(
                    "TaskNotFound",
                    f"Task {row.task!r} does not exist in namespace {row.namespace!r} (waited "
                    f"{grace:.0f}s for it); create it, then create the Run again",
                ),
            )
        else:
            await self.apply(
                row.id,
                m.TaskMissing(
                    until=deadline,
                    message=f"Task {row.task!r} not found in namespace {row.namespace!r}; waiting until "
                    f"{iso(deadline)} for it to appear",
                ),
            )

    async def _earlier_trigger_pending(self, row: t.Run, spec: Debounce) -> bool:
        """Whether a recorded, unresolved (Pending) run of the same debounce key arrived
        before ``row`` (arrival_order: the order of creation in the API server)."""
        async with self.sessions() as s:
            earlier = await s.execute(
                select(t.Run.id)
                .where(
                    t.Run.namespace == row.namespace,
                    t.Run.task == row.task,
                    t.Run.phase == m.Phase.PENDING.value,
                    t.Run.debounce["key"].astext == spec.key,
                    t.Run.id != row.id,
                    or_(t.Run.arrival < row.arrival, and_(t.Run.arrival == row.arrival, t.Run.id < row.id)),
                )
                .limit(1)
            )
            return earlier.first() is not None

    async def claim(self, row: t.Run) -> str | None:
        """Claim the run's idempotencyKey; the original run's id if another holds it.

        An upsert on the key's primary key: concurrent claims are serialised by
        PostgreSQL, the first to commit owns the key, the others see it. Claiming again
        (a repeated reconcile) is harmless."""
        assert row.idempotency_key
        now = utcnow()
        expires = now + timedelta(seconds=self.settings.idempotency_ttl_seconds)
        async with self.sessions.begin() as s:
            stmt = pg_insert(t.IdempotencyKey).values(
                namespace=row.namespace,
                task=row.task,
                key=row.idempotency_key,
                run_id=row.id,
                expires_at=expires,
            )
            owner = (
                await s.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[
                            t.IdempotencyKey.namespace,
                            t.IdempotencyKey.task,
                            t.IdempotencyKey.key,
                        ],
                        set_={"run_id": row.id, "expires_at": expires},
                        where=t.IdempotencyKey.expires_at < now,
                    ).returning(t.IdempotencyKey.run_id)
                )
            ).scalar_one_or_none()
            if owner is None:  # the key is held and unexpired: read who holds it
                owner = (
                    await s.execute(
                        select(t.IdempotencyKey.run_id).where(
                            t.IdempotencyKey.namespace == row.namespace,
                            t.IdempotencyKey.task == row.task,
                            t.IdempotencyKey.key == row.idempotency_key,
                        )
                    )
                ).scalar_one()
        return None if owner == row.id else owner


def _deduplicate(run_id: str, original: str, key: str) -> EventSource:
    async def source(s: AsyncSession, row: t.Run) -> m.Event | None:
        orig = await s.get(t.Run, original)
        row.original_run_id = original
        where = f"run {orig.name} ({original})" if orig else f"run {original}"
        return m.Deduplicated(
            original,
            f"idempotencyKey {key!r} was already used by {where}; this run does not execute: "
            f"see status.originalRun",
        )

    return source
