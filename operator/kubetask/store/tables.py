"""The schema. Changes go through an Alembic migration in ``migrations/versions``.

Source of truth (see docs/state.md): PostgreSQL holds every run's state, attempts,
logs, output, slots and queues; a Run's ``status`` is a projection of its row, rewritten
from the database after every transition and on operator start.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB, datetime: DateTime(timezone=True)}


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    namespace: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(253))
    uid: Mapped[str] = mapped_column(String(64), unique=True)
    task: Mapped[str] = mapped_column(String(63))
    queue: Mapped[str] = mapped_column(String(140))
    concurrency_key: Mapped[str | None] = mapped_column(String(256))
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    #: Order of arrival in its queue (see QueueEntry.arrival).
    arrival: Mapped[int] = mapped_column(BigInteger, default=0)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    phase: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    #: Attempts that ended before the task ran; they do not count against max_attempts.
    infra_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: spec.cancel was seen set (the reconcile turns it into a CancelRequested event).
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    #: Run.spec.ttlSecondsAfterFinished (None: the Task's, else the operator's default).
    ttl_seconds: Mapped[int | None] = mapped_column(Integer)
    #: The run's timer: when the leader must look at it again (back-off over, the Task's
    #: grace period over, a pod's start deadline, the TTL), None when nothing is due. A
    #: column of the run's row, so setting it costs nothing in a transition.
    wake_at: Mapped[datetime | None] = mapped_column()
    #: Condition type -> {"status": "True"|"False", "time": ISO}: lastTransitionTime of each
    #: condition, kept with the state so it survives restarts.
    condition_times: Mapped[dict[str, Any] | None] = mapped_column()
    reason: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[dict[str, Any] | None] = mapped_column()
    output: Mapped[Any | None] = mapped_column(JSONB(none_as_null=True))
    has_output: Mapped[bool] = mapped_column(Boolean, default=False)
    output_bytes: Mapped[int] = mapped_column(Integer, default=0)
    original_run_id: Mapped[str | None] = mapped_column(String(40))
    #: The run that triggered this one with ctx.trigger (durable execution), if any.
    parent_run_id: Mapped[str | None] = mapped_column(String(40))
    #: Pods that continued an attempt after a wait (they are not attempts).
    resumes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: The next pod continues the current attempt (the run was Waiting, or a resume pod
    #: never started).
    resuming: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    #: The checkpoint (its key) the run waits on while Waiting, or asked to suspend on.
    wait_key: Mapped[str | None] = mapped_column(String(300))
    resource_deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    #: spec.delaySeconds / spec.notBefore: not to start before this.
    not_before: Mapped[datetime | None] = mapped_column()
    #: spec.ttlSeconds: a run not started by then ends Expired.
    expires_at: Mapped[datetime | None] = mapped_column()
    #: spec.debounce (key, delaySeconds, mode, maxDelaySeconds), as the spec has it.
    debounce: Mapped[dict[str, Any] | None] = mapped_column()
    #: The Task version the run resolved against: {"uid", "generation", "image", "spec"}
    #: (the image its pods run; the spec as TaskSpec dumps it). Every attempt's pod and
    #: the retry policy come from it, so editing (or re-deploying) the Task while the run
    #: is under way does not change the run (control.catalogue.pinned).
    task_version: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())

    __table_args__ = (
        Index("ix_runs_created", "created_at", "id"),
        Index("ix_runs_task_created", "task", "created_at"),
        Index("ix_runs_phase", "phase"),
        Index("ix_runs_tags", "tags", postgresql_using="gin"),
        Index("ix_runs_original", "original_run_id", postgresql_where=text("original_run_id IS NOT NULL")),
        Index("ix_runs_finished", "finished_at", postgresql_where=text("finished_at IS NOT NULL")),
        Index("ix_runs_live", "namespace", postgresql_where=text("finished_at IS NULL")),
        Index("ix_runs_wake", "wake_at", postgresql_where=text("wake_at IS NOT NULL")),
        Index("ix_runs_parent", "parent_run_id", postgresql_where=text("parent_run_id IS NOT NULL")),
    )


class Attempt(Base):
    __tablename__ = "attempts"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    pod_name: Mapped[str] = mapped_column(String(253))
    token_hash: Mapped[str] = mapped_column(String(64))
    #: Set once the pod was created (None: granted, pod not created yet).
    pod_uid: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    exit_code: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[dict[str, Any] | None] = mapped_column()
    #: What the runner posted to /runner/v1/complete (None until it did), or
    #: ``{"suspended": true, "wait": key}`` once it registered a wait it suspends on.
    report: Mapped[dict[str, Any] | None] = mapped_column()
    #: This pod continued an attempt after a wait (a resume), rather than starting one.
    resume: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")

    __table_args__ = (Index("ix_attempts_token", "token_hash", unique=True),)


class LogLine(Base):
    __tablename__ = "logs"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    ts: Mapped[datetime] = mapped_column()
    level: Mapped[str] = mapped_column(String(16))
    stream: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)

    __table_args__ = (Index("ix_logs_run", "run_id", "id"), Index("ix_logs_ts", "ts"))


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    namespace: Mapped[str] = mapped_column(String(63), primary_key=True)
    task: Mapped[str] = mapped_column(String(63), primary_key=True)
    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(40))
    expires_at: Mapped[datetime] = mapped_column()


class Queue(Base):
    """One row per queue (``namespace/name``). Admission locks this row (FOR UPDATE) so
    every grant and release for a queue is serialised in the database, whichever operator
    process does it. ``running`` and ``queued`` are exact counters kept in the same
    transactions as the slots and entries they count."""

    __tablename__ = "queues"

    name: Mapped[str] = mapped_column(String(140), primary_key=True)
    concurrency_limit: Mapped[int | None] = mapped_column(Integer)
    per_key_limit: Mapped[int | None] = mapped_column(Integer)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Where the limits come from: "queue" (a Queue resource), "task" (inline) or "default".
    source: Mapped[str] = mapped_column(String(16), default="default")
    running: Mapped[int] = mapped_column(Integer, default=0)
    queued: Mapped[int] = mapped_column(Integer, default=0)
    #: Monotonic counter of grants; a key's ``last_served`` is the value at its last grant.
    grants: Mapped[int] = mapped_column(BigInteger, default=0)
    #: spec.rateLimit: pod starts per period (GCRA), per queue or per key (``rate_per_key``).
    rate_limit: Mapped[int | None] = mapped_column(Integer)
    rate_period: Mapped[float | None] = mapped_column(Float)
    rate_per_key: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    #: The bucket's theoretical arrival time (GCRA) when the bucket is the queue's.
    rate_tat: Mapped[datetime | None] = mapped_column()


class QueueKey(Base):
    """Per concurrency key bookkeeping of a queue (the key "" stands for no key)."""

    __tablename__ = "queue_keys"

    queue: Mapped[str] = mapped_column(String(140), primary_key=True)
    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    running: Mapped[int] = mapped_column(Integer, default=0)
    queued: Mapped[int] = mapped_column(Integer, default=0)
    last_served: Mapped[int] = mapped_column(BigInteger, default=0)
    #: Highest priority among this key's queued runs (meaningful when queued > 0).
    head_priority: Mapped[int] = mapped_column(Integer, default=0)
    #: The key's bucket's theoretical arrival time (GCRA) when the rate limit is per key.
    rate_tat: Mapped[datetime | None] = mapped_column()

    __table_args__ = (
        Index(
            "ix_queue_keys_pick",
            "queue",
            text("head_priority DESC"),
            "last_served",
            postgresql_where=text("queued > 0"),
        ),
    )


class QueueEntry(Base):
    """A run waiting for a slot."""

    __tablename__ = "queue_entries"

    run_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    queue: Mapped[str] = mapped_column(String(140))
    key: Mapped[str] = mapped_column(String(256))
    priority: Mapped[int] = mapped_column(Integer)
    #: First come, first served means first *created* (the Run's creation in the API
    #: server), not first seen by a handler: kopf handles Runs concurrently.
    arrival: Mapped[int] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(BigInteger, Identity())

    __table_args__ = (
        Index("ix_queue_entries_pick", "queue", "key", text("priority DESC"), "arrival", "seq"),
    )


class Slot(Base):
    """A granted slot: the run's attempt may have (or has) a live pod."""

    __tablename__ = "slots"

    run_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    queue: Mapped[str] = mapped_column(String(140))
    key: Mapped[str] = mapped_column(String(256))
    attempt: Mapped[int] = mapped_column(Integer)
    granted_at: Mapped[datetime] = mapped_column(server_default=func.now())

    __table_args__ = (Index("ix_slots_queue", "queue"),)


