"""The public API's bodies (``/api/v1``): one pydantic model per request and response,
shared by the server (``kubetask.api``), the Python client and the CLI. docs/api.md
describes the endpoints; ``GET /api/v1/openapi.json`` is generated from these models.

Conventions:

- Field names on the wire are camelCase (aliases, as in :mod:`kubetask.spec`); Python code
  uses the snake_case attributes. Dump with ``model_dump(by_alias=True, mode="json")``.
- Requests forbid unknown fields (a typo is an error, not a silently ignored option);
  responses ignore them, so a client keeps working when the server learns new fields.
- The fields a trigger shares with a Run resource take their rules from
  :class:`kubetask.spec.RunSpec` (one source of truth), so what the API accepts and what
  ``kubectl apply`` accepts are the same thing.
- Times are ISO-8601 UTC strings with a ``Z`` (:func:`kubetask.protocol.iso`).
- Every error is :class:`ErrorResponse`.

This module imports only pydantic, the standard library, :mod:`kubetask.spec` and
:mod:`kubetask.protocol`: the client in the base package uses it without the operator's
dependencies.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from kubetask.engine.machine import TERMINAL
from kubetask.protocol import ErrorDetail, ErrorResponse, storable_size
from kubetask.spec import (
    MAX_PAYLOAD_BYTES,
    TAG_ITEM_SCHEMA,
    Debounce,
    QueueSpec,
    RateLimit,
    RunSpec,
    ScheduleSpec,
)

__all__ = [
    "BULK_MAX_RUNS",
    "MAX_BATCH_BODY_BYTES",
    "MAX_BATCH_ITEMS",
    "MAX_TRIGGER_BODY_BYTES",
    "PHASES",
    "TERMINAL_PHASES",
    "AttemptError",
    "AttemptInfo",
    "BatchTriggerRequest",
    "BatchTriggerResponse",
    "BulkCounts",
    "BulkProgress",
    "BulkRequest",
    "BulkSummary",
    "CancelResponse",
    "Checkpoint",
    "ErrorDetail",
    "ErrorResponse",
    "EventRequest",
    "EventResponse",
    "Health",
    "LogLine",
    "LogPage",
    "LogStreamEnd",
    "QueueItem",
    "QueueList",
    "QueueUpdate",
    "ReplayRequest",
    "ReplayResponse",
    "RequestProblem",
    "RunCounts",
    "RunDetail",
    "RunError",
    "RunList",
    "RunPhase",
    "RunSummary",
    "ScheduleItem",
    "ScheduleList",
    "ScheduleUpdate",
    "TaskItem",
    "TaskList",
    "TaskStats",
    "TokenCompleted",
    "TriggerRequest",
    "TriggerResponse",
    "request_problem",
    "storable",
]

# ---- limits -----------------------------------------------------------------------------

MAX_BATCH_ITEMS: Final = 1000
"""Most runs one ``POST .../batch`` triggers."""
MAX_EVENT_BYTES: Final = 1024 * 1024
"""Largest event data (and token completion body): compact JSON, UTF-8 bytes."""
MAX_TRIGGER_BODY_BYTES: Final = 2 * MAX_PAYLOAD_BYTES
"""Most bytes of one trigger body (a payload of :data:`kubetask.spec.MAX_PAYLOAD_BYTES`
and room for the rest)."""
MAX_BATCH_BODY_BYTES: Final = 16 * 1024 * 1024
"""Most bytes of one batch body, all items together."""
BULK_MAX_RUNS: Final = 10_000
"""Most runs one bulk cancel or replay acts on (the summary says when more matched)."""
IDEMPOTENCY_KEY_TTL_MAX_SECONDS: Final = 31_536_000
"""Longest ``idempotencyKeyTTLSeconds`` (a year)."""

RunPhase = Literal[
    "Pending",
    "Delayed",
    "Queued",
    "Running",
    "Retrying",
    "Waiting",
    "Succeeded",
    "Failed",
    "Canceled",
    "TimedOut",
    "Deduplicated",
    "Expired",
]
"""A run's phase (the engine's ``Phase``; a unit test keeps the two equal)."""
PHASES: Final[tuple[str, ...]] = get_args(RunPhase)
TERMINAL_PHASES: Final = frozenset(p.value for p in TERMINAL)
"""Phases a run never leaves."""

# ---- problems ---------------------------------------------------------------------------

#: Codes the request models report themselves, and the HTTP status of each; any other
#: validation failure is ``400 invalid_body``.
PROBLEM_STATUS: Final = {"invalid_body": 400, "payload_too_large": 413, "too_many_items": 413}


@dataclass(frozen=True, slots=True)
class RequestProblem:
    """Why a request body is not valid, as the API answers it: status, stable code, and a
    message that names the field (e.g. ``items[3].priority``) and says what to change."""

    status: int
    code: str
    message: str


def request_problem(exc: ValidationError) -> RequestProblem:
    """The first problem ``exc`` reports."""
    error = exc.errors(include_url=False)[0]
    where = _location(error["loc"])
    code = error["type"] if error["type"] in PROBLEM_STATUS else "invalid_body"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field; docs/api.md lists the fields"
    elif error["type"] == "missing":
        message = "is required"
    return RequestProblem(PROBLEM_STATUS[code], code, f"{where}: {message}" if where else message)


def _location(loc: Sequence[int | str]) -> str:
    where = ""
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else part
    return where


def storable(value: Any) -> bool:
    """Whether every string in a JSON value (keys too) can be stored by PostgreSQL: no NUL
    character, no lone UTF-16 surrogate."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                return False
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list | tuple):
            stack.extend(v)
    return True


