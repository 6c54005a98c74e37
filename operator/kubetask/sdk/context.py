"""What a task knows about the attempt it runs in: ``ctx`` in ``fn(payload, ctx)``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kubetask.sdk.logging import TASK_LOGGER_NAME

__all__ = ["AttemptInfo", "RunInfo", "TaskContext", "TaskInfo"]


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
