"""The ``@task`` decorator and the hints it carries (:class:`Retry`, :class:`Queue`).

A task is a function ``fn(payload: dict, ctx: TaskContext)``, sync or async, whose
return value (any JSON) becomes the run's output::

    from kubetask import task, Retry

    @task(id="hello", retry=Retry(max_attempts=5))
    async def hello(payload: dict, ctx: TaskContext) -> dict:
        return {"greeting": f"hello {payload['name']}"}

The Task *resource* in the cluster is authoritative for retries, queues and deadlines;
the values given to the decorator are hints that tooling (e.g. ``kubetask`` commands that
generate a Task from code) may copy into it. The runner uses the decorator's ``id``, to
check it names the Task the pod was started for, and its ``catch_error`` hook (code, not
a hint: it runs in the pod when the task raises; :mod:`kubetask.sdk.retry`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
from collections.abc import Callable
from typing import Annotated, Any, Self, overload

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from kubetask.sdk.context import TaskContext
from kubetask.sdk.retry import CatchError, RetryDecision

__all__ = [
    "OutOfMemory",
    "Queue",
    "Retry",
    "TaskDefinition",
    "TaskFunction",
    "task",
    "validate_task_id",
]

#: What ``@task`` accepts: ``fn(payload, ctx)`` returning a JSON value or an awaitable of one.
TaskFunction = Callable[[dict[str, Any], TaskContext], Any]

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_MAX_ID_LENGTH = 63
# The same rules as kubetask.spec (which the SDK does not import: it needs no operator).
_ERROR_TYPE = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


def validate_task_id(value: str) -> str:
    """Return ``value`` if it is a valid task id (a DNS-1123 label), else raise ``ValueError``.

    A valid id is 1 to 63 characters of lowercase letters, digits and ``-``, starting
    and ending with a letter or digit: it is the name of the Task resource.
    """
    if not isinstance(value, str):
        raise TypeError(f"task id must be a string, not {type(value).__name__}")
    if not 1 <= len(value) <= _MAX_ID_LENGTH or not _DNS1123_LABEL.match(value):
        raise ValueError(
            f"invalid task id {value!r}: use 1-{_MAX_ID_LENGTH} lowercase letters, digits and '-', "
            "starting and ending with a letter or digit (a Kubernetes DNS-1123 label)"
        )
    return value


class _Hint(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class OutOfMemory(_Hint):
    """What changes for the attempts after one that was OOM-killed (``Retry.out_of_memory``)."""

    resources: dict[str, Any]
    """Container resources merged over the pod template's, key by key, e.g.
    ``{"limits": {"memory": "1Gi"}}``."""


class Retry(_Hint):
    """How failed attempts should be retried (a hint; the Task resource's ``spec.retry`` wins).

    The delay before attempt n+1 is ``min(max_timeout_ms, min_timeout_ms * factor**(n-1))``,
    multiplied by a random factor in [1, 2) when ``randomize``, and capped at
    ``max_timeout_ms``.
    """

    max_attempts: int = Field(3, ge=1, le=100)
    """Attempts in all, the first one included (1 means never retry)."""
    factor: float = Field(2.0, ge=1, le=100)
    """Growth of the delay from one retry to the next."""
    min_timeout_ms: int = Field(1000, ge=0, le=86_400_000)
    """Delay before the second attempt, in milliseconds."""
    max_timeout_ms: int = Field(60000, ge=0, le=86_400_000)
    """Upper bound of any delay, in milliseconds; at least ``min_timeout_ms``."""
    randomize: bool = True
    """Multiply each delay by a random factor in [1, 2) to spread retries out."""
    non_retryable_errors: tuple[
        Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=_ERROR_TYPE)], ...
    ] = Field((), max_length=64)
    """Exception classes that fail the run at once: a class name (``ValueError``) or
    ``module.QualifiedName``, matched against the raised exception's class and its bases."""
    out_of_memory: OutOfMemory | None = None
    """Resources for the attempts after an OOM-killed one (the Task's ``retry.outOfMemory``)."""

    @model_validator(mode="after")
    def _max_not_below_min(self) -> Self:
        if self.max_timeout_ms < self.min_timeout_ms:
            raise ValueError(
                f"max_timeout_ms ({self.max_timeout_ms}) must be >= min_timeout_ms ({self.min_timeout_ms})"
            )
        return self


class Queue(_Hint):
    """The queue runs of the task wait in (a hint; the Task resource's ``spec.queue`` wins,
    and a Queue resource of the same name wins over inline limits)."""

    name: str | None = Field(None, min_length=1, max_length=63, pattern=_DNS1123_LABEL.pattern)
    """Queue name (a DNS-1123 label); default: the task's id."""
    concurrency_limit: int | None = Field(None, ge=1, le=100_000)
    """Most runs of the queue with a live pod at once, all concurrency keys together."""
    per_key_concurrency_limit: int | None = Field(None, ge=1, le=100_000)
    """Most runs with a live pod at once for each concurrency key."""


class TaskDefinition:
    """A function registered with ``@task``.

    Calling it calls the original function unchanged (handy in unit tests);
    :meth:`execute` is what the runner uses: it awaits async functions and runs sync ones
    in a worker thread so they cannot block the event loop.
    """

    fn: TaskFunction
    """The decorated function, as written."""
    id: str
    """The task id: the name of the Task resource that runs this function."""
    explicit_id: bool
    """True when the id was given to the decorator (the runner checks it against the Task)."""
    retry: Retry
    """Retry hint (defaults to ``Retry()``)."""
    queue: Queue | None
    """Queue hint, if any."""
    max_duration_seconds: int | None
    """Wall-clock limit hint for one attempt, in seconds."""
    catch_error: CatchError | None
    """Called by the runner with ``(error, ctx)`` when the task raises (:meth:`decide`)."""

    def __init__(
        self,
        fn: TaskFunction,
        *,
        id: str | None = None,
        retry: Retry | None = None,
        queue: Queue | None = None,
        max_duration_seconds: int | None = None,
        catch_error: CatchError | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"@task needs a function, got {type(fn).__name__}")
        if isinstance(fn, TaskDefinition):
            raise TypeError(f"{fn.id!r} is already a task; apply @task once")
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"retry must be a kubetask.Retry, not {type(retry).__name__}")
        if queue is not None and not isinstance(queue, Queue):
            raise TypeError(f"queue must be a kubetask.Queue, not {type(queue).__name__}")
        if catch_error is not None and not callable(catch_error):
            raise TypeError(
                f"catch_error must be a function (error, ctx) -> RetryDecision | None, "
                f"not {type(catch_error).__name__}"
            )
        if max_duration_seconds is not None and (
            isinstance(max_duration_seconds, bool)
            or not isinstance(max_duration_seconds, int)
            or not 5 <= max_duration_seconds <= 604_800
        ):
            raise ValueError(
                f"max_duration_seconds must be an int in 5..604800, got {max_duration_seconds!r}"
            )
        functools.update_wrapper(self, fn)  # first: it copies fn.__dict__ into ours
        self.fn = fn
        self.explicit_id = id is not None
        if id is None:
            name = getattr(fn, "__name__", None)
            if not isinstance(name, str):
                raise ValueError("cannot derive a task id from this callable; pass @task(id=...)")
            default = name.replace("_", "-")
            try:
                self.id = validate_task_id(default)
            except ValueError as exc:
                raise ValueError(
                    f"the id derived from function {name!r} is invalid ({exc}); pass @task(id=...)"
                ) from None
        else:
            self.id = validate_task_id(id)
        self.retry = retry if retry is not None else Retry()
        self.queue = queue
        self.max_duration_seconds = max_duration_seconds
        self.catch_error = catch_error

    def __call__(self, payload: dict[str, Any], ctx: TaskContext) -> Any:
        """Call the original function (for async functions this returns the coroutine)."""
        return self.fn(payload, ctx)

    @property
    def is_async(self) -> bool:
        """True when the function is a coroutine function."""
        return inspect.iscoroutinefunction(self.fn)

    async def execute(self, payload: dict[str, Any], ctx: TaskContext) -> Any:
        """Run the task: await it if async, else run it in a thread (``asyncio.to_thread``)."""
        if self.is_async:
            return await self.fn(payload, ctx)
        result = await asyncio.to_thread(self.fn, payload, ctx)
        if inspect.isawaitable(result):  # e.g. a partial() of an async function
            result = await result
        return result

    async def decide(self, error: BaseException, ctx: TaskContext) -> RetryDecision | None:
        """Ask ``catch_error`` what to do about ``error`` (None without one): await it if
        async, else run it in a thread, like :meth:`execute`. Raises ``TypeError`` when it
        returns something other than a :class:`RetryDecision` or None; anything it raises
        propagates (the runner logs it and keeps the retry policy's default)."""
        hook = self.catch_error
        if hook is None:
            return None
        if inspect.iscoroutinefunction(hook):
            decision = await hook(error, ctx)
        else:
            decision = await asyncio.to_thread(hook, error, ctx)
            if inspect.isawaitable(decision):
                decision = await decision
        if decision is not None and not isinstance(decision, RetryDecision):
            raise TypeError(
                f"catch_error returned {decision!r}; return RetryDecision.skip(), "
                "RetryDecision.retry_after(...), RetryDecision.retry_at(...) or None"
            )
        return decision

    def __repr__(self) -> str:
        return f"<TaskDefinition id={self.id!r} fn={getattr(self.fn, '__qualname__', self.fn)!r}>"