def _check_storable(value: Any) -> Any:
    if not storable(value):
        raise ValueError(
            "has a NUL character (\\u0000) or a lone surrogate in a string; PostgreSQL cannot store it"
        )
    return value


# ---- bases ------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


def _rule(model: type[BaseModel], name: str) -> Any:
    """The field ``name`` of ``model`` with all its rules (bounds, pattern, default,
    description): declared once in :mod:`kubetask.spec`, reused here."""
    return copy.deepcopy(model.model_fields[name])


# ---- health ----------------------------------------------------------------------------


class Health(_Response):
    """The answer of ``GET /healthz`` when PostgreSQL answers: this replica is healthy.
    It also says what the replica knows about leadership (every replica is healthy,
    whether it leads or stands by)."""

    status: Literal["ok"] = "ok"
    identity: str = ""
    """This replica in the leader election (``<pod name>_<random>``)."""
    leader: bool = False
    """Whether this replica leads now (it reconciles: admits runs, creates pods...)."""
    lease: str | None = None
    """``namespace/name`` of the leader-election Lease; null without leader election."""
    lease_holder: str | None = None
    """The Lease's holder as this replica last saw it; null when nobody holds it or it
    has not been read yet."""


# ---- trigger ----------------------------------------------------------------------------


class TriggerRequest(_Request):
    """The body of ``POST /api/v1/namespaces/{namespace}/tasks/{task}/trigger`` (and one item
    of a batch): the Run to create. Every field is optional; the rules of the fields shared
    with a Run resource are :class:`kubetask.spec.RunSpec`'s."""

    payload: dict[str, Any] = _rule(RunSpec, "payload")
    concurrency_key: str | None = _rule(RunSpec, "concurrency_key")
    idempotency_key: str | None = _rule(RunSpec, "idempotency_key")
    idempotency_key_ttl_seconds: int | None = Field(
        None,
        alias="idempotencyKeyTTLSeconds",
        ge=1,
        le=IDEMPOTENCY_KEY_TTL_MAX_SECONDS,
        description="How long the idempotencyKey keeps another trigger (or Run) with the same key from "
        "creating a run; default: the operator's (24 h). Needs idempotencyKey.",
    )
    priority: int = _rule(RunSpec, "priority")
    tags: list[str] = _rule(RunSpec, "tags")
    max_attempts: int | None = _rule(RunSpec, "max_attempts")
    ttl_seconds_after_finished: int | None = _rule(RunSpec, "ttl_seconds_after_finished")
    delay_seconds: int | None = _rule(RunSpec, "delay_seconds")
    not_before: datetime | None = _rule(RunSpec, "not_before")
    ttl_seconds: int | None = _rule(RunSpec, "ttl_seconds")
    debounce: Debounce | None = _rule(RunSpec, "debounce")

    @field_validator("payload", "concurrency_key", "idempotency_key", "tags")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        return _check_storable(value)

    @field_validator("tags")
    @classmethod
    def _tag_items(cls, tags: list[str]) -> list[str]:
        low, high = int(str(TAG_ITEM_SCHEMA["minLength"])), int(str(TAG_ITEM_SCHEMA["maxLength"]))
        for i, tag in enumerate(tags):
            if not low <= len(tag) <= high:
                raise ValueError(f"tag {i} has {len(tag)} characters; each tag has {low} to {high}")
        return tags

    @field_validator("payload")
    @classmethod
    def _storable(cls, payload: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(payload, separators=(",", ":")).encode())
        if size > MAX_PAYLOAD_BYTES:
            raise PydanticCustomError(
                "payload_too_large",
                f"is {size} bytes as JSON; the limit is {MAX_PAYLOAD_BYTES} bytes: put large inputs in "
                "object storage and pass a reference",
            )
        return payload

    @model_validator(mode="after")
    def _ttl_with_key(self) -> TriggerRequest:
        if self.idempotency_key_ttl_seconds is not None and self.idempotency_key is None:
            raise ValueError("idempotencyKeyTTLSeconds needs an idempotencyKey")
        if self.delay_seconds is not None and self.not_before is not None:
            raise ValueError("give delaySeconds or notBefore, not both")
        if self.not_before is not None and self.not_before.tzinfo is None:
            raise ValueError("notBefore needs a time zone, e.g. 2026-12-01T09:00:00Z")
        return self

    def run_spec(self, task: str) -> RunSpec:
        """The spec of the Run resource this trigger creates."""
        return RunSpec.model_validate(
            {"task": task, **self.model_dump(exclude={"idempotency_key_ttl_seconds"}, exclude_none=True)}
        )


