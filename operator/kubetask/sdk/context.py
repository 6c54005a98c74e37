"""What a task knows about the attempt it runs in: ``ctx`` in ``fn(payload, ctx)``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from kubetask.sdk.durable import Durable, LocalTransport, Timeout, Token, seconds
from kubetask.sdk.logging import TASK_LOGGER_NAME

__all__ = ["AttemptInfo", "RunInfo", "SyncContext", "TaskContext", "TaskInfo", "Token"]

#: wait_for_event's timeout when none is given.
DEFAULT_EVENT_TIMEOUT = timedelta(days=30)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RunInfo:
    """The Run being executed."""

    id: str
    """The run's id (stable across attempts; the Run resource's UID-like identifier)."""
    name: str
    """The Run resource's name (``kubectl get runs <name>``)."""
    namespace: str = ""
    """The namespace of the Run (empty when unknown, e.g. in local tests)."""
    tags: tuple[str, ...] = ()
    """The Run's ``spec.tags``."""


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """The Task the run belongs to."""

    id: str
    """The Task's id (the Task resource's name)."""


@dataclass(frozen=True, slots=True)
class AttemptInfo:
    """This attempt of the run."""

    number: int
    """Which attempt this is, counting from 1."""
    max_attempts: int
    """How many attempts the run may have in all (the first one included)."""

    @property
    def is_last(self) -> bool:
        """True when no retry follows if this attempt fails."""
        return self.number >= self.max_attempts


