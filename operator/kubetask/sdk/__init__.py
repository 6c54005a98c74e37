"""The task author's API: ``@task``, :class:`Retry`, :class:`Queue`, :class:`AbortRun`,
:class:`TaskContext` and ``logger``.

Importing it pulls in only the standard library and pydantic, so it works in any runner
image.
"""

from kubetask.sdk.context import AttemptInfo, RunInfo, TaskContext, TaskInfo
from kubetask.sdk.errors import AbortRun
from kubetask.sdk.logging import logger
from kubetask.sdk.task import Queue, Retry, TaskDefinition, TaskFunction, task, validate_task_id

__all__ = [
    "AbortRun",
    "AttemptInfo",
    "Queue",
    "Retry",
    "RunInfo",
    "TaskContext",
    "TaskDefinition",
    "TaskFunction",
    "TaskInfo",
    "logger",
    "task",
    "validate_task_id",
]
