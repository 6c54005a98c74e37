"""Durable execution inside a task: the journal behind ``ctx.step``, ``ctx.wait_*``,
``ctx.create_token`` and ``ctx.trigger*`` (docs/durable.md).

Every call gets a key (its kind and name, ``#n`` for the n-th repeat of that name in the
run) and a position (its order among the run's calls). A replaying pod reads the run's
journal once and answers calls that completed before from it; the first call that did
not complete runs for real. A call whose position holds a different call in the journal
means the code between steps is not deterministic: :class:`ReplayMismatch`.

The :class:`Transport` is the runner API in a pod (:mod:`kubetask.runner.journal`), or
:class:`LocalTransport` outside a cluster (``TaskContext.local()``: steps run, sleeps
sleep, the rest needs a cluster).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from pydantic import ValidationError

from kubetask.protocol import (
    MAX_WAIT_SECONDS,
    ChildRequest,
    ChildResponse,
    ErrorInfo,
    JournalEntry,
    StepRecord,
    TokenRequest,
    TokenResponse,
    WaitRequest,
    WaitResponse,
    problem,
)
from kubetask.sdk.errors import ChildRunFailed, ReplayMismatch, Suspended, WaitTimeout

__all__ = ["Durable", "LocalTransport", "Token", "Transport", "seconds"]

Timeout = float | int | timedelta


def seconds(value: Timeout, what: str = "timeout") -> float:
    """A timeout in seconds: a number of seconds or a ``timedelta``."""
    if isinstance(value, timedelta):
        out = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        out = float(value)
    else:
        raise TypeError(f"{what} must be seconds (int or float) or a timedelta, not {type(value).__name__}")
    if not 0 <= out <= MAX_WAIT_SECONDS:
        raise ValueError(
            f"{what} must be between 0 and {MAX_WAIT_SECONDS} seconds (a year and a day), not {out}"
        )
    return out


@dataclass(frozen=True, slots=True)
class Token:
    """A completion token: POST JSON to ``url`` and ``ctx.wait_for_token(token)`` returns it."""

    id: str
    url: str
    expires_at: datetime


class Transport(Protocol):
    """How the journal reaches the run's state (blocking calls; run in a worker thread)."""

    def journal(self) -> list[JournalEntry]: ...
    def record_step(self, body: StepRecord) -> None: ...
    def wait(self, body: WaitRequest) -> WaitResponse: ...
    def token(self, body: TokenRequest) -> TokenResponse: ...
    def child(self, body: ChildRequest) -> ChildResponse: ...