class Timer(Base):
    """A durable wake-up of something that is not a run (a run's own timer is
    ``runs.wake_at``): at ``due_at`` the leader reconciles ``key`` of ``kind``. One row per
    (kind, key); whoever handles it sets the next due time or deletes the row."""

    __tablename__ = "timers"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    due_at: Mapped[datetime] = mapped_column()

    __table_args__ = (Index("ix_timers_due", "due_at"),)


class Checkpoint(Base):
    """One entry of a run's journal (durable execution): a completed (or failed) step, a
    wait, a token, a child run triggered. A replaying pod reads the journal and gets each
    completed entry's ``result`` back without doing the work again.

    ``key`` is the call's name, with ``#n`` for the n-th repeat of a name in one run;
    ``position`` is the call's order among all journal calls of the run (what replay
    checks for determinism)."""

    __tablename__ = "checkpoints"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    #: step | sleep | event | token | token_wait | trigger | child
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(256))
    #: completed | failed (steps); waiting | satisfied | timed_out | canceled (waits, tokens)
    status: Mapped[str] = mapped_column(String(16))
    result: Mapped[Any | None] = mapped_column(JSONB(none_as_null=True))
    error: Mapped[dict[str, Any] | None] = mapped_column()
    #: The pod (attempt number) that recorded it.
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    #: Waits: when a sleep ends or a wait times out; tokens: when they expire.
    due_at: Mapped[datetime | None] = mapped_column()
    #: Event waits: the run's namespace, the event's name and the fields it must contain.
    namespace: Mapped[str | None] = mapped_column(String(63))
    event_name: Mapped[str | None] = mapped_column(String(256))
    match: Mapped[dict[str, Any] | None] = mapped_column()
    #: token_wait: the token's hash; child: the child run's id.
    ref: Mapped[str | None] = mapped_column(String(64))
    #: token: the SHA-256 of the token's id (the capability in its URL).
    token_hash: Mapped[str | None] = mapped_column(String(64))
    #: The event that satisfied an event wait (so one event resumes one wait of a run once).
    event_id: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        Index(
            "ix_checkpoints_event",
            "namespace",
            "event_name",
            postgresql_where=text("kind = 'event' AND status = 'waiting'"),
        ),
        Index("ix_checkpoints_ref", "ref", postgresql_where=text("status = 'waiting'")),
        Index(
            "ix_checkpoints_token", "token_hash", unique=True, postgresql_where=text("token_hash IS NOT NULL")
        ),
    )