@overload
def task(fn: TaskFunction, /) -> TaskDefinition: ...


@overload
def task(
    *,
    id: str | None = None,
    retry: Retry | None = None,
    queue: Queue | None = None,
    max_duration_seconds: int | None = None,
    catch_error: CatchError | None = None,
) -> Callable[[TaskFunction], TaskDefinition]: ...


def task(
    fn: TaskFunction | None = None,
    /,
    *,
    id: str | None = None,
    retry: Retry | None = None,
    queue: Queue | None = None,
    max_duration_seconds: int | None = None,
    catch_error: CatchError | None = None,
) -> TaskDefinition | Callable[[TaskFunction], TaskDefinition]:
    """Register ``fn(payload, ctx)`` as a task; use as ``@task`` or ``@task(...)``.

    :param id: the task id (the Task resource's name, a DNS-1123 label). Default: the
        function's name with ``_`` replaced by ``-``.
    :param retry: retry hint (:class:`Retry`).
    :param queue: queue hint (:class:`Queue`).
    :param max_duration_seconds: hint for the wall-clock limit of one attempt (5..604800).
    :param catch_error: ``fn(error, ctx)``, sync or async, called in the pod when the task
        raises; it returns a :class:`~kubetask.sdk.retry.RetryDecision` (skip, retry
        after/at) or None for the retry policy's default (docs/retries.md).

    Errors in the arguments (a bad id, a wrong type) raise at decoration time.
    """

    def decorate(f: TaskFunction) -> TaskDefinition:
        return TaskDefinition(
            f,
            id=id,
            retry=retry,
            queue=queue,
            max_duration_seconds=max_duration_seconds,
            catch_error=catch_error,
        )

    if isinstance(fn, str):
        raise TypeError(f"pass the id by keyword: @task(id={fn!r})")
    if fn is not None:
        return decorate(fn)
    return decorate
