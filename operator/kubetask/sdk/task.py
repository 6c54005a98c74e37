"""The ``@task`` decorator and the hints it carries (:class:`Retry`, :class:`Queue`).

A task is a function ``fn(payload: dict, ctx: TaskContext)``, sync or async, whose
return value (any JSON) becomes the run's output::

    from kubetask import task, Retry

    @task(id="hello", retry=Retry(max_attempts=5))
    async def hello(payload: dict, ctx: TaskContext) -> dict:
        return {"greeting": f"hello {payload['name']}"}

The decorator's ``retry``, ``queue`` and ``max_duration_seconds`` are the Task's spec:
``@task`` builds a :class:`kubetask.spec.TaskSpec` from them (:attr:`TaskDefinition.spec`,
the same pydantic models the operator and the CRD schema use, so a value the cluster
would refuse raises here), and ``kubetask deploy`` writes it into the Task resource with
the image and entrypoint it built. The Task resource in the cluster is what the operator
reads: code that was not deployed changes nothing. The runner uses the decorator's
``id``, to check it names the Task the pod was started for, and its ``catch_error`` hook
(code: it runs in the pod when the task raises; :mod:`kubetask.sdk.retry`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
from collections.abc import Callable
from typing import Any, overload

from pydantic import ValidationError
from pydantic.alias_generators import to_snake

from kubetask.sdk.context import TaskContext
from kubetask.sdk.retry import CatchError, RetryDecision
from kubetask.spec import OutOfMemorySpec, PodTemplate, QueueRef, RetrySpec, TaskSpec

__all__ = [
    "OutOfMemory",
    "Pod",
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


class OutOfMemory(OutOfMemorySpec):
    """What changes for the attempts after one that was OOM-killed (``Retry.out_of_memory``):
    ``resources`` (e.g. ``{"limits": {"memory": "1Gi"}}``) merged over the pod template's,
    key by key. The Task's ``spec.retry.outOfMemory``: the same model."""


class Retry(RetrySpec):
    """How failed attempts are retried: the Task's ``spec.retry`` (the same model,
    :class:`kubetask.spec.RetrySpec`; ``kubetask deploy`` writes it into the Task, and the
    Task resource in the cluster wins over code that was not deployed).

    The delay before attempt n+1 is ``min(max_timeout_ms, min_timeout_ms * factor**(n-1))``,
    multiplied by a random factor in [1, 2) when ``randomize``, and capped at
    ``max_timeout_ms``.
    """


class Queue(QueueRef):
    """The queue runs of the task wait in: the Task's ``spec.queue`` (the same model,
    :class:`kubetask.spec.QueueRef`; the Task resource wins, and a Queue resource of the
    same name wins over inline limits). ``name`` defaults to the task's id."""


class Pod(PodTemplate):
    """What the task's attempt pods get beyond the defaults: the Task's ``spec.podTemplate``
    (the same model, :class:`kubetask.spec.PodTemplate`): ``resources``, ``env``,
    ``env_from``, ``node_selector``, ``tolerations``, each passed to the pod as is, e.g.
    ``Pod(resources={"limits": {"memory": "2Gi"}}, node_selector={"pool": "batch"})``."""


