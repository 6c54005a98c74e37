"""The task author's API: ``@task``, :class:`Retry`, :class:`Queue`, :class:`AbortRun`,
:class:`RetryDecision`, :class:`TaskContext` and ``logger``; and the API's clients, :class:`Client` and
:class:`AsyncClient` (errors: :class:`ApiError`).

Importing it pulls in only the standard library, pydantic, httpx and PyYAML, so it works
in any runner image.
"""

from kubetask.sdk.client import ApiError, AsyncClient, Client
from kubetask.sdk.context import AttemptInfo, RunInfo, TaskContext, TaskInfo
from kubetask.sdk.durable import Token
from kubetask.sdk.errors import AbortRun, ChildRunFailed, ReplayMismatch, WaitTimeout
from kubetask.sdk.logging import logger
from kubetask.sdk.retry import CatchError, RetryDecision
from kubetask.sdk.task import (
    OutOfMemory,
    Pod,
    Queue,
    Retry,
    TaskDefinition,
    TaskFunction,
    task,
    validate_task_id,
)

__all__ = [
    "AbortRun",
    "ApiError",
    "AsyncClient",
    "AttemptInfo",
    "CatchError",
    "ChildRunFailed",
    "Client",
    "OutOfMemory",
    "Pod",
    "Queue",
    "ReplayMismatch",
    "Retry",
    "RetryDecision",
    "RunInfo",
    "TaskContext",
    "TaskDefinition",
    "TaskFunction",
    "TaskInfo",
    "Token",
    "WaitTimeout",
    "logger",
    "task",
    "validate_task_id",
]
