"""The runner: what every attempt pod executes (``python -m kubetask.runner``).

One process runs one attempt of one run:

1. read the environment and the per-attempt token the operator mounted;
2. start shipping logs: records of the ``kubetask`` loggers and everything written to
   ``sys.stdout``/``sys.stderr`` (still echoed to the real streams for ``kubectl logs``);
3. load the task (``KUBETASK_ENTRYPOINT`` or the inline source file);
4. fetch the attempt (payload, run, attempt number) from the operator's API;
5. call ``fn(payload, ctx)`` (async functions on an event loop, sync ones in a thread);
6. flush the logs, report the outcome, print a one-line summary to stderr and exit with a
   code that says what happened (:class:`ExitCode`, docs/runner.md).

Only the base dependencies (httpx, pydantic) and the standard library are imported here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from types import FrameType, ModuleType, TracebackType
from typing import Any, TextIO, cast

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubetask.sdk.context import AttemptInfo, RunInfo, TaskContext, TaskInfo
from kubetask.sdk.errors import AbortRun
from kubetask.sdk.logging import logger as kubetask_logger
from kubetask.sdk.task import TaskDefinition

__all__ = [
    "DEFAULT_SOURCE_FILE",
    "DEFAULT_TOKEN_FILE",
    "INLINE_MODULE_NAME",
    "ApiClient",
    "ApiError",
    "ExitCode",
    "LogShipper",
    "RunnerConfig",
    "TaskLoadError",
    "load_task",
    "main",
]

DEFAULT_TOKEN_FILE = "/var/run/kubetask/token/token"
DEFAULT_SOURCE_FILE = "/var/run/kubetask/source/task.py"
#: The module name inline source is loaded under.
INLINE_MODULE_NAME = "kubetask_inline_task"

#: Longest log line shipped, in UTF-8 bytes (longer ones are cut and marked).
MAX_LINE_BYTES = 16 * 1024
#: Most lines in one POST /runner/v1/logs.
MAX_BATCH_LINES = 500
#: A batch also ends once its messages reach about this many characters.
MAX_BATCH_BYTES = 2 * 1024 * 1024
#: Seconds between two background log flushes.
FLUSH_INTERVAL_SECONDS = 0.5
#: Lines kept while the API is unreachable; older ones are dropped (and counted) beyond it.
MAX_PENDING_LINES = 100_000
#: Caps on the error reported for a failed attempt.
MAX_ERROR_MESSAGE_CHARS = 32 * 1024
MAX_ERROR_STACK_CHARS = 64 * 1024

_SUMMARY_PREFIX = "kubetask-runner:"
_runner_log = logging.getLogger("kubetask.runner")


class ExitCode(IntEnum):
    """The runner's exit codes (the operator reads them when no outcome was reported)."""

    SUCCEEDED = 0
    """The task returned and the output was reported."""
    TASK_FAILED = 1
    """The task raised; retryable (reported)."""
    ABORTED = 10
    """The task raised AbortRun; not retryable (reported)."""
    LOAD_FAILED = 11
    """The task could not be loaded; not retryable (reported if the API is reachable)."""
    API_UNAVAILABLE = 12
    """The API could not be reached or rejected the token; infrastructure, retryable."""
    OUTPUT_NOT_SERIALIZABLE = 13
    """The output is not JSON; not retryable (reported)."""


# --------------------------------------------------------------------------- configuration