def _errors(error: ValidationError) -> str:
    """``max_duration_seconds: Input should be greater than or equal to 5; ...``"""
    return "; ".join(
        f"{'.'.join(to_snake(str(p)) for p in e['loc']) or 'options'}: {e['msg']}" for e in error.errors()
    )


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
    retry: RetrySpec
    """The retry policy (defaults to ``Retry()``)."""
    queue: QueueRef | None
    """The queue, if any."""
    max_duration_seconds: int | None
    """Wall-clock limit of one attempt, in seconds."""
    pod: Pod | None
    """What the attempt pods get beyond the defaults (``spec.podTemplate``)."""
    ttl_seconds_after_finished: int | None
    """How long a finished Run resource is kept (``spec.ttlSecondsAfterFinished``)."""
    spec: TaskSpec
    """The Task spec these options make: ``retry``, ``queue``, ``maxDurationSeconds``,
    ``podTemplate`` and ``ttlSecondsAfterFinished``,
    without code or image (``kubetask deploy`` adds ``image`` and ``entrypoint``)."""
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
        pod: Pod | None = None,
        ttl_seconds_after_finished: int | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"@task needs a function, got {type(fn).__name__}")
        if isinstance(fn, TaskDefinition):
            raise TypeError(f"{fn.id!r} is already a task; apply @task once")
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"retry must be a kubetask.Retry, not {type(retry).__name__}")
        if queue is not None and not isinstance(queue, Queue):
            raise TypeError(f"queue must be a kubetask.Queue, not {type(queue).__name__}")
        if pod is not None and not isinstance(pod, Pod):
            raise TypeError(f"pod must be a kubetask.Pod, not {type(pod).__name__}")
        if catch_error is not None and not callable(catch_error):
            raise TypeError(
                f"catch_error must be a function (error, ctx) -> RetryDecision | None, "
                f"not {type(catch_error).__name__}"
            )
        if max_duration_seconds is not None and (
            isinstance(max_duration_seconds, bool) or not isinstance(max_duration_seconds, int)
        ):
            raise TypeError(f"max_duration_seconds must be an int, not {type(max_duration_seconds).__name__}")
        if ttl_seconds_after_finished is not None and (
            isinstance(ttl_seconds_after_finished, bool) or not isinstance(ttl_seconds_after_finished, int)
        ):
            raise TypeError(
                f"ttl_seconds_after_finished must be an int, not {type(ttl_seconds_after_finished).__name__}"
            )
        try:
            # The Task spec's own model checks the options (bounds, cross-field rules):
            # what the cluster would refuse fails here, at import time, with its field name.
            spec = TaskSpec(
                retry=retry if retry is not None else Retry(),
                queue=queue,
                max_duration_seconds=max_duration_seconds,
                pod_template=pod,
                ttl_seconds_after_finished=ttl_seconds_after_finished,
            )
        except ValidationError as e:
            raise ValueError(f"invalid @task options: {_errors(e)}") from None
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
        self.spec = spec
        self.retry = spec.retry
        self.queue = spec.queue
        self.max_duration_seconds = spec.max_duration_seconds
        self.pod = pod
        self.ttl_seconds_after_finished = spec.ttl_seconds_after_finished
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
    pod: Pod | None = None,
    ttl_seconds_after_finished: int | None = None,
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
    pod: Pod | None = None,
    ttl_seconds_after_finished: int | None = None,
) -> TaskDefinition | Callable[[TaskFunction], TaskDefinition]:
    """Register ``fn(payload, ctx)`` as a task; use as ``@task`` or ``@task(...)``.

    :param id: the task id (the Task resource's name, a DNS-1123 label). Default: the
        function's name with ``_`` replaced by ``-``.
    :param retry: the retry policy (:class:`Retry`): the Task's ``spec.retry``.
    :param queue: the queue (:class:`Queue`): the Task's ``spec.queue``.
    :param max_duration_seconds: the wall-clock limit of one attempt (5..604800): the
        Task's ``spec.maxDurationSeconds``.
    :param catch_error: ``fn(error, ctx)``, sync or async, called in the pod when the task
        raises; it returns a :class:`~kubetask.sdk.retry.RetryDecision` (skip, retry
        after/at) or None for the retry policy's default (docs/retries.md).
    :param pod: resources, env, envFrom, nodeSelector, tolerations of the attempt pods
        (:class:`Pod`): the Task's ``spec.podTemplate``.
    :param ttl_seconds_after_finished: delete each finished Run resource this long after it
        ends (0..31536000; its record stays in PostgreSQL): the Task's
        ``spec.ttlSecondsAfterFinished``.

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
            pod=pod,
            ttl_seconds_after_finished=ttl_seconds_after_finished,
        )

    if isinstance(fn, str):
        raise TypeError(f"pass the id by keyword: @task(id={fn!r})")
    if fn is not None:
        return decorate(fn)
    return decorate