@dataclass(frozen=True, slots=True)
class TaskContext:
    """Passed to every task as its second argument.

    >>> ctx.run.id, ctx.run.name, ctx.run.tags
    >>> ctx.task.id
    >>> ctx.attempt.number, ctx.attempt.max_attempts
    >>> ctx.logger.info("hello")

    The runner builds it from the operator's answer for the attempt; tests can build one
    directly (see :meth:`TaskContext.local`).
    """

    run: RunInfo
    task: TaskInfo
    attempt: AttemptInfo
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger(TASK_LOGGER_NAME))
    """The ``kubetask.task`` logger; the runner ships its records to the run's logs."""
    durable: Durable = field(default_factory=lambda: Durable(LocalTransport()), repr=False, compare=False)
    """The run's journal (the runner connects it to the operator; locally it is in memory)."""

    # ---- durable execution (docs/durable.md) ------------------------------------------------

    async def step(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` (sync or async) once per run: its JSON result is stored
        before this returns, and a later attempt or resume gets the stored result without
        calling ``fn``. A name used twice gets an index in call order. An exception is
        recorded and raised (the step is not complete: a retry runs it again)."""
        return await self.durable.step(name, fn, *args, **kwargs)

    async def wait_for(self, seconds: Timeout, *, name: str = "wait_for") -> None:
        """Durable sleep: ``seconds`` (a number or a timedelta). Longer than the operator's
        ``wait_keep_pod_seconds`` (10 s), the pod exits and the run waits without a pod
        or a queue slot; a new pod resumes it."""
        await self.durable.sleep(name, duration=_secs(seconds, "seconds"))

    async def wait_until(self, when: datetime, *, name: str = "wait_until") -> None:
        """Durable sleep until ``when`` (timezone-aware)."""
        await self.durable.sleep(name, until=when)

    # The SDK's names are fixed (docs/durable.md): ``timeout`` is a durable deadline in
    # PostgreSQL, not an asyncio timeout, hence the noqa.
    async def wait_for_event(
        self,
        name: str,
        match: dict[str, Any] | None = None,
        *,
        timeout: Timeout = DEFAULT_EVENT_TIMEOUT,  # noqa: ASYNC109
    ) -> Any:
        """Suspend until an event ``name`` arrives in the run's namespace whose data
        contains every field of ``match`` (JSON containment), and return its data; raise
        :class:`~kubetask.WaitTimeout` after ``timeout`` (default 30 days)."""
        return await self.durable.wait_for_event(name, match, _secs(timeout), name)

    async def create_token(self, *, timeout: Timeout, name: str = "token") -> Token:  # noqa: ASYNC109
        """A completion token: ``token.url`` accepts one POST of JSON until ``timeout``."""
        return await self.durable.create_token(name, _secs(timeout))

    async def wait_for_token(self, token: Token, *, name: str = "token") -> Any:
        """Suspend until someone POSTs JSON to ``token.url`` and return it; raise
        :class:`~kubetask.WaitTimeout` when the token expires first."""
        return await self.durable.wait_for_token(token, name)

    async def trigger(self, task: str, payload: Any = None, **options: Any) -> str:
        """Start a child run of ``task`` (in this run's namespace) once, however often this
        run is retried or resumed; return its run id. Options: ``concurrencyKey``,
        ``idempotencyKey``, ``priority``, ``tags``, ``maxAttempts`` (or snake_case)."""
        return await self.durable.trigger(task, payload, _options(options))

    async def trigger_and_wait(self, task: str, payload: Any = None, **options: Any) -> Any:
        """Start a child run (once) and suspend until it ends: return its output, or raise
        :class:`~kubetask.ChildRunFailed` with its error."""
        return await self.durable.trigger_and_wait(task, payload, _options(options))

    @property
    def sync(self) -> SyncContext:
        """The same calls for sync tasks (``def`` tasks run in a thread):
        ``ctx.sync.step(...)``, ``ctx.sync.wait_for_event(...)``, ..."""
        return SyncContext(self)

    @classmethod
    def local(
        cls,
        task_id: str = "local",
        *,
        run_id: str = "local",
        run_name: str = "local",
        namespace: str = "",
        tags: tuple[str, ...] | list[str] = (),
        attempt: int = 1,
        max_attempts: int = 1,
    ) -> TaskContext:
        """A context for calling a task outside a cluster (unit tests, a REPL)."""
        return cls(
            run=RunInfo(id=run_id, name=run_name, namespace=namespace, tags=tuple(tags)),
            task=TaskInfo(id=task_id),
            attempt=AttemptInfo(number=attempt, max_attempts=max_attempts),
        )


def _secs(value: Timeout, what: str = "timeout") -> float:
    return seconds(value, what)


_OPTION_NAMES = {
    "concurrency_key": "concurrencyKey",
    "idempotency_key": "idempotencyKey",
    "max_attempts": "maxAttempts",
}


def _options(options: dict[str, Any]) -> dict[str, Any]:
    out = {_OPTION_NAMES.get(k, k): v for k, v in options.items()}
    allowed = {"concurrencyKey", "idempotencyKey", "priority", "tags", "maxAttempts"}
    unknown = sorted(set(out) - allowed)
    if unknown:
        raise TypeError(f"unknown trigger option(s) {unknown}; allowed: {sorted(allowed)}")
    return out


class SyncContext:
    """``ctx.sync``: the durable calls of :class:`TaskContext` for sync tasks, which run in
    a thread without an event loop (each call runs to completion there)."""

    def __init__(self, ctx: TaskContext) -> None:
        self._ctx = ctx

    @staticmethod
    def _run(coro: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        coro.close()
        raise RuntimeError("ctx.sync is for sync (def) tasks; in an async task, await ctx.step(...) etc.")

    def step(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return self._run(self._ctx.step(name, fn, *args, **kwargs))

    def wait_for(self, seconds: Timeout, *, name: str = "wait_for") -> None:
        self._run(self._ctx.wait_for(seconds, name=name))

    def wait_until(self, when: datetime, *, name: str = "wait_until") -> None:
        self._run(self._ctx.wait_until(when, name=name))

    def wait_for_event(
        self, name: str, match: dict[str, Any] | None = None, *, timeout: Timeout = DEFAULT_EVENT_TIMEOUT
    ) -> Any:
        return self._run(self._ctx.wait_for_event(name, match, timeout=timeout))

    def create_token(self, *, timeout: Timeout, name: str = "token") -> Token:
        return self._run(self._ctx.create_token(timeout=timeout, name=name))

    def wait_for_token(self, token: Token, *, name: str = "token") -> Any:
        return self._run(self._ctx.wait_for_token(token, name=name))

    def trigger(self, task: str, payload: Any = None, **options: Any) -> str:
        return self._run(self._ctx.trigger(task, payload, **options))

    def trigger_and_wait(self, task: str, payload: Any = None, **options: Any) -> Any:
        return self._run(self._ctx.trigger_and_wait(task, payload, **options))