class ConfigError(Exception):
    """The pod's environment is incomplete or malformed (an operator bug, not the task's)."""


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    """What the operator tells the runner through the pod's environment."""

    api_url: str
    token_file: Path
    run_id: str | None = None
    run_name: str | None = None
    task_id: str | None = None
    attempt: int | None = None
    max_attempts: int | None = None
    entrypoint: str | None = None
    source_file: Path = Path(DEFAULT_SOURCE_FILE)
    retry_budget_seconds: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RunnerConfig:
        def opt(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        def opt_int(name: str) -> int | None:
            value = opt(name)
            if value is None:
                return None
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{name}={value!r} is not an integer") from None

        api_url = opt("KUBETASK_API_URL")
        if api_url is None:
            raise ConfigError("KUBETASK_API_URL is not set")
        if not api_url.startswith(("http://", "https://")):
            raise ConfigError(f"KUBETASK_API_URL={api_url!r} is not an http(s) URL")
        budget = opt("KUBETASK_API_RETRY_SECONDS")
        try:
            retry_budget = float(budget) if budget is not None else 30.0
        except ValueError:
            raise ConfigError(f"KUBETASK_API_RETRY_SECONDS={budget!r} is not a number") from None
        return cls(
            api_url=api_url.rstrip("/"),
            token_file=Path(opt("KUBETASK_TOKEN_FILE") or DEFAULT_TOKEN_FILE),
            run_id=opt("KUBETASK_RUN_ID"),
            run_name=opt("KUBETASK_RUN_NAME"),
            task_id=opt("KUBETASK_TASK_ID"),
            attempt=opt_int("KUBETASK_ATTEMPT"),
            max_attempts=opt_int("KUBETASK_MAX_ATTEMPTS"),
            entrypoint=opt("KUBETASK_ENTRYPOINT"),
            source_file=Path(opt("KUBETASK_SOURCE_FILE") or DEFAULT_SOURCE_FILE),
            retry_budget_seconds=max(0.0, retry_budget),
        )

    def read_token(self) -> str:
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the token file {self.token_file}: {exc.strerror or exc}"
            ) from None
        if not token:
            raise ConfigError(f"the token file {self.token_file} is empty")
        return token


# --------------------------------------------------------------------------- the API


class ApiError(Exception):
    """A request to the operator's API failed for good."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiClient:
    """The runner's side of ``/runner/v1``: JSON, bearer token, patient retries.

    Connection errors, timeouts, 429 and 5xx are retried with exponential back-off until
    ``retry_budget_seconds`` have passed; any other non-2xx answer (401, 403, 404, 409,
    ...) is final.
    """

    def __init__(
        self, base_url: str, token: str, *, retry_budget_seconds: float = 30.0, timeout_seconds: float = 10.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry_budget_seconds = retry_budget_seconds
        self._client = httpx.Client(
            base_url=self.base_url,
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "User-Agent": "kubetask-runner",
            },
            timeout=httpx.Timeout(timeout_seconds),
        )

    def close(self) -> None:
        self._client.close()

    def request(
        self, method: str, path: str, body: Any = None, *, budget: float | None = None
    ) -> httpx.Response:
        budget = self.retry_budget_seconds if budget is None else budget
        deadline = time.monotonic() + budget
        content = None if body is None else json.dumps(body, allow_nan=False).encode("utf-8")
        headers = {"Content-Type": "application/json"} if content is not None else None
        delay = 0.2
        while True:
            try:
                response = self._client.request(method, path, content=content, headers=headers)
            except httpx.TransportError as exc:
                problem, status = f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}", None
            else:
                if response.is_success:
                    return response
                problem = (
                    f"{method} {self.base_url}{path}: HTTP {response.status_code} {_short(response.text)}"
                )
                status = response.status_code
                if status != 429 and status < 500:
                    raise ApiError(problem, status)
            if time.monotonic() + delay > deadline:
                raise ApiError(f"{problem} (gave up after {budget:g}s)", status)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def get_attempt(self) -> AttemptResponse:
        response = self.request("GET", "/runner/v1/attempt")
        try:
            return AttemptResponse.model_validate_json(response.content)
        except ValidationError as exc:
            raise ApiError(f"GET /runner/v1/attempt: malformed answer: {exc}", response.status_code) from None

    def post_logs(self, lines: list[dict[str, str]], *, budget: float | None = None) -> None:
        self.request("POST", "/runner/v1/logs", {"lines": lines}, budget=budget)

    def complete(self, body: dict[str, Any]) -> None:
        self.request("POST", "/runner/v1/complete", body)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class _WireRun(_Wire):
    id: str
    name: str
    namespace: str = ""
    tags: list[str] = Field(default_factory=list)


class _WireTask(_Wire):
    id: str


class _WireAttempt(_Wire):
    number: int = Field(ge=1)
    max_attempts: int = Field(alias="maxAttempts", ge=1)


class AttemptResponse(_Wire):
    """The answer of ``GET /runner/v1/attempt``."""

    run: _WireRun
    task: _WireTask
    attempt: _WireAttempt
    payload: Any = None


# --------------------------------------------------------------------------- log shipping


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def truncate_line(message: str, limit: int = MAX_LINE_BYTES) -> str:
    """Cut ``message`` to at most ``limit`` UTF-8 bytes, ending it with a marker when cut."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    marker = f" ...[truncated {len(data) - limit} bytes]"
    keep = max(0, limit - len(marker.encode()))
    return data[:keep].decode("utf-8", "ignore") + marker