def duration_seconds(value: str | int | float | timedelta, what: str) -> int:
    """A duration for the client and the CLI: seconds, a ``timedelta``, or ``"20s"``,
    ``"5m"``, ``"2h"``, ``"1d"``, ``"1h30m"`` (resources take integer seconds)."""
    if isinstance(value, timedelta):
        return int(value.total_seconds())
    if isinstance(value, bool):
        raise TypeError(f"{what} must be seconds, a timedelta or a string like 20s, not a boolean")
    if isinstance(value, int | float):
        return int(value)
    parts = re.fullmatch(r"\s*(?:(\d+)d)?\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s?)?\s*", value)
    if not value.strip() or parts is None:
        raise ValueError(f"{what}={value!r} is not a duration; use seconds or 20s, 5m, 2h, 1d, 1h30m")
    d, h, m, s = (int(p or 0) for p in parts.groups())
    return ((d * 24 + h) * 60 + m) * 60 + s


class TriggerResponse(_Response):
    """The answer of a trigger: the run it created, or (``isCached``) the run that already
    holds the request's unexpired idempotencyKey, in which case nothing was created."""

    id: str
    """The run id (``run_...``): the key of every other ``/api/v1/runs/{id}`` endpoint."""
    name: str
    """The Run resource's name (``kubectl get run NAME``)."""
    namespace: str
    task: str
    is_cached: bool = False
    """True when an unexpired idempotencyKey returned an existing run instead of a new one."""