class Event(Base):
    """An event sent to ``POST /api/v1/events``: stored before the answer, matched against
    open event waits then, and kept for ``event_retention_seconds`` so a wait registered
    shortly after still finds it."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    namespace: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(256))
    data: Mapped[dict[str, Any]] = mapped_column()
    received_at: Mapped[datetime] = mapped_column(server_default=func.now())
    #: Runs it resumed when it arrived.
    delivered: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (Index("ix_events_name", "namespace", "name", "received_at"),)


class DebounceEntry(Base):
    """The open burst of a debounce key (spec.debounce): the run that takes its triggers."""

    __tablename__ = "debounces"

    namespace: Mapped[str] = mapped_column(String(63), primary_key=True)
    task: Mapped[str] = mapped_column(String(63), primary_key=True)
    key: Mapped[str] = mapped_column(String(256), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(40))
    first_at: Mapped[datetime] = mapped_column()
    last_at: Mapped[datetime] = mapped_column()
    #: Triggers the run took (itself included).
    triggers: Mapped[int] = mapped_column(Integer, default=1)


class Schedule(Base):
    """One row per Schedule resource (``namespace/name``): when it fires next and what it
    did last. The leader's reconcile locks the row (FOR UPDATE) and writes the fires it
    decided, the next fire time and the schedule's timer in one transaction, so each fire
    time is decided once, whoever leads and however often the reconcile is repeated."""

    __tablename__ = "schedules"

    key: Mapped[str] = mapped_column(String(127), primary_key=True)
    namespace: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(63))
    #: The resource's uid: a Schedule deleted and created again is a new schedule.
    uid: Mapped[str] = mapped_column(String(64))
    #: The expression and zone the next fire time was computed from (a change recomputes it).
    cron: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64))
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    next_fire_at: Mapped[datetime | None] = mapped_column()
    #: The latest fire time decided, whatever came of it.
    last_fire_at: Mapped[datetime | None] = mapped_column()
    #: The fire time of the latest run (the next payload's lastTimestamp), and that run.
    last_run_fire_at: Mapped[datetime | None] = mapped_column()
    last_run_name: Mapped[str | None] = mapped_column(String(253))
    last_run_id: Mapped[str | None] = mapped_column(String(40))
    #: Fire times the overlap policy skipped, and fire times missed while no operator ran
    #: that catchUp did not run.
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    missed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())


class ScheduleFire(Base):
    """A fire time of a schedule and what came of it: the deduplication key of a fire.

    Written in the transaction that moves the schedule's next fire time past it, before
    the Run exists (``pending``); the Run's name is derived from the schedule's uid and
    the fire time, so creating it again after a crash or a fail-over finds the one Run.
    ``open`` rows are the schedule's runs that may be unfinished (what the overlap policy
    looks at); the reconcile closes them when their run has ended."""

    __tablename__ = "schedule_fires"

    schedule_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    fire_at: Mapped[datetime] = mapped_column(primary_key=True)
    #: The schedule's key (namespace/name).
    schedule: Mapped[str] = mapped_column(String(127))
    #: pending (its Run is to be created) | created | buffered (BufferOne: waits for the
    #: open runs to end) | skipped (by the overlap policy; with CancelPrevious, a later
    #: fire replaced it before its Run existed)
    state: Mapped[str] = mapped_column(String(16))
    #: Triggered by hand (``trigger-now``), not by the cron expression.
    manual: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The run's payload, fixed when the fire was decided (a repeated create sends the same).
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    run_name: Mapped[str | None] = mapped_column(String(253))
    run_id: Mapped[str | None] = mapped_column(String(40))
    open: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())

    __table_args__ = (
        Index("ix_schedule_fires_open", "schedule_uid", postgresql_where=text("open")),
        Index("ix_schedule_fires_run", "run_id", postgresql_where=text("run_id IS NOT NULL")),
        Index("ix_schedule_fires_created", "created_at"),
    )