class LogShipper:
    """Collects log lines and POSTs them in batches from a background thread.

    ``add`` is thread-safe and never blocks on the network. Every ``interval`` seconds the
    thread sends what is pending, ``MAX_BATCH_LINES`` at a time, in order; ``close``
    stops the thread and sends the rest. A batch the API refuses for good is dropped (and
    said so on the real stderr): logs never fail an attempt.
    """

    def __init__(
        self,
        api: ApiClient,
        *,
        echo: TextIO | None = None,
        interval: float = FLUSH_INTERVAL_SECONDS,
        batch_lines: int = MAX_BATCH_LINES,
        max_pending: int = MAX_PENDING_LINES,
        send_budget_seconds: float = 10.0,
    ) -> None:
        self._api = api
        self._echo = echo
        self._interval = interval
        self._batch_lines = batch_lines
        self._max_pending = max_pending
        self._send_budget = send_budget_seconds
        self._pending: deque[dict[str, str]] = deque()
        self._dropped = 0
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent_lines = 0
        self.lost_lines = 0

    def add(self, level: str, stream: str, message: str, ts: float | None = None) -> None:
        line = {
            "ts": _iso(time.time() if ts is None else ts),
            "level": level,
            "stream": stream,
            "message": truncate_line(message),
        }
        with self._lock:
            if len(self._pending) >= self._max_pending:
                self._pending.popleft()
                self._dropped += 1
            self._pending.append(line)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kubetask-log-shipper", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def _take(self) -> list[dict[str, str]]:
        with self._lock:
            batch: list[dict[str, str]] = []
            if self._dropped:
                batch.append(
                    {
                        "ts": _iso(time.time()),
                        "level": "WARNING",
                        "stream": "log",
                        "message": f"[kubetask-runner] {self._dropped} log lines were dropped (buffer full)",
                    }
                )
                self._dropped = 0
            size = 0
            while self._pending and len(batch) < self._batch_lines and size < MAX_BATCH_BYTES:
                line = self._pending.popleft()
                size += len(line["message"]) + 100
                batch.append(line)
            return batch

    def flush(self) -> bool:
        """Send everything pending now, in batches. After a batch fails for good (it is
        dropped) the rest waits for the next flush; returns False then."""
        with self._send_lock:
            while batch := self._take():
                try:
                    self._api.post_logs(batch, budget=self._send_budget)
                except ApiError as exc:
                    self.lost_lines += len(batch)
                    self._warn(f"{len(batch)} log lines not shipped: {exc}")
                    return False
                self.sent_lines += len(batch)
        return True

    def close(self) -> None:
        """Stop the background thread and send what is left (one try when the API fails)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if not self.flush():
            with self._lock:
                rest = len(self._pending) + self._dropped
                self._pending.clear()
                self._dropped = 0
            if rest:
                self.lost_lines += rest
                self._warn(f"{rest} more log lines not shipped")

    def _warn(self, message: str) -> None:
        if self._echo is not None:
            with contextlib.suppress(Exception):
                self._echo.write(f"kubetask-runner warning: {message}\n")
                self._echo.flush()


class _TeeStream:
    """Stands in for ``sys.stdout``/``sys.stderr``: writes through to the real stream and
    hands every complete line to the shipper."""

    def __init__(self, original: TextIO, shipper: LogShipper, stream: str, level: str) -> None:
        self._original = original
        self._shipper = shipper
        self._stream = stream
        self._level = level
        self._buffer = ""
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        with contextlib.suppress(OSError, ValueError):
            self._original.write(s)
        with self._lock:
            self._buffer += s
            if "\n" not in self._buffer:
                return len(s)
            *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._shipper.add(self._level, self._stream, line.removesuffix("\r"))
        return len(s)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._original.flush()

    def finish(self) -> None:
        """Ship a last line that has no newline yet."""
        with self._lock:
            rest, self._buffer = self._buffer, ""
        if rest:
            self._shipper.add(self._level, self._stream, rest.removesuffix("\r"))

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno, buffer, ...
        return getattr(self._original, name)


class _ShipHandler(logging.Handler):
    """Ships records of the ``kubetask`` loggers (stream ``log``) and echoes them to stderr."""

    def __init__(self, shipper: LogShipper, echo: TextIO) -> None:
        super().__init__(logging.NOTSET)
        self._shipper = shipper
        self._echo = echo
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            self._shipper.add(record.levelname, "log", message, ts=record.created)
            self._echo.write(f"{_iso(record.created)} {record.levelname} {record.name}: {message}\n")
            self._echo.flush()
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def capture_output(shipper: LogShipper) -> Iterator[None]:
    """Tee ``sys.stdout``/``sys.stderr`` and the ``kubetask`` loggers into ``shipper``."""
    real_out, real_err = sys.stdout, sys.stderr
    out = _TeeStream(real_out, shipper, "stdout", "INFO")
    err = _TeeStream(real_err, shipper, "stderr", "ERROR")
    handler = _ShipHandler(shipper, real_err)
    saved_level, saved_propagate = kubetask_logger.level, kubetask_logger.propagate
    kubetask_logger.addHandler(handler)
    if kubetask_logger.level == logging.NOTSET:
        kubetask_logger.setLevel(logging.INFO)
    # Records are shipped here once; a root handler (e.g. basicConfig in the task) would
    # print them to the captured stderr and ship them a second time.
    kubetask_logger.propagate = False
    sys.stdout, sys.stderr = cast(TextIO, out), cast(TextIO, err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = real_out, real_err
        out.finish()
        err.finish()
        kubetask_logger.removeHandler(handler)
        kubetask_logger.setLevel(saved_level)
        kubetask_logger.propagate = saved_propagate


# --------------------------------------------------------------------------- loading the task


class TaskLoadError(Exception):
    """The task named by the pod could not be loaded."""

    def __init__(self, message: str, stack: str = "") -> None:
        super().__init__(message)
        self.stack = stack


_INTERNAL_DIRS = tuple(
    str(Path(mod.__file__).resolve().parent) + os.sep
    for mod in (sys.modules["kubetask.sdk"], sys.modules["kubetask.runner"], asyncio, concurrent.futures)
    if mod.__file__
)


def _user_traceback(exc: BaseException) -> TracebackType | None:
    """The traceback without the leading runner/SDK/asyncio frames (they only add noise)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not (filename.startswith("<frozen ") or str(Path(filename).resolve()).startswith(_INTERNAL_DIRS)):
            break
        tb = tb.tb_next
    return tb