class BatchTriggerRequest(_Request):
    """The body of ``POST /api/v1/namespaces/{namespace}/tasks/{task}/batch``: 1 to
    :data:`MAX_BATCH_ITEMS` triggers of one task. Each item is idempotent by its own
    idempotencyKey, so a batch that failed half-way may be sent again as is."""

    items: list[TriggerRequest] = Field(..., min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _not_too_many(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("items"), list):
            count = len(data["items"])
            if count > MAX_BATCH_ITEMS:
                raise PydanticCustomError(
                    "too_many_items",
                    f"{count} items in one batch; send at most {MAX_BATCH_ITEMS} per request",
                )
        return data


class BatchTriggerResponse(_Response):
    """The answer of a batch: one :class:`TriggerResponse` per item, in the items' order."""

    items: list[TriggerResponse]


# ---- runs -------------------------------------------------------------------------------


class RunError(_Response):
    """Why a run (or an attempt) failed."""

    type: str
    """The exception's class name, or a reason such as ``TaskNotFound``."""
    message: str


class RunSummary(_Response):
    """A run as ``GET /api/v1/runs`` lists it."""

    id: str
    namespace: str
    name: str
    """The Run resource's name (it may have been deleted since: records outlive resources)."""
    task: str
    queue: str
    """``namespace/queue``."""
    phase: RunPhase
    attempt: int
    """The current (or last) attempt's number as the task counts it (``ctx.attempt.number``):
    pods that never ran the task and resumes after a wait are not attempts; 0 before the
    first one. ``attempts[]`` of a run's detail lists every pod."""
    max_attempts: int
    tags: list[str] = Field(default_factory=list)
    concurrency_key: str | None = None
    idempotency_key: str | None = None
    priority: int = 0
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    error: RunError | None = None
    reason: str = ""
    """The last transition's reason, e.g. ``Succeeded``, ``BackoffLimitExceeded``."""
    message: str = ""
    original_run_id: str | None = None
    """For a ``Deduplicated`` run: the run that holds its idempotencyKey."""
    parent_run_id: str | None = None
    """For a child run (``ctx.trigger``): the run that triggered it."""
    resumes: int = 0
    """Pods that continued an attempt after a durable wait (they are not attempts)."""


class AttemptError(RunError):
    """Why an attempt failed, as far as is known."""

    stack: str | None = None
    """The traceback the runner reported (without its own frames); null when the attempt
    ended without a report (OOM-killed, deleted, timed out...)."""
    types: list[str] = Field(default_factory=list)
    """The raised exception's class and its bases, most derived first, as
    ``module.QualifiedName``: what a Task's ``retry.nonRetryableErrors`` is matched
    against. Empty when the runner reported none."""


class AttemptInfo(_Response):
    """One attempt of a run (one pod)."""

    number: int
    pod_name: str
    created_at: str | None = None
    started_at: str | None = None
    """When the runner fetched the attempt (the task's code started)."""
    finished_at: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    error: AttemptError | None = None
    resume: bool = False
    """This pod resumed the attempt after a durable wait."""


class Checkpoint(_Response):
    """One entry of a run's journal (docs/durable.md): a step, a wait, a token, a child."""

    key: str
    name: str
    position: int
    kind: str
    """``step``, ``sleep``, ``event``, ``token``, ``token_wait``, ``trigger`` or ``child``."""
    status: str
    """Steps: ``completed`` or ``failed``; waits: ``waiting``, ``satisfied``, ``timed_out``,
    ``canceled``."""
    attempt: int
    """The pod (attempt number) that recorded it."""
    started_at: str | None = None
    finished_at: str | None = None
    due_at: str | None = None
    """Waits: when a sleep ends or the wait times out."""
    result: Any = None
    error: dict[str, Any] | None = None
    event: str | None = None
    match: dict[str, Any] | None = None
    ref: str | None = None
    """A child wait: the child run's id."""


class RunDetail(RunSummary):
    """One run, as ``GET /api/v1/runs/{id}`` returns it: the summary, its input, its output
    and its attempts."""

    payload: dict[str, Any] = Field(default_factory=dict)
    has_output: bool = False
    """Whether the task returned (``output`` may be null then: the task returned None)."""
    output_bytes: int = 0
    output: Any = None
    """The task's return value (any JSON value); null without one."""
    attempts: list[AttemptInfo] = Field(default_factory=list)
    """Ordered by number."""
    checkpoints: list[Checkpoint] = Field(default_factory=list)
    """The run's journal (steps, waits, tokens, children), by position."""
    waiting_for: str | None = None
    """While ``Waiting``: what the run waits for, in words."""


class RunList(_Response):
    """One page of ``GET /api/v1/runs``, newest first."""

    items: list[RunSummary]
    next_cursor: str | None = None
    """Pass as ``cursor`` for the next page; null on the last page."""


class LogLine(_Response):
    """One log line of a run, as stored."""

    id: int
    """Increasing in the order lines arrived: pass the last one as ``after`` to continue."""
    attempt: int
    ts: str
    level: str
    stream: str
    """``log``, ``stdout`` or ``stderr``."""
    message: str


class LogPage(_Response):
    """The answer of ``GET /api/v1/runs/{id}/logs`` (without ``follow``)."""

    items: list[LogLine]
    next: int | None = None
    """The id of the last line returned (or the ``after`` given when there is nothing new)."""


class LogStreamEnd(_Response):
    """The last line of ``GET /api/v1/runs/{id}/logs?follow=true`` (every line before it is a
    :class:`LogLine`): the run ended and every line it logged was sent."""

    end: Literal[True] = True
    phase: RunPhase
    """The run's final phase."""


class CancelResponse(_Response):
    """The answer of ``POST /api/v1/runs/{id}/cancel``: ``spec.cancel`` is set on the Run
    resource; the operator stops the run (its pod, if any) shortly after."""

    id: str
    name: str
    namespace: str
    phase: RunPhase
    """The phase when the cancel was requested (``Canceled`` comes later)."""
    cancel_requested: bool = True


class ReplayRequest(_Request):
    """The optional body of ``POST /api/v1/runs/{id}/replay``: what to change in the replay
    (without a body, or with ``{}``, it is the original's)."""

    payload: dict[str, Any] | None = Field(
        None, description="The replay's payload instead of the original's (a JSON object, at most 256 KiB)."
    )

    @field_validator("payload")
    @classmethod
    def _payload(cls, payload: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if payload is None else TriggerRequest._storable(_check_storable(payload))


class ReplayResponse(_Response):
    """The answer of ``POST /api/v1/runs/{id}/replay``: a new run of the same task with the
    same payload, labelled ``kubetask.dev/replay-of: <original id>``."""

    id: str
    """The new run's id."""
    name: str
    namespace: str
    task: str
    replay_of: str
    """The original run's id."""


# ---- bulk -------------------------------------------------------------------------------


class BulkRequest(_Request):
    """The body of ``POST /api/v1/runs/cancel`` and ``POST /api/v1/runs/replay``: the filters
    of ``GET /api/v1/runs`` (all of them must match; a list matches any of its values; tags
    must all be present). At least one filter is required. Bulk cancel acts only on runs
    that have not finished; it skips the others."""

    task: list[str] = Field(default_factory=list, description="Task names (any of them).")
    phase: list[RunPhase] = Field(default_factory=list, description="Phases (any of them).")
    tag: list[str] = Field(default_factory=list, description="Tags (all of them).")
    namespace: list[str] = Field(
        default_factory=list,
        description="Namespaces (any of them); default: every namespace the caller may act in.",
    )
    since: str | None = Field(
        None, description="Created at or after: ISO-8601, or a duration before now like 24h, 7d."
    )
    until: str | None = Field(None, description="Created before: ISO-8601, or a duration before now.")
    parent: str | None = Field(None, max_length=40, description="Children of this run (ctx.trigger).")
    limit: int = Field(
        BULK_MAX_RUNS, ge=1, le=BULK_MAX_RUNS, description="Most runs to act on, newest first."
    )
    dry_run: bool = Field(
        False,
        description="Change nothing: answer only the summary, whose matched counts the runs it would act on.",
    )

    @field_validator("task", "phase", "tag", "namespace", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any, info: ValidationInfo) -> Any:
        """A string is a comma-separated list, as in the query string of ``GET /api/v1/runs``;
        phases are case-insensitive there too."""
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if info.field_name == "phase" and isinstance(value, list):
            known = {p.lower(): p for p in PHASES}
            value = [known.get(v.lower(), v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("task", "tag", "namespace", "since", "until")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        return _check_storable(value)

    @model_validator(mode="after")
    def _some_filter(self) -> BulkRequest:
        if not (
            self.task or self.phase or self.tag or self.namespace or self.since or self.until or self.parent
        ):
            raise ValueError(
                "a bulk action needs at least one filter (task, phase, tag, namespace, since, until)"
            )
        return self


class BulkProgress(_Response):
    """One NDJSON line of a bulk action, sent as each run is done."""

    done: int
    """Runs handled so far, this one included."""
    total: int
    """Runs the filters matched (at most the request's ``limit``)."""
    run_id: str
    result: Literal["canceled", "replayed", "skipped", "failed"]
    """``skipped``: nothing to do (already finished, or its resource is gone)."""
    message: str = ""
    new_run_id: str | None = None
    """Replay only: the new run's id."""


class BulkCounts(_Response):
    """How a bulk action went, run by run."""

    matched: int
    """Runs the filters matched and the caller may act on (at most ``limit``)."""
    succeeded: int
    """Canceled, or replayed."""
    skipped: int
    failed: int
    truncated: bool = False
    """More runs matched than ``limit``: send the request again for the rest."""
    denied_namespaces: list[str] = Field(default_factory=list)
    """Namespaces with matching runs that the caller may not act in (left alone)."""


class BulkSummary(_Response):
    """The last NDJSON line of a bulk action."""

    done: int
    total: int
    summary: BulkCounts


# ---- tasks and queues -------------------------------------------------------------------


class RunCounts(_Response):
    """Runs that have not finished, by phase (from PostgreSQL, exact)."""

    pending: int = 0
    queued: int = 0
    running: int = 0
    retrying: int = 0


class TaskStats(_Response):
    """A Task's runs created since ``since`` (``GET .../tasks?since=``, default 24 h), from
    PostgreSQL: how many, how they ended, how long the finished ones took."""

    since: str
    runs: int = 0
    """Runs created since then, whatever their phase."""
    succeeded: int = 0
    failed: int = 0
    """Ended ``Failed``, ``TimedOut`` or ``Expired``."""
    success_rate: float | None = None
    """``succeeded / (succeeded + failed)``; null before any run ended either way."""
    p50_seconds: float | None = None
    """Median time from start to end of the runs that succeeded or failed; null without one."""
    p95_seconds: float | None = None


class TaskItem(_Response):
    """A Task resource as ``GET /api/v1/namespaces/{namespace}/tasks`` lists it, with its
    live run counts and its recent runs' statistics."""

    name: str
    namespace: str
    queue: str
    """The queue's name (in the same namespace)."""
    image: str | None = None
    """``spec.image``; null: the operator's default runner image."""
    entrypoint: str | None = None
    inline_source: bool = False
    """The Task carries its code in ``spec.source``."""
    max_attempts: int
    max_duration_seconds: int | None = None
    ready: bool | None = None
    """The Task's Ready condition (null before the operator looked at it)."""
    message: str = ""
    created_at: str | None = None
    runs: RunCounts = Field(default_factory=RunCounts)
    recent: TaskStats | None = None


class TaskList(_Response):
    """The answer of ``GET /api/v1/namespaces/{namespace}/tasks``, by name."""

    items: list[TaskItem]


class QueueItem(_Response):
    """A queue with its effective limits and live counts."""

    name: str
    namespace: str
    concurrency_limit: int | None = None
    """Most runs with a live pod at once; null: unlimited."""
    per_key_concurrency_limit: int | None = None
    paused: bool = False
    rate_limit: RateLimit | None = None
    """Pod starts per period (a token bucket), if limited."""
    source: Literal["queue", "task", "default"] = "default"
    """Where the limits come from: a Queue resource, a Task's inline ``spec.queue``, or none."""
    has_resource: bool = False
    """A Queue resource of this name exists."""
    running: int = 0
    """Runs holding a slot (a pod is alive or about to be)."""
    queued: int = 0
    """Runs waiting for a slot."""


class QueueList(_Response):
    """The answer of ``GET /api/v1/namespaces/{namespace}/queues``, by name: every queue the
    namespace's Tasks or Queue resources name."""

    items: list[QueueItem]


class QueueUpdate(_Request):
    """The body of ``PATCH /api/v1/namespaces/{namespace}/queues/{queue}``: what to change in
    the Queue resource (created if missing, starting from the queue's current limits).
    An absent field is left as is; ``null`` removes a limit. Rules: :class:`kubetask.spec.QueueSpec`."""

    paused: bool | None = Field(None, description="Paused queues admit nothing; running pods continue.")
    concurrency_limit: int | None = _rule(QueueSpec, "concurrency_limit")
    per_key_concurrency_limit: int | None = _rule(QueueSpec, "per_key_concurrency_limit")

    @model_validator(mode="after")
    def _something(self) -> QueueUpdate:
        if not self.model_fields_set:
            raise ValueError("send at least one of paused, concurrencyLimit, perKeyConcurrencyLimit")
        if "paused" in self.model_fields_set and self.paused is None:
            raise ValueError("paused must be true or false")
        return self

    def spec_patch(self) -> dict[str, Any]:
        """The merge patch of the Queue's ``spec`` (camelCase; null removes)."""
        return self.model_dump(by_alias=True, include=self.model_fields_set)


# ---- schedules ------------------------------------------------------------------------------


class ScheduleItem(_Response):
    """A Schedule: its spec, and when it fires (from PostgreSQL, where the leader keeps it)."""

    name: str
    namespace: str
    task: str
    cron: str
    timezone: str = "UTC"
    paused: bool = False
    overlap_policy: str = "Allow"
    catch_up: str = "Latest"
    starting_deadline_seconds: int | None = None
    payload: dict[str, Any] = Field(default_factory=dict)
    next_fire_time: str | None = None
    """The next fire time (null: paused, not looked at by the operator yet, or invalid)."""
    last_fire_time: str | None = None
    """The latest fire time the operator acted on (run, skipped or buffered)."""
    upcoming: list[str] = Field(default_factory=list)
    """The next fire times (as a run's payload lists them)."""
    last_run: str | None = None
    """The name of the latest Run it created."""
    last_run_id: str | None = None
    active_runs: list[str] = Field(default_factory=list)
    """Its runs that have not finished (names), oldest first."""
    skipped: int = 0
    """Fire times the overlap policy skipped."""
    missed: int = 0
    """Fire times missed while no operator ran that catchUp did not run."""
    ready: bool | None = None
    """The Schedule's Ready condition (false: an invalid expression or time zone)."""
    message: str = ""
    created_at: str | None = None


class ScheduleList(_Response):
    """The answer of ``GET /api/v1/namespaces/{namespace}/schedules``, by name."""

    items: list[ScheduleItem]


class ScheduleUpdate(_Request):
    """The body of ``PATCH /api/v1/namespaces/{namespace}/schedules/{name}``: pause or resume
    (a merge patch of the Schedule's ``spec.paused``)."""

    paused: bool = _rule(ScheduleSpec, "paused")

    @model_validator(mode="before")
    @classmethod
    def _given(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("paused") is None:
            raise ValueError("send paused: true (pause) or false (resume)")
        return data


# ---- durable execution: events and tokens -------------------------------------------------


class EventRequest(_Request):
    """The body of ``POST /api/v1/events``: resumes every run of ``namespace`` waiting for
    ``name`` whose ``match`` the ``data`` contains (and waits registered within the event
    retention window afterwards)."""

    name: str = Field(min_length=1, max_length=256)
    namespace: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("data")
    @classmethod
    def _storable(cls, value: dict[str, Any]) -> dict[str, Any]:
        storable_size(value, limit=MAX_EVENT_BYTES, what="data", invalid="invalid", too_large="too_large")
        return value


class EventResponse(_Response):
    """An event was stored (before this answer: it survives a restart)."""

    id: int
    name: str
    namespace: str
    resumed: int
    """Waiting runs it satisfied now (more may match it later, within the retention window)."""


class TokenCompleted(_Response):
    """The answer of ``POST /api/v1/tokens/{id}/complete``."""

    id: str
    run_id: str
    resumed: bool
    """Whether a run was waiting for the token (else it gets the result when it waits)."""
