"""kubetask: a durable task engine for Kubernetes.

Task authors need only this package's top level::

    from kubetask import task, Retry, Queue, AbortRun, RetryDecision, TaskContext, logger

Applications trigger and query runs with the API's clients::

    from kubetask import Client, AsyncClient, ApiError

The operator lives in submodules that need the ``operator`` extra; importing
``kubetask`` itself stays light (the standard library, pydantic, httpx, PyYAML).
"""

from importlib.metadata import PackageNotFoundError, version

from kubetask.sdk import (
    AbortRun,
    ApiError,
    AsyncClient,
    ChildRunFailed,
    Client,
    OutOfMemory,
    Pod,
    Queue,
    ReplayMismatch,
    Retry,
    RetryDecision,
    TaskContext,
    Token,
    WaitTimeout,
    logger,
    task,
)

try:
    __version__: str = version("kubetask")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AbortRun",
    "ApiError",
    "AsyncClient",
    "ChildRunFailed",
    "Client",
    "OutOfMemory",
    "Pod",
    "Queue",
    "ReplayMismatch",
    "Retry",
    "RetryDecision",
    "TaskContext",
    "Token",
    "WaitTimeout",
    "__version__",
    "logger",
    "task",
]
