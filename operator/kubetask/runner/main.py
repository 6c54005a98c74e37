"""The runner: what every attempt pod executes (``python -m kubetask.runner``).

One process runs one attempt of one run:

1. read the environment and the per-attempt token the operator mounted (:mod:`.config`);
2. start shipping logs (:mod:`.logship`);
3. load the task, ``KUBETASK_ENTRYPOINT`` or the inline source file (:mod:`.loader`);
4. fetch the attempt (payload, run, attempt number) from the operator's API (:mod:`.client`);
5. call ``fn(payload, ctx)`` (async functions on an event loop, sync ones in a thread); if
   it raises, ask the task's ``catch_error`` hook, if any, whether and when to retry;
6. flush the logs, report the outcome, print a one-line summary to stderr and exit with a
   code that says what happened (the ``EXIT_*`` codes of :mod:`kubetask.protocol`).

Only the base dependencies (httpx, pydantic) and the standard library are imported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TextIO

from pydantic import ValidationError

from kubetask.protocol import (
    EXIT_ABORTED,
    EXIT_API_UNREACHABLE,
    EXIT_LOAD_ERROR,
    EXIT_OK,
    EXIT_OUTPUT_NOT_SERIALIZABLE,
    EXIT_SUSPENDED,
    EXIT_TASK_ERROR,
    AttemptResponse,
    ErrorInfo,
    Failed,
    Succeeded,
    exception_types,
    iso,
    problem,
)
from kubetask.runner.client import ApiClient, ApiError, short
from kubetask.runner.config import ConfigError, RunnerConfig
from kubetask.runner.journal import RunnerTransport
from kubetask.runner.loader import TaskLoadError, check_task_id, format_exc, load_task, user_traceback
from kubetask.runner.logship import LOG_RETRY_SECONDS, LogShipper, capture_output, echo_line
from kubetask.sdk.context import AttemptInfo, RunInfo, TaskContext, TaskInfo
from kubetask.sdk.durable import Durable
from kubetask.sdk.errors import AbortRun, ReplayMismatch, Suspended
from kubetask.sdk.retry import RetryDecision
from kubetask.sdk.task import TaskDefinition

__all__ = ["main"]

#: Caps on the error reported for a failed attempt (the message's start, the stack's end).
MAX_ERROR_MESSAGE_CHARS = 32 * 1024
MAX_ERROR_STACK_CHARS = 64 * 1024

_SUMMARY_PREFIX = "kubetask-runner:"
_runner_log = logging.getLogger("kubetask.runner")


@dataclass(slots=True)
class _Outcome:
    code: int
    completion: Succeeded | Failed | None
    summary: str


def _failure(
    exc: BaseException, *, retryable: bool, type_name: str | None = None, stack: str | None = None
) -> Failed:
    message = str(exc) or type(exc).__name__
    if stack is None:
        stack = exc.stack if isinstance(exc, TaskLoadError) else format_exc(exc)
    return Failed(
        error=ErrorInfo(
            type=type_name or type(exc).__name__,
            message=message[:MAX_ERROR_MESSAGE_CHARS],
            stack=stack[-MAX_ERROR_STACK_CHARS:],
            # The hierarchy of what the task raised, for the Task's nonRetryableErrors; an
            # error the runner names itself (type_name) is no exception of the task's.
            types=[] if type_name else exception_types(exc),
        ),
        retryable=retryable,
    )


def _decide(definition: TaskDefinition, exc: BaseException, ctx: TaskContext) -> RetryDecision | None:
    """What the task's ``catch_error`` decides about ``exc`` (None: the retry policy's
    default). A hook that fails must not turn a retryable failure into something else, so
    whatever it raises or returns wrongly is logged and the default applies."""
    if definition.catch_error is None:
        return None
    try:
        decision = asyncio.run(definition.decide(exc, ctx))
    except KeyboardInterrupt:
        raise
    except BaseException as hook_exc:
        _runner_log.error(
            "catch_error raised %s; the retry policy decides instead",
            _one_line(hook_exc),
            exc_info=(type(hook_exc), hook_exc, user_traceback(hook_exc)),
        )
        return None
    if decision is not None and decision.at is not None:
        _runner_log.info("catch_error decided: retry, not before %s", iso(decision.at))
    elif decision is not None:
        _runner_log.info("catch_error decided: skip, the run fails now without another attempt")
    return decision


def _rejected(message: str) -> Failed:
    """The outcome of a task whose output cannot be stored (too large, NUL characters, ...)."""
    error = ErrorInfo(type="OutputRejected", message=message[:MAX_ERROR_MESSAGE_CHARS], stack="")
    return Failed(error=error, retryable=False)


def _load_failed(exc: TaskLoadError) -> _Outcome:
    _runner_log.error("cannot load the task: %s", exc)
    completion = _failure(exc, retryable=False, type_name="TaskLoadError")
    return _Outcome(EXIT_LOAD_ERROR, completion, f"load failed: {exc}")


def _context(config: RunnerConfig, attempt: AttemptResponse, transport: RunnerTransport) -> TaskContext:
    return TaskContext(
        run=RunInfo(
            id=attempt.run.id or config.run_id or "",
            name=attempt.run.name or config.run_name or "",
            namespace=attempt.run.namespace,
            tags=tuple(attempt.run.tags),
        ),
        task=TaskInfo(id=attempt.task.id or config.task_id or ""),
        attempt=AttemptInfo(number=attempt.attempt.number, max_attempts=attempt.attempt.max_attempts),
        durable=Durable(transport),
    )


def _run_attempt(
    config: RunnerConfig, api: ApiClient, transport: RunnerTransport
) -> tuple[_Outcome, TaskContext | None]:
    try:
        definition = load_task(config)
    except TaskLoadError as exc:
        return _load_failed(exc), None

    try:
        attempt = api.get_attempt()
    except ApiError as exc:
        return _Outcome(EXIT_API_UNREACHABLE, None, f"cannot fetch the attempt: {exc}"), None
    ctx = _context(config, attempt, transport)

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
    except Suspended as exc:
        # The wait is registered (the API said suspend): the run waits without a pod.
        _runner_log.info("suspended: %s; the pod exits, a new one resumes the run", exc)
        return _Outcome(EXIT_SUSPENDED, None, f"suspended ({exc})"), ctx
    except ReplayMismatch as exc:
        _runner_log.error("replay mismatch: %s", exc)
        return _Outcome(EXIT_ABORTED, _failure(exc, retryable=False), f"aborted ({_one_line(exc)})"), ctx
    except AbortRun as exc:
        _runner_log.error("run aborted: %s", str(exc) or type(exc).__name__)
        return _Outcome(EXIT_ABORTED, _failure(exc, retryable=False), f"aborted ({_one_line(exc)})"), ctx
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit from a task is a failure like any other
        _runner_log.error("task raised %s", _one_line(exc), exc_info=(type(exc), exc, user_traceback(exc)))
        completion = _failure(exc, retryable=True)
        decision = _decide(definition, exc, ctx)
        if decision is not None and decision.kind == "skip":
            # Exit 10 like AbortRun: should the report be lost, the exit code alone still
            # says "not retryable".
            skipped = Failed(error=completion.error, retryable=False, skipped=True)
            return _Outcome(
                EXIT_ABORTED, skipped, f"failed, catch_error skipped the retries ({_one_line(exc)})"
            ), ctx
        if decision is not None:
            completion = Failed(error=completion.error, retryable=True, retry_at=decision.at)
            when = iso(decision.at) if decision.at is not None else "?"
            summary = f"failed, retry not before {when} ({_one_line(exc)})"
            return _Outcome(EXIT_TASK_ERROR, completion, summary), ctx
        return _Outcome(EXIT_TASK_ERROR, completion, f"failed ({_one_line(exc)})"), ctx

    try:
        # ensure_ascii=False + encode: strings with lone surrogates are not valid UTF-8 JSON
        json.dumps(result, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        message = f"the task's return value is not JSON-serialisable: {exc}"
        _runner_log.error("%s", message)
        error = _failure(TypeError(message), retryable=False, type_name="OutputNotSerializable", stack="")
        return _Outcome(EXIT_OUTPUT_NOT_SERIALIZABLE, error, "failed (output not JSON-serialisable)"), ctx
    try:
        succeeded = Succeeded(output=result)
    except ValidationError as exc:  # the API would refuse it: too large, NUL characters
        found = problem(exc)
        message = f"the task's output cannot be reported: {found.message}"
        _runner_log.error("%s", message)
        return _Outcome(EXIT_OUTPUT_NOT_SERIALIZABLE, _rejected(message), f"failed ({found.code})"), ctx
    return _Outcome(EXIT_OK, succeeded, "succeeded"), ctx


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {short(first, 200)}" if first else type(exc).__name__


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


def _report(api: ApiClient, shipper: LogShipper, outcome: _Outcome, echo: TextIO) -> tuple[int, str, str]:
    """POST the outcome; return the exit code, the summary text and whether it was reported."""
    if outcome.completion is None:
        return outcome.code, outcome.summary, "no"
    try:
        api.complete(outcome.completion)
    except ApiError as exc:
        if exc.status == 409:  # the API has this attempt's result already (e.g. a retried POST)
            return outcome.code, outcome.summary, "yes (already)"
        if outcome.code != EXIT_OK:
            return outcome.code, outcome.summary, f"no ({exc})"
        if exc.status not in (400, 413, 422):
            # Nobody knows the output: the attempt must run again.
            return EXIT_API_UNREACHABLE, outcome.summary, f"no ({exc})"
        # The API refused the output itself (too large, NUL characters, ...): report that.
        message = f"the API rejected the task's output: {exc}"
        now = time.time()
        shipper.add("ERROR", "log", message, ts=now)
        shipper.flush()
        with contextlib.suppress(Exception):
            echo_line(echo, now, "ERROR", _runner_log.name, message)
        code, text = EXIT_OUTPUT_NOT_SERIALIZABLE, "failed (output rejected by the API)"
        try:
            api.complete(_rejected(message))
        except ApiError as again:
            return code, text, f"no ({again})"
        return code, text, "yes"
    return outcome.code, outcome.summary, "yes"


def main(argv: list[str] | None = None) -> int:
    """Run one attempt; return the exit code (``EXIT_*`` in :mod:`kubetask.protocol`)."""
    del argv  # configuration comes from the environment only
    started = time.monotonic()
    real_err = sys.stderr
    try:
        config = RunnerConfig.from_env(os.environ)
        token = config.read_token()
    except ConfigError as exc:
        code = EXIT_API_UNREACHABLE
        print(_summary(f"cannot start: {exc}", code, None, None, "no", started), file=real_err, flush=True)
        return code

    # Two clients: httpx clients are not shared between threads (the shipper has its own).
    api = ApiClient(config.api_url, token, retry_budget_seconds=config.retry_budget_seconds)
    log_api = ApiClient(config.api_url, token)
    transport = RunnerTransport(config.api_url, token, retry_budget_seconds=config.retry_budget_seconds)
    shipper = LogShipper(
        log_api, echo=real_err, send_budget_seconds=min(LOG_RETRY_SECONDS, config.retry_budget_seconds)
    )
    shipper.start()
    restore_sigterm = _install_sigterm(shipper, config, started)
    ctx: TaskContext | None = None
    try:
        with capture_output(shipper):
            outcome, ctx = _run_attempt(config, api, transport)
        shipper.close()

        code, text, reported = _report(api, shipper, outcome, real_err)
        print(_summary(text, code, ctx, config, reported, started), file=real_err, flush=True)
        return code
    finally:
        restore_sigterm()
        api.close()
        log_api.close()
        transport.close()


def _install_sigterm(shipper: LogShipper, config: RunnerConfig, started: float) -> Callable[[], None]:
    """On SIGTERM (deadline, cancel, node drain) ship the logs so far and exit 143.

    Returns what undoes it. The kernel hands a process-directed signal to any thread that
    does not block it, and Python runs its handlers only in the main thread, once that
    thread runs Python code again. While a sync task runs in a worker thread the main
    thread sits in the event loop's ``epoll_wait`` with no timeout, so a SIGTERM the kernel
    gave the task's thread would wait for the task to end, and the kubelet would SIGKILL
    the pod with its last logs unshipped. So the signal's C-level handler also writes to a
    wake-up socket (``signal.set_wakeup_fd``, whichever thread it runs in) that a thread of
    our own reads. Either path may come first; the work is done once.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    once = threading.Lock()

    def finish(signum: int) -> None:
        if not once.acquire(blocking=False):
            return
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

    def on_term(signum: int, frame: FrameType | None) -> None:
        del frame
        # Do the network I/O in a thread: the main thread may hold the shipper's locks.
        threading.Thread(target=finish, args=(signum,), name="kubetask-sigterm", daemon=True).start()

    reader, writer = socket.socketpair()
    writer.setblocking(False)  # set_wakeup_fd requires it

    def watch() -> None:
        with reader:
            while True:
                try:
                    data = reader.recv(64)
                except OSError:
                    return
                if not data:  # the writer was closed: the attempt is over
                    return
                if signal.SIGTERM in data:
                    finish(signal.SIGTERM)

    threading.Thread(target=watch, name="kubetask-signals", daemon=True).start()
    previous_handler = signal.signal(signal.SIGTERM, on_term)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def restore() -> None:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGTERM, previous_handler)
        writer.close()

    return restore
