"""The runner against a real local HTTP fake of the operator's /runner/v1 API.

Each test starts ``python -m kubetask.runner`` as a subprocess with the environment the
operator would give the pod, and checks the requests it made and its exit code.
"""

from __future__ import annotations

import ctypes
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubetask.protocol import (
    EXIT_ABORTED,
    EXIT_API_UNREACHABLE,
    EXIT_LOAD_ERROR,
    EXIT_OK,
    EXIT_OUTPUT_NOT_SERIALIZABLE,
    EXIT_TASK_ERROR,
    LogBatch,
    LogEntry,
)
from kubetask.runner.client import DEFAULT_RETRY_SECONDS, ApiClient, ApiError, Backoff
from kubetask.runner.config import RunnerConfig
from kubetask.runner.logship import MAX_LINE_BYTES, LogShipper, truncate_line

TOKEN = "attempt-token-123"


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None
    content_type: str | None
    body: Any
    at: float = field(default_factory=time.monotonic)


@dataclass
class FakeApi:
    """A stand-in for the operator's runner API. ``responses[path]`` is a list of status
    codes served in turn (the last one repeats); the default is 200/204."""

    url: str = ""
    attempt: dict[str, Any] = field(default_factory=dict)
    responses: dict[str, list[int]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def status_for(self, path: str, default: int) -> int:
        with self.lock:
            queue = self.responses.get(path)
            if not queue:
                return default
            return queue.pop(0) if len(queue) > 1 else queue[0]

    # what the runner sent
    def calls(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    @property
    def log_lines(self) -> list[dict[str, str]]:
        return [line for r in self.calls("/runner/v1/logs") for line in r.body["lines"]]

    @property
    def completion(self) -> dict[str, Any]:
        (request,) = self.calls("/runner/v1/complete")
        body: dict[str, Any] = request.body
        return body


def _handler(api: FakeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            with api.lock:
                api.requests.append(
                    Request(
                        self.command,
                        self.path,
                        self.headers.get("Authorization"),
                        self.headers.get("Content-Type"),
                        json.loads(raw) if raw else None,
                    )
                )

        def _reply(self, status: int, body: Any = None) -> None:
            data = b"" if body is None or status == 204 else json.dumps(body).encode()
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._record()
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._reply(401, {"error": "bad token"})
            elif self.path == "/runner/v1/attempt":
                status = api.status_for(self.path, 200)
                self._reply(status, api.attempt if status == 200 else {"error": "nope"})
            else:
                self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            self._record()
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._reply(401, {"error": "bad token"})
            elif self.path in ("/runner/v1/logs", "/runner/v1/complete"):
                status = api.status_for(self.path, 204)
                self._reply(status, None if status == 204 else {"error": "nope"})
            else:
                self._reply(404, {"error": "not found"})

    return Handler


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi(
        attempt={
            "run": {"id": "run-uid-1", "name": "hello-x7k2p", "namespace": "default", "tags": ["t1", "t2"]},
            "task": {"id": "hello"},
            "attempt": {"number": 2, "maxAttempts": 3},
            "payload": {"a": 2, "b": 3},
        }
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_runner(
    tmp_path: Path,
    api_url: str,
    *,
    source: str | None = None,
    entrypoint: str | None = None,
    modules: dict[str, str] | None = None,
    task_id: str = "hello",
    token: str | None = TOKEN,
    extra_env: dict[str, str] | None = None,
) -> Result:
    """Run ``python -m kubetask.runner`` in ``tmp_path`` as the operator would start it."""
    token_file = tmp_path / "token"
    if token is not None:
        token_file.write_text(token + "\n")
    source_file = tmp_path / "source" / "task.py"
    if source is not None:
        source_file.parent.mkdir(exist_ok=True)
        source_file.write_text(textwrap.dedent(source))
    for name, text in (modules or {}).items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETASK_")}
    env.update(
        {
            "KUBETASK_API_URL": api_url,
            "KUBETASK_RUN_ID": "run-uid-1",
            "KUBETASK_RUN_NAME": "hello-x7k2p",
            "KUBETASK_TASK_ID": task_id,
            "KUBETASK_ATTEMPT": "2",
            "KUBETASK_MAX_ATTEMPTS": "3",
            "KUBETASK_TOKEN_FILE": str(token_file),
            "KUBETASK_SOURCE_FILE": str(source_file),
            "KUBETASK_API_RETRY_SECONDS": "2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if entrypoint is not None:
        env["KUBETASK_ENTRYPOINT"] = entrypoint
    env.update(extra_env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "kubetask.runner"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def summary_line(result: Result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("kubetask-runner:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


ADD_SOURCE = """
    from kubetask import task, logger, TaskContext

    @task(id="hello")
    def add(payload: dict, ctx: TaskContext) -> dict:
        print("hello from stdout")
        logger.info("adding %s and %s", payload["a"], payload["b"])
        ctx.logger.warning("attempt %d of %d", ctx.attempt.number, ctx.attempt.max_attempts)
        return {
            "sum": payload["a"] + payload["b"],
            "run": [ctx.run.id, ctx.run.name, list(ctx.run.tags)],
            "task": ctx.task.id,
        }
"""


# --------------------------------------------------------------------------- the protocol


def test_inline_task_fetches_payload_ships_logs_and_reports_output(tmp_path: Path, api: FakeApi) -> None:
    result = run_runner(tmp_path, api.url, source=ADD_SOURCE)

    assert result.code == EXIT_OK == 0, result.stderr
    # every request carried the per-attempt token as a bearer token
    assert api.requests and all(r.authorization == f"Bearer {TOKEN}" for r in api.requests)
    # payload fetched first, completion last, logs in between
    assert (api.requests[0].method, api.requests[0].path) == ("GET", "/runner/v1/attempt")
    assert (api.requests[-1].method, api.requests[-1].path) == ("POST", "/runner/v1/complete")
    assert {r.path for r in api.requests[1:-1]} == {"/runner/v1/logs"}
    assert all(r.content_type == "application/json" for r in api.requests if r.method == "POST")

    assert api.completion == {
        "status": "succeeded",
        "output": {"sum": 5, "run": ["run-uid-1", "hello-x7k2p", ["t1", "t2"]], "task": "hello"},
    }

    lines = api.log_lines
    for line in lines:
        assert set(line) == {"ts", "level", "stream", "message"}
        assert line["ts"].endswith("Z") and "T" in line["ts"]
    by_message = {line["message"]: line for line in lines}
    assert by_message["hello from stdout"]["stream"] == "stdout"
    assert by_message["hello from stdout"]["level"] == "INFO"
    assert by_message["adding 2 and 3"]["stream"] == "log"
    assert by_message["adding 2 and 3"]["level"] == "INFO"
    assert by_message["attempt 2 of 3"] == {
        **by_message["attempt 2 of 3"],
        "stream": "log",
        "level": "WARNING",
    }
    order = [line["message"] for line in lines]
    assert order.index("hello from stdout") < order.index("adding 2 and 3") < order.index("attempt 2 of 3")

    # tee: what was shipped is still on the container's streams for `kubectl logs`
    assert "hello from stdout" in result.stdout
    assert "adding 2 and 3" in result.stderr
    summary = summary_line(result)
    assert "succeeded" in summary and "exit=0" in summary and "reported=yes" in summary
    assert "run=hello-x7k2p" in summary and "attempt=2/3" in summary


def test_async_task_from_an_entrypoint_module_is_awaited(tmp_path: Path, api: FakeApi) -> None:
    module = """
        import asyncio
        from kubetask import task

        @task(id="hello")
        async def run(payload, ctx):
            await asyncio.sleep(0.01)
            return [payload["a"] * payload["b"], ctx.attempt.number]
    """
    result = run_runner(tmp_path, api.url, entrypoint="mytasks:run", modules={"mytasks": module})

    assert result.code == 0, result.stderr
    assert api.completion == {"status": "succeeded", "output": [6, 2]}


def test_plain_undecorated_entrypoint_function_is_accepted(tmp_path: Path, api: FakeApi) -> None:
    module = """
        import sys

        def handle_it(payload, ctx):
            print("to stderr", file=sys.stderr)
            return None
    """
    result = run_runner(tmp_path, api.url, entrypoint="plain:handle_it", modules={"plain": module})

    assert result.code == 0, result.stderr
    assert api.completion == {"status": "succeeded", "output": None}
    stderr_lines = [line for line in api.log_lines if line["stream"] == "stderr"]
    assert {"to stderr"} <= {line["message"] for line in stderr_lines}
    assert all(line["level"] == "ERROR" for line in stderr_lines)


def test_task_that_raises_is_reported_retryable_and_exits_1(tmp_path: Path, api: FakeApi) -> None:
    source = """
        from kubetask import task

        @task
        def hello(payload, ctx):
            raise ValueError("boom: b is " + str(payload["b"]))
    """
    result = run_runner(tmp_path, api.url, source=source)

    assert result.code == EXIT_TASK_ERROR == 1, result.stderr
    completion = api.completion
    assert completion["status"] == "failed"
    assert completion["retryable"] is True
    assert completion["error"]["type"] == "ValueError"
    assert completion["error"]["message"] == "boom: b is 3"
    assert "Traceback" in completion["error"]["stack"] and "in hello" in completion["error"]["stack"]
    assert any("ValueError: boom" in line["message"] and line["level"] == "ERROR" for line in api.log_lines)
    assert "failed (ValueError: boom: b is 3)" in summary_line(result)


def test_abort_run_is_reported_not_retryable_and_exits_10(tmp_path: Path, api: FakeApi) -> None:
    source = """
        from kubetask import task, AbortRun

        @task
        def hello(payload, ctx):
            raise AbortRun("customer does not exist")
    """
    result = run_runner(tmp_path, api.url, source=source)

    assert result.code == EXIT_ABORTED == 10, result.stderr
    completion = api.completion
    assert completion["status"] == "failed"
    assert completion["retryable"] is False
    assert completion["error"]["type"] == "AbortRun"
    assert completion["error"]["message"] == "customer does not exist"
    assert "aborted" in summary_line(result)


@pytest.mark.parametrize(
    "value",
    ["{1, 2}", "object()", "float('nan')", "{'when': __import__('datetime').date.today()}", "'\\udc80'"],
)
def test_output_that_is_not_json_is_reported_and_exits_13(tmp_path: Path, api: FakeApi, value: str) -> None:
    source = f"""
        from kubetask import task

        @task
        def hello(payload, ctx):
            return {value}
    """
    result = run_runner(tmp_path, api.url, source=source)

    assert result.code == EXIT_OUTPUT_NOT_SERIALIZABLE == 13, result.stderr
    completion = api.completion
    assert completion["status"] == "failed"
    assert completion["retryable"] is False
    assert completion["error"]["type"] == "OutputNotSerializable"
    assert "not JSON-serialisable" in completion["error"]["message"]


# --------------------------------------------------------------------------- catch_error


def test_the_reported_error_carries_the_class_hierarchy(tmp_path: Path, api: FakeApi) -> None:
    source = """
        from kubetask import task

        class PaymentError(Exception):
            pass

        class Declined(PaymentError):
            pass

        @task
        def hello(payload, ctx):
            raise Declined("card declined")
    """
    result = run_runner(tmp_path, api.url, source=source)

    assert result.code == EXIT_TASK_ERROR, result.stderr
    error = api.completion["error"]
    assert error["type"] == "Declined"
    assert error["types"] == [
        "kubetask_inline_task.Declined",
        "kubetask_inline_task.PaymentError",
        "builtins.Exception",
        "builtins.BaseException",
    ]
    assert api.completion["retryable"] is True and api.completion["retryAt"] is None


CATCHING = """
    import asyncio
    from datetime import UTC, datetime, timedelta
    from kubetask import task, RetryDecision, AbortRun

    seen = []

    {hook}

    @task(catch_error=decide)
    def hello(payload, ctx):
        raise {raised}
"""


def catching(hook: str, raised: str = "ValueError('bad ' + str(payload['a']))") -> str:
    return CATCHING.format(hook=textwrap.indent(textwrap.dedent(hook), "    ").strip(), raised=raised)


def test_catch_error_skip_reports_not_retryable_and_exits_10(tmp_path: Path, api: FakeApi) -> None:
    hook = """
        def decide(error, ctx):
            assert isinstance(error, ValueError) and ctx.attempt.number == 2
            return RetryDecision.skip()
    """
    result = run_runner(tmp_path, api.url, source=catching(hook))

    assert result.code == EXIT_ABORTED == 10, result.stderr
    completion = api.completion
    assert (completion["retryable"], completion["skipped"], completion["retryAt"]) == (False, True, None)
    # The original error stays the attempt's error.
    assert completion["error"]["type"] == "ValueError" and completion["error"]["message"] == "bad 2"
    assert "Traceback" in completion["error"]["stack"]
    assert "catch_error skipped" in summary_line(result)


def test_catch_error_retry_after_reports_the_time_from_now(tmp_path: Path, api: FakeApi) -> None:
    hook = """
        def decide(error, ctx):
            return RetryDecision.retry_after(timedelta(minutes=5) if ctx.attempt.number == 2 else 1)
    """
    before = datetime.now(UTC)
    result = run_runner(tmp_path, api.url, source=catching(hook))
    after = datetime.now(UTC)

    assert result.code == EXIT_TASK_ERROR, result.stderr
    completion = api.completion
    assert completion["retryable"] is True and completion["skipped"] is False
    at = datetime.fromisoformat(completion["retryAt"])
    assert before + timedelta(minutes=5) <= at <= after + timedelta(minutes=5)
    assert completion["retryAt"].endswith("Z")
    assert "retry not before" in summary_line(result)


def test_async_catch_error_retry_at_reports_that_time(tmp_path: Path, api: FakeApi) -> None:
    hook = """
        async def decide(error, ctx):
            await asyncio.sleep(0)
            return RetryDecision.retry_at(datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC))
    """
    result = run_runner(tmp_path, api.url, source=catching(hook))

    assert result.code == EXIT_TASK_ERROR, result.stderr
    assert api.completion["retryAt"] == "2030-01-02T03:04:05.000000Z"
    assert any("catch_error decided: retry" in line["message"] for line in api.log_lines)


@pytest.mark.parametrize(
    ("hook", "logged"),
    [
        ("def decide(error, ctx):\n    return None\n", None),
        (
            "def decide(error, ctx):\n    raise RuntimeError('hook broke')\n",
            "catch_error raised RuntimeError: hook broke",
        ),
        ("def decide(error, ctx):\n    return 42\n", "catch_error returned 42"),
        (
            "def decide(error, ctx):\n    return RetryDecision.retry_at(datetime(2030, 1, 1))\n",
            "aware datetime",
        ),
    ],
    ids=["none", "raises", "wrong-type", "naive-time"],
)
def test_catch_error_returning_none_or_failing_leaves_the_default(
    tmp_path: Path, api: FakeApi, hook: str, logged: str | None
) -> None:
    result = run_runner(tmp_path, api.url, source=catching(hook))

    assert result.code == EXIT_TASK_ERROR, result.stderr
    completion = api.completion
    assert (completion["retryable"], completion["skipped"], completion["retryAt"]) == (True, False, None)
    assert completion["error"]["type"] == "ValueError"  # the task's error, not the hook's
    if logged is not None:
        assert any(logged in line["message"] and line["level"] == "ERROR" for line in api.log_lines), (
            api.log_lines
        )
    assert "failed (ValueError: bad 2)" in summary_line(result)


def test_catch_error_is_not_asked_about_abort_run(tmp_path: Path, api: FakeApi) -> None:
    hook = """
        def decide(error, ctx):
            raise AssertionError("catch_error must not run for AbortRun")
    """
    result = run_runner(tmp_path, api.url, source=catching(hook, raised="AbortRun('stop')"))

    assert result.code == EXIT_ABORTED, result.stderr
    assert api.completion["retryable"] is False and api.completion["skipped"] is False
    assert not any("catch_error" in line["message"] for line in api.log_lines)


def test_catch_error_is_not_asked_when_the_task_succeeds(tmp_path: Path, api: FakeApi) -> None:
    source = """
        from kubetask import task

        def decide(error, ctx):
            raise AssertionError("not called")

        @task(catch_error=decide)
        def hello(payload, ctx):
            return "fine"
    """
    result = run_runner(tmp_path, api.url, source=source)
    assert result.code == EXIT_OK, result.stderr
    assert api.completion == {"status": "succeeded", "output": "fine"}


# --------------------------------------------------------------------------- load errors


@pytest.mark.parametrize(
    ("source", "entrypoint", "modules", "problem"),
    [
        pytest.param("def hello(:\n", None, None, "SyntaxError", id="syntax-error"),
        pytest.param(
            "import no_such_module_xyz\n", None, None, "No module named 'no_such_module_xyz'", id="import"
        ),
        pytest.param(
            "def hello(payload, ctx):\n    return 1\n",
            None,
            None,
            "defines no @task function (it defines hello without @task)",
            id="no-task",
        ),
        pytest.param(
            "from kubetask import task\n@task\ndef one(p, c): pass\n@task\ndef two(p, c): pass\n",
            None,
            None,
            "defines 2 @task functions (one, two); it must define exactly one",
            id="two-tasks",
        ),
        pytest.param(
            "from kubetask import task\n@task(id='goodbye')\ndef hello(p, c): pass\n",
            None,
            None,
            "@task id 'goodbye'",
            id="wrong-id",
        ),
        pytest.param(
            "from kubetask import task\n@task(id='Bad_Id')\ndef hello(p, c): pass\n",
            None,
            None,
            "invalid task id 'Bad_Id'",
            id="invalid-id",
        ),
        pytest.param(None, None, None, "does not exist", id="no-source"),
        pytest.param(None, "nowhere_pkg:run", None, "cannot import module 'nowhere_pkg'", id="no-module"),
        pytest.param(
            None, "present:missing", {"present": "x = 1\n"}, "has no attribute 'missing'", id="no-attr"
        ),
        pytest.param(
            None, "present:x", {"present": "x = 1\n"}, "names a int, not a function", id="not-callable"
        ),
        pytest.param(None, "no-colon", None, "not of the form 'module:function'", id="bad-entrypoint"),
        pytest.param(
            None,
            "other:run",
            {"other": "from kubetask import task\n@task(id='other')\ndef run(p, c): pass\n"},
            "does not match the Task this pod runs ('hello')",
            id="entrypoint-wrong-id",
        ),
    ],
)
def test_task_that_cannot_be_loaded_is_reported_and_exits_11(
    tmp_path: Path,
    api: FakeApi,
    source: str | None,
    entrypoint: str | None,
    modules: dict[str, str] | None,
    problem: str,
) -> None:
    result = run_runner(tmp_path, api.url, source=source, entrypoint=entrypoint, modules=modules)

    assert result.code == EXIT_LOAD_ERROR == 11, result.stderr
    completion = api.completion
    assert completion["status"] == "failed"
    assert completion["retryable"] is False
    assert completion["error"]["type"] == "TaskLoadError"
    assert problem in completion["error"]["message"]
    assert problem in summary_line(result)
    assert api.calls("/runner/v1/attempt") == []  # the task is checked before the attempt is fetched
    assert any(problem in line["message"] for line in api.log_lines)


def test_load_error_still_exits_11_when_the_api_is_unreachable(tmp_path: Path) -> None:
    result = run_runner(
        tmp_path, closed_port_url(), source="x = 1\n", extra_env={"KUBETASK_API_RETRY_SECONDS": "0.5"}
    )

    assert result.code == 11, result.stderr
    assert "reported=no" in summary_line(result)


def test_explicit_id_is_checked_against_the_api_when_the_env_has_none(tmp_path: Path, api: FakeApi) -> None:
    source = "from kubetask import task\n@task(id='goodbye')\ndef hello(p, c): pass\n"
    result = run_runner(tmp_path, api.url, source=source, task_id="")

    assert result.code == 11, result.stderr
    assert "does not match the Task this pod runs ('hello')" in api.completion["error"]["message"]


# --------------------------------------------------------------------------- the API misbehaving


def test_rejected_token_exits_12_without_running_the_task(tmp_path: Path, api: FakeApi) -> None:
    source = ADD_SOURCE.replace('print("hello from stdout")', 'open("ran", "w").close()')
    result = run_runner(tmp_path, api.url, source=source, token="wrong-token")

    assert result.code == EXIT_API_UNREACHABLE == 12, result.stderr
    assert [r.path for r in api.requests if r.path != "/runner/v1/logs"] == ["/runner/v1/attempt"]
    assert not (tmp_path / "ran").exists()
    assert "HTTP 401" in summary_line(result)


@pytest.mark.parametrize("status", [403, 404, 409])
def test_final_client_errors_on_the_attempt_are_not_retried(
    tmp_path: Path, api: FakeApi, status: int
) -> None:
    api.responses["/runner/v1/attempt"] = [status]
    result = run_runner(tmp_path, api.url, source=ADD_SOURCE, extra_env={"KUBETASK_API_RETRY_SECONDS": "30"})

    assert result.code == 12, result.stderr
    assert len(api.calls("/runner/v1/attempt")) == 1


def test_unreachable_api_exits_12(tmp_path: Path) -> None:
    result = run_runner(
        tmp_path, closed_port_url(), source=ADD_SOURCE, extra_env={"KUBETASK_API_RETRY_SECONDS": "1"}
    )

    assert result.code == 12, result.stderr
    assert "cannot fetch the attempt" in summary_line(result)


def test_missing_token_file_exits_12(tmp_path: Path, api: FakeApi) -> None:
    result = run_runner(tmp_path, api.url, source=ADD_SOURCE, token=None)

    assert result.code == 12, result.stderr
    assert "token file" in summary_line(result)
    assert api.requests == []


def test_server_errors_and_connection_problems_are_retried(tmp_path: Path, api: FakeApi) -> None:
    api.responses["/runner/v1/attempt"] = [503, 502, 200]
    api.responses["/runner/v1/complete"] = [500, 204]
    result = run_runner(tmp_path, api.url, source=ADD_SOURCE, extra_env={"KUBETASK_API_RETRY_SECONDS": "10"})

    assert result.code == 0, result.stderr
    assert len(api.calls("/runner/v1/attempt")) == 3
    assert len(api.calls("/runner/v1/complete")) == 2
    assert api.calls("/runner/v1/complete")[-1].body["output"]["sum"] == 5


def test_success_that_cannot_be_reported_exits_12(tmp_path: Path, api: FakeApi) -> None:
    api.responses["/runner/v1/complete"] = [401]  # e.g. the run was cancelled meanwhile
    result = run_runner(tmp_path, api.url, source=ADD_SOURCE)

    assert result.code == 12, result.stderr
    assert len(api.calls("/runner/v1/complete")) == 1
    assert "reported=no" in summary_line(result)


def test_conflict_on_a_retried_completion_means_it_was_already_reported(tmp_path: Path, api: FakeApi) -> None:
    api.responses["/runner/v1/complete"] = [503, 409]
    result = run_runner(tmp_path, api.url, source=ADD_SOURCE)

    assert result.code == 0, result.stderr
    assert len(api.calls("/runner/v1/complete")) == 2
    assert "reported=yes (already)" in summary_line(result)


def test_output_the_api_rejects_is_reported_as_a_failure_and_exits_13(tmp_path: Path, api: FakeApi) -> None:
    api.responses["/runner/v1/complete"] = [413, 204]
    result = run_runner(tmp_path, api.url, source=ADD_SOURCE)

    assert result.code == 13, result.stderr
    first, second = (r.body for r in api.calls("/runner/v1/complete"))
    assert first["status"] == "succeeded"
    assert second["status"] == "failed" and second["retryable"] is False
    assert second["error"]["type"] == "OutputRejected"
    assert "HTTP 413" in second["error"]["message"]
    assert any("rejected the task's output" in line["message"] for line in api.log_lines)


def test_output_the_api_would_refuse_is_reported_as_rejected_without_sending_it(
    tmp_path: Path, api: FakeApi
) -> None:
    source = """
        from kubetask import task

        @task
        def hello(payload, ctx):
            return {"text": "nul\\x00byte"}
    """
    result = run_runner(tmp_path, api.url, source=source)

    assert result.code == EXIT_OUTPUT_NOT_SERIALIZABLE, result.stderr
    completion = api.completion  # the only one: the output itself was never sent
    assert completion["status"] == "failed" and completion["retryable"] is False
    assert completion["error"]["type"] == "OutputRejected"
    assert "NUL character" in completion["error"]["message"]


# --------------------------------------------------------------------------- retries


def test_reporting_is_retried_for_ten_minutes_by_default() -> None:
    config = RunnerConfig.from_env({"KUBETASK_API_URL": "http://127.0.0.1:1"})
    assert config.retry_budget_seconds == DEFAULT_RETRY_SECONDS == 600
    assert ApiClient("http://127.0.0.1:1", TOKEN).retry_budget_seconds == 600
    env = {"KUBETASK_API_URL": "http://127.0.0.1:1", "KUBETASK_API_RETRY_SECONDS": "45"}
    assert RunnerConfig.from_env(env).retry_budget_seconds == 45


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    delays = Backoff(first=0.2, cap=5.0, jitter=0.5).delays()
    waits = [next(delays) for _ in range(12)]
    nominal = [min(0.2 * 2**i, 5.0) for i in range(12)]
    assert all(n / 2 <= w <= n for w, n in zip(waits, nominal, strict=True))
    assert len(set(waits)) == len(waits)  # random, so pods do not retry in step


def test_retry_of_server_errors_stops_at_the_budget(api: FakeApi) -> None:
    api.responses["/runner/v1/attempt"] = [503]
    client = ApiClient(api.url, TOKEN, retry_budget_seconds=1.5, backoff=Backoff(first=0.05, cap=0.2))
    started = time.monotonic()
    with pytest.raises(ApiError) as failure:
        client.get_attempt()
    elapsed = time.monotonic() - started
    client.close()

    assert 1.5 <= elapsed < 2.5
    assert failure.value.status == 503 and "HTTP 503" in str(failure.value)
    assert "gave up after 1.5s" in str(failure.value)
    tries = [r.at for r in api.calls("/runner/v1/attempt")]
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert len(tries) >= 6 and max(gaps) < 0.2 + 0.15  # capped back-off


def test_log_shipping_gives_up_after_its_own_short_budget(api: FakeApi) -> None:
    api.responses["/runner/v1/logs"] = [503]
    client = ApiClient(api.url, TOKEN, backoff=Backoff(first=0.05, cap=0.2))
    echo = io.StringIO()
    shipper = LogShipper(client, echo=echo, interval=0.05, send_budget_seconds=1.0)
    shipper.start()
    for i in range(10):
        shipper.add("INFO", "stdout", f"line {i}")
    time.sleep(0.2)  # the background thread is retrying its first batch
    started = time.monotonic()
    shipper.close()
    elapsed = time.monotonic() - started
    client.close()

    # The batch in flight and what was left share one budget: completion is not held up.
    assert elapsed < 1.0 + 0.5
    assert shipper.sent_lines == 0 and shipper.lost_lines == 10
    assert "log lines not shipped" in echo.getvalue() and "HTTP 503" in echo.getvalue()


def test_log_batches_are_sent_as_the_protocol_models(api: FakeApi) -> None:
    client = ApiClient(api.url, TOKEN)
    client.post_logs(LogBatch(lines=[LogEntry(level="INFO", stream="log", message="hi\x00")]))
    client.close()

    (request,) = api.calls("/runner/v1/logs")
    assert request.body == {"lines": [{"ts": None, "level": "INFO", "stream": "log", "message": "hi\ufffd"}]}


# --------------------------------------------------------------------------- log shipping details


def test_logs_are_batched_and_long_lines_truncated(tmp_path: Path, api: FakeApi) -> None:
    source = """
        from kubetask import task

        @task
        def hello(payload, ctx):
            for i in range(1200):
                print(f"line {i}")
            print("x" * 40000)
            print("no newline at the end", end="")
            return "ok"
    """
    result = run_runner(tmp_path, api.url, source=source)

    assert result.code == 0, result.stderr
    batches = [r.body["lines"] for r in api.calls("/runner/v1/logs")]
    assert all(1 <= len(batch) <= 500 for batch in batches)
    stdout = [line["message"] for line in api.log_lines if line["stream"] == "stdout"]
    assert stdout[:1200] == [f"line {i}" for i in range(1200)]
    long_line = stdout[1200]
    assert len(long_line.encode()) <= MAX_LINE_BYTES
    assert long_line.startswith("xxxx") and "truncated" in long_line
    assert stdout[1201] == "no newline at the end"


def test_unshippable_logs_do_not_fail_the_attempt(tmp_path: Path, api: FakeApi) -> None:
    api.responses["/runner/v1/logs"] = [400]
    result = run_runner(tmp_path, api.url, source=ADD_SOURCE)

    assert result.code == 0, result.stderr
    assert api.completion["status"] == "succeeded"
    assert "log lines not shipped" in result.stderr


def test_truncate_line_keeps_short_lines_and_cuts_long_ones_on_character_boundaries() -> None:
    assert truncate_line("short") == "short"
    cut = truncate_line("é" * 20000)
    assert len(cut.encode()) <= MAX_LINE_BYTES
    assert cut.startswith("éé") and cut.endswith("bytes]")


def test_runner_module_imports_without_the_environment() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETASK_")}
    code = "import kubetask.runner, kubetask.runner.main; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_runner_without_api_url_exits_12_with_a_message(tmp_path: Path) -> None:
    result = run_runner(tmp_path, "", source=ADD_SOURCE)

    assert result.code == 12
    assert "KUBETASK_API_URL is not set" in summary_line(result)


def _spawn_runner(tmp_path: Path, api: FakeApi, source: str) -> subprocess.Popen[str]:
    """``python -m kubetask.runner`` for the task ``hello`` in ``source``, its stdout piped."""
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "task.py").write_text(textwrap.dedent(source))
    (tmp_path / "token").write_text(TOKEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETASK_")}
    env |= {
        "KUBETASK_API_URL": api.url,
        "KUBETASK_TASK_ID": "hello",
        "KUBETASK_TOKEN_FILE": str(tmp_path / "token"),
        "KUBETASK_SOURCE_FILE": str(tmp_path / "source" / "task.py"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetask.runner"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True
    )
    return proc


def _wait_for_wchan(pid: int, what: str, timeout: float = 10.0) -> None:
    """Wait until the main thread of ``pid`` sleeps in a kernel function named like ``what``."""
    path = Path(f"/proc/{pid}/task/{pid}/wchan")
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        seen = path.read_text()
        if what in seen:
            return
        time.sleep(0.02)
    raise AssertionError(f"the main thread of {pid} never waited in {what!r} (last: {seen!r})")


def test_sigterm_delivered_to_the_tasks_own_thread_still_stops_the_runner(
    tmp_path: Path, api: FakeApi
) -> None:
    """The kernel may hand a process-directed SIGTERM to any thread that does not block it.
    Python runs its handler only in the main thread, and that thread sits in the event
    loop's epoll_wait while a sync task runs in a worker: the handler would wait for the
    task to end. Here SIGTERM goes (tgkill) to the task's own thread on purpose."""
    source = """
        import threading, time
        from kubetask import task

        @task
        def hello(payload, ctx):
            print(f"started {threading.get_native_id()}", flush=True)
            time.sleep(60)
    """
    proc = _spawn_runner(tmp_path, api, source)
    try:
        assert proc.stdout is not None
        word, tid = proc.stdout.readline().split()
        assert word == "started" and int(tid) != proc.pid  # the task runs in a worker thread
        _wait_for_wchan(proc.pid, "epoll")  # the main thread is idle in the event loop
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.tgkill(proc.pid, int(tid), signal.SIGTERM) == 0, os.strerror(ctypes.get_errno())
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
        proc.wait()
    assert any(line["message"].startswith("started") for line in api.log_lines)
    assert api.calls("/runner/v1/complete") == []


def test_sigterm_ships_the_logs_so_far_and_exits_143(tmp_path: Path, api: FakeApi) -> None:
    source = """
        import time
        from kubetask import task

        @task
        def hello(payload, ctx):
            print("started", flush=True)
            time.sleep(60)
    """
    proc = _spawn_runner(tmp_path, api, source)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
        proc.wait()
    assert "started" in [line["message"] for line in api.log_lines]
    assert api.calls("/runner/v1/complete") == []
