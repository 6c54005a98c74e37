"""The task author's API: ``@task``, :class:`Retry`, :class:`Queue`, :class:`AbortRun`,
:class:`TaskContext` and ``logger``; and the API's clients, :class:`Client` and
:class:`AsyncClient` (errors: :class:`ApiError`).

Importing it pulls in only the standard library, pydantic, httpx and PyYAML, so it works
in any runner image.
"""

from kubetask.sdk.client import ApiError, AsyncClient, Client
from kubetask.sdk.context import AttemptInfo, RunInfo, TaskContext, TaskInfo
from kubetask.sdk.errors import AbortRun
from kubetask.sdk.logging import logger
from kubetask.sdk.task import Queue, Retry, TaskDefinition, TaskFunction, task, validate_task_id

__all__ = [
    "AbortRun",
    "ApiError",
    "AsyncClient",
    "AttemptInfo",
    "Client",
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