def _format_exc(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, _user_traceback(exc)))


def load_task(config: RunnerConfig) -> TaskDefinition:
    """Load the task from ``KUBETASK_ENTRYPOINT`` if set, else from the inline source file.

    Raises :class:`TaskLoadError` with a message that names the problem.
    """
    if config.entrypoint:
        definition = _load_entrypoint(config.entrypoint, config.task_id)
    else:
        definition = _load_source(config.source_file)
    check_task_id(definition, config.task_id)
    return definition


def check_task_id(definition: TaskDefinition, expected: str | None) -> None:
    """An id given to ``@task`` must name the Task the pod was started for."""
    if expected and definition.explicit_id and definition.id != expected:
        raise TaskLoadError(
            f"the @task id {definition.id!r} of {_describe(definition)} does not match the Task this pod "
            f"runs ({expected!r}); rename one of them or drop id= from the decorator"
        )


def _describe(definition: TaskDefinition) -> str:
    fn = definition.fn
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _load_entrypoint(entrypoint: str, task_id: str | None) -> TaskDefinition:
    module_name, sep, attr_path = entrypoint.partition(":")
    if not sep or not module_name or not attr_path:
        raise TaskLoadError(f"KUBETASK_ENTRYPOINT={entrypoint!r} is not of the form 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise TaskLoadError(
            f"cannot import module {module_name!r} of entrypoint {entrypoint!r}: {type(exc).__name__}: {exc}",
            _format_exc(exc),
        ) from None
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise TaskLoadError(
                f"entrypoint {entrypoint!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if isinstance(target, TaskDefinition):
        return target
    if not callable(target):
        raise TaskLoadError(
            f"entrypoint {entrypoint!r} names a {type(target).__name__}, not a function or @task"
        )
    try:
        return TaskDefinition(target, id=task_id) if task_id else TaskDefinition(target)
    except (TypeError, ValueError) as exc:
        raise TaskLoadError(f"entrypoint {entrypoint!r}: {exc}") from None


def _load_source(path: Path) -> TaskDefinition:
    if not path.is_file():
        raise TaskLoadError(f"no KUBETASK_ENTRYPOINT is set and the inline source file {path} does not exist")
    spec = importlib.util.spec_from_file_location(INLINE_MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise TaskLoadError(f"cannot load the inline source {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[INLINE_MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        del sys.modules[INLINE_MODULE_NAME]
        where = ""
        if isinstance(exc, SyntaxError) and exc.lineno is not None:
            where = f" (line {exc.lineno})"
        else:
            lines = [
                frame.lineno
                for frame in traceback.extract_tb(exc.__traceback__)
                if frame.filename == str(path)
            ]
            where = f" (line {lines[-1]})" if lines else ""
        raise TaskLoadError(
            f"the inline source {path} failed to load{where}: {type(exc).__name__}: {exc}",
            _format_exc(exc),
        ) from None
    return _single_task(module, path)


def _single_task(module: ModuleType, path: Path) -> TaskDefinition:
    found: dict[int, tuple[str, TaskDefinition]] = {}
    for name, value in vars(module).items():
        if isinstance(value, TaskDefinition) and getattr(value.fn, "__module__", None) == module.__name__:
            found.setdefault(id(value), (name, value))
    if len(found) == 1:
        return next(iter(found.values()))[1]
    if not found:
        plain = [
            name
            for name, value in vars(module).items()
            if inspect.isfunction(value) and value.__module__ == module.__name__
        ]
        hint = f" (it defines {', '.join(plain)} without @task)" if plain else ""
        raise TaskLoadError(
            f"the inline source {path} defines no @task function{hint}; decorate exactly one with @task"
        )
    names = ", ".join(sorted(name for name, _ in found.values()))
    raise TaskLoadError(
        f"the inline source {path} defines {len(found)} @task functions ({names}); it must define exactly one"
    )


# --------------------------------------------------------------------------- running it


@dataclass(slots=True)
class _Outcome:
    code: ExitCode
    completion: dict[str, Any] | None
    summary: str


def _failure(exc: BaseException, *, retryable: bool, type_name: str | None = None) -> dict[str, Any]:
    message = str(exc) or type(exc).__name__
    stack = exc.stack if isinstance(exc, TaskLoadError) else _format_exc(exc)
    return {
        "status": "failed",
        "error": {
            "type": type_name or type(exc).__name__,
            "message": message[:MAX_ERROR_MESSAGE_CHARS],
            "stack": stack[-MAX_ERROR_STACK_CHARS:],
        },
        "retryable": retryable,
    }


def _load_failed(exc: TaskLoadError) -> _Outcome:
    _runner_log.error("cannot load the task: %s", exc)
    completion = _failure(exc, retryable=False, type_name="TaskLoadError")
    return _Outcome(ExitCode.LOAD_FAILED, completion, f"load failed: {exc}")


def _context(config: RunnerConfig, attempt: AttemptResponse) -> TaskContext:
    return TaskContext(
        run=RunInfo(
            id=attempt.run.id or config.run_id or "",
            name=attempt.run.name or config.run_name or "",
            namespace=attempt.run.namespace,
            tags=tuple(attempt.run.tags),
        ),
        task=TaskInfo(id=attempt.task.id or config.task_id or ""),
        attempt=AttemptInfo(number=attempt.attempt.number, max_attempts=attempt.attempt.max_attempts),
    )


def _run_attempt(config: RunnerConfig, api: ApiClient) -> tuple[_Outcome, TaskContext | None]:
    try:
        definition = load_task(config)
    except TaskLoadError as exc:
        return _load_failed(exc), None

    try:
        attempt = api.get_attempt()
    except ApiError as exc:
        return _Outcome(ExitCode.API_UNAVAILABLE, None, f"cannot fetch the attempt: {exc}"), None
    ctx = _context(config, attempt)

    if not config.task_id:  # no id in the environment: check against the API's answer
        try:
            check_task_id(definition, ctx.task.id)
        except TaskLoadError as exc:
            return _load_failed(exc), ctx

    payload = attempt.payload if attempt.payload is not None else {}
    _runner_log.info(
        "starting task %s, run %s, attempt %d/%d",
        ctx.task.id,
        ctx.run.name,
        ctx.attempt.number,
        ctx.attempt.max_attempts,
    )
    try:
        result = asyncio.run(definition.execute(payload, ctx))
    except AbortRun as exc:
        _runner_log.error("run aborted: %s", str(exc) or type(exc).__name__)
        return _Outcome(ExitCode.ABORTED, _failure(exc, retryable=False), f"aborted ({_one_line(exc)})"), ctx
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit from a task is a failure like any other
        _runner_log.error("task raised %s", _one_line(exc), exc_info=(type(exc), exc, _user_traceback(exc)))
        completion = _failure(exc, retryable=True)
        return _Outcome(ExitCode.TASK_FAILED, completion, f"failed ({_one_line(exc)})"), ctx

    try:
        # ensure_ascii=False + encode: strings with lone surrogates are not valid UTF-8 JSON
        json.dumps(result, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        message = f"the task's return value is not JSON-serialisable: {exc}"
        _runner_log.error("%s", message)
        error = _failure(TypeError(message), retryable=False, type_name="OutputNotSerializable")
        error["error"]["stack"] = ""
        return _Outcome(ExitCode.OUTPUT_NOT_SERIALIZABLE, error, "failed (output not JSON-serialisable)"), ctx
    return _Outcome(ExitCode.SUCCEEDED, {"status": "succeeded", "output": result}, "succeeded"), ctx


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {_short(first, 200)}" if first else type(exc).__name__


def _summary(
    outcome_text: str,
    code: int,
    ctx: TaskContext | None,
    config: RunnerConfig | None,
    reported: str,
    started: float,
) -> str:
    run = (ctx.run.name if ctx else None) or (config.run_name if config else None) or "?"
    task_id = (ctx.task.id if ctx else None) or (config.task_id if config else None) or "?"
    if ctx is not None:
        attempt = f"{ctx.attempt.number}/{ctx.attempt.max_attempts}"
    elif config is not None and config.attempt is not None:
        attempt = f"{config.attempt}/{config.max_attempts or '?'}"
    else:
        attempt = "?"
    return (
        f"{_SUMMARY_PREFIX} {outcome_text} | run={run} task={task_id} attempt={attempt} exit={code} "
        f"reported={reported} duration={time.monotonic() - started:.2f}s"
    )


def _report(
    api: ApiClient, shipper: LogShipper, outcome: _Outcome, echo: TextIO
) -> tuple[ExitCode, str, str]:
    """POST the outcome; return the exit code, the summary text and whether it was reported."""
    if outcome.completion is None:
        return outcome.code, outcome.summary, "no"
    try:
        api.complete(outcome.completion)
    except ApiError as exc:
        if exc.status == 409:  # the API has this attempt's result already (e.g. a retried POST)
            return outcome.code, outcome.summary, "yes (already)"
        if outcome.code != ExitCode.SUCCEEDED:
            return outcome.code, outcome.summary, f"no ({exc})"
        if exc.status not in (400, 413, 422):
            # Nobody knows the output: the attempt must run again.
            return ExitCode.API_UNAVAILABLE, outcome.summary, f"no ({exc})"
        # The API refused the output itself (too large, NUL characters, ...): report that.
        message = f"the API rejected the task's output: {exc}"
        now = time.time()
        shipper.add("ERROR", "log", message, ts=now)
        shipper.flush()
        with contextlib.suppress(Exception):
            echo.write(f"{_iso(now)} ERROR {_runner_log.name}: {message}\n")
        rejected = {
            "status": "failed",
            "error": {"type": "OutputRejected", "message": message[:MAX_ERROR_MESSAGE_CHARS], "stack": ""},
            "retryable": False,
        }
        code, text = ExitCode.OUTPUT_NOT_SERIALIZABLE, "failed (output rejected by the API)"
        try:
            api.complete(rejected)
        except ApiError as again:
            return code, text, f"no ({again})"
        return code, text, "yes"
    return outcome.code, outcome.summary, "yes"


def main(argv: list[str] | None = None) -> int:
    """Run one attempt; return the exit code (see :class:`ExitCode`)."""
    del argv  # configuration comes from the environment only
    started = time.monotonic()
    real_err = sys.stderr
    try:
        config = RunnerConfig.from_env(os.environ)
        token = config.read_token()
    except ConfigError as exc:
        code = ExitCode.API_UNAVAILABLE
        print(_summary(f"cannot start: {exc}", code, None, None, "no", started), file=real_err, flush=True)
        return code

    api = ApiClient(config.api_url, token, retry_budget_seconds=config.retry_budget_seconds)
    log_api = ApiClient(config.api_url, token, retry_budget_seconds=config.retry_budget_seconds)
    shipper = LogShipper(log_api, echo=real_err, send_budget_seconds=min(10.0, config.retry_budget_seconds))
    shipper.start()
    previous_handler = _install_sigterm(shipper, config, started)
    ctx: TaskContext | None = None
    try:
        with capture_output(shipper):
            outcome, ctx = _run_attempt(config, api)
        shipper.close()

        code, text, reported = _report(api, shipper, outcome, real_err)
        print(_summary(text, code, ctx, config, reported, started), file=real_err, flush=True)
        return code
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        api.close()
        log_api.close()


_Handler = Any  # what signal.signal returns: a callable, an int or None


def _install_sigterm(shipper: LogShipper, config: RunnerConfig, started: float) -> _Handler:
    """On SIGTERM (deadline, cancel, node drain) ship the logs so far and exit 143."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum: int, frame: FrameType | None) -> None:
        del frame

        def finish() -> None:
            with contextlib.suppress(Exception):
                _runner_log.warning("received SIGTERM: stopping")
            with contextlib.suppress(Exception):
                shipper.close()
            real_err = sys.__stderr__
            if real_err is not None:
                with contextlib.suppress(Exception):
                    line = _summary("terminated (SIGTERM)", 128 + signum, None, config, "no", started)
                    real_err.write(line + "\n")
                    real_err.flush()
            os._exit(128 + signum)

        # Do the network I/O in a thread: the main thread may hold the shipper's locks.
        threading.Thread(target=finish, name="kubetask-sigterm", daemon=True).start()

    return signal.signal(signal.SIGTERM, on_term)