class Durable:
    """The journal of one pod of a run (one per TaskContext)."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._entries: dict[str, JournalEntry] | None = None
        self._by_position: dict[int, JournalEntry] = {}
        self._counts: dict[str, int] = {}
        self._position = 0
        # Calls from several threads (sync tasks) or tasks are numbered one at a time.
        self._lock = threading.Lock()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def _load(self) -> dict[str, JournalEntry]:
        if self._entries is None:
            entries = await self._call(self._transport.journal)
            self._entries = {e.key: e for e in entries}
            self._by_position = {e.position: e for e in entries}
        return self._entries

    def _next(self, kind: str, name: str) -> tuple[str, int]:
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ValueError(
                f"a {kind} name must be a non-empty string of at most 200 characters, not {name!r}"
            )
        with self._lock:
            base = f"{kind}:{name}"
            n = self._counts.get(base, 0) + 1
            self._counts[base] = n
            position = self._position
            self._position += 1
        return (base if n == 1 else f"{base}#{n}"), position

    async def _recorded(self, kind: str, name: str) -> tuple[str, int, JournalEntry | None]:
        """The key and position of this call, and what the journal holds for it."""
        key, position = self._next(kind, name)
        entries = await self._load()
        at = self._by_position.get(position)
        if at is not None and at.key != key:
            raise ReplayMismatch(
                f"this run's journal has {at.kind} {at.name!r} (key {at.key!r}) at position {position}, "
                f"but this replay calls {kind} {name!r} there. Code between steps runs again on every "
                "replay and must call the same steps and waits in the same order: move anything that "
                "depends on time, randomness or outside state into a step"
            )
        return key, position, entries.get(key)

    # ---- steps ----------------------------------------------------------------------------

    async def step(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        key, position, done = await self._recorded("step", name)
        if done is not None and done.status == "completed":
            return done.result
        started = datetime.now(UTC)
        try:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            failed = StepRecord(
                key=key,
                name=name,
                position=position,
                status="failed",
                error=ErrorInfo(
                    type=type(exc).__name__,
                    message=str(exc) or type(exc).__name__,
                    stack="".join(traceback.format_exception(exc)),
                ),
                started_at=started,
            )
            await self._call(self._transport.record_step, failed)
            raise
        try:
            stored = json.loads(json.dumps(result, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"step {name!r} returned a value that is not JSON: {exc}") from None
        try:
            record = StepRecord(
                key=key, name=name, position=position, status="completed", result=stored, started_at=started
            )
        except ValidationError as exc:
            raise ValueError(problem(exc).message) from None
        await self._call(self._transport.record_step, record)
        return stored

    # ---- waits ----------------------------------------------------------------------------

    async def _wait(self, kind: str, name: str, **fields: Any) -> WaitResponse:
        key, position, done = await self._recorded(kind, name)
        if done is not None and done.status in ("satisfied", "timed_out"):
            return WaitResponse.model_validate({"status": done.status, "result": done.result})
        body = WaitRequest.model_validate(
            {"key": key, "name": name, "position": position, "kind": kind, **fields}
        )
        while True:
            answer: WaitResponse = await self._call(self._transport.wait, body)
            if answer.suspend or answer.status == "canceled":
                raise Suspended(f"waiting for {kind} {name!r}")
            if answer.status != "waiting":
                return answer
            # A short sleep: slept here (the pod keeps its slot), then asked again.
            due = answer.due_at or datetime.now(UTC)
            await asyncio.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds()))

    async def sleep(self, name: str, *, duration: float | None = None, until: datetime | None = None) -> None:
        if until is not None:
            if until.tzinfo is None:
                raise ValueError("wait_until needs a timezone-aware datetime (e.g. datetime.now(UTC) + ...)")
            await self._wait("sleep", name, until=until)
        else:
            await self._wait("sleep", name, seconds=duration)

    async def wait_for_event(self, event: str, match: dict[str, Any] | None, limit: float, name: str) -> Any:
        answer = await self._wait("event", name, event=event, match=match or {}, timeoutSeconds=limit)
        if answer.status == "timed_out":
            raise WaitTimeout(f"no event {event!r} matching {match or {}} came within {limit:g}s", name=name)
        return answer.result

    async def create_token(self, name: str, valid_for: float) -> Token:
        key, position, done = await self._recorded("token", name)
        if done is not None:
            made = done.result or {}
            return Token(id=made["id"], url=made["url"], expires_at=done.due_at or datetime.now(UTC))
        answer: TokenResponse = await self._call(
            self._transport.token,
            TokenRequest(key=key, name=name, position=position, timeout_seconds=valid_for),
        )
        return Token(id=answer.id, url=answer.url, expires_at=answer.expires_at)

    async def wait_for_token(self, token: Token, name: str) -> Any:
        answer = await self._wait("token_wait", name, tokenId=token.id)
        if answer.status == "timed_out":
            raise WaitTimeout(
                f"token {name!r} expired at {token.expires_at.isoformat()} before completion", name=name
            )
        return answer.result

    # ---- child runs -----------------------------------------------------------------------

    async def trigger(self, task: str, payload: Any, options: dict[str, Any]) -> str:
        key, position, done = await self._recorded("trigger", task)
        if done is not None and done.status == "completed":
            return str((done.result or {})["runId"])
        body = ChildRequest.model_validate(
            {"key": key, "name": task, "position": position, "task": task, "payload": payload, **options}
        )
        answer: ChildResponse = await self._call(self._transport.child, body)
        return answer.run_id

    async def trigger_and_wait(self, task: str, payload: Any, options: dict[str, Any]) -> Any:
        run_id = await self.trigger(task, payload, options)
        answer = await self._wait("child", task, childRunId=run_id)
        result = answer.result or {}
        if result.get("phase") != "Succeeded":
            raise ChildRunFailed(run_id, str(result.get("phase") or "Failed"), result.get("error"))
        return result.get("output")


class LocalTransport:
    """The journal in memory, for ``TaskContext.local()``: steps run and are remembered,
    sleeps sleep; events, tokens and child runs need a cluster."""

    def __init__(self) -> None:
        self.entries: dict[str, JournalEntry] = {}
        self._due: dict[str, datetime] = {}

    def journal(self) -> list[JournalEntry]:
        return list(self.entries.values())

    def record_step(self, body: StepRecord) -> None:
        self.entries[body.key] = JournalEntry(
            key=body.key,
            name=body.name,
            position=body.position,
            kind="step",
            status=body.status,
            result=body.result,
            error=body.error,
        )

    def wait(self, body: WaitRequest) -> WaitResponse:
        if body.kind != "sleep":
            raise RuntimeError(
                f"ctx.{'wait_for_event' if body.kind == 'event' else body.kind} needs a cluster: "
                "TaskContext.local() runs steps and sleeps only"
            )
        # Registered once per key, like the runner API: asking again never moves the end.
        due = self._due.setdefault(
            body.key, body.until or datetime.now(UTC) + timedelta(seconds=body.seconds or 0)
        )
        if due <= datetime.now(UTC):
            return WaitResponse(status="satisfied")
        return WaitResponse(status="waiting", due_at=due)

    def token(self, body: TokenRequest) -> TokenResponse:
        raise RuntimeError("ctx.create_token needs a cluster: TaskContext.local() runs steps and sleeps only")

    def child(self, body: ChildRequest) -> ChildResponse:
        raise RuntimeError("ctx.trigger needs a cluster: TaskContext.local() runs steps and sleeps only")
