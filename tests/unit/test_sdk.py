"""The task author's API: the decorator, the hints, the context, the logger."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pydantic
import pytest

import kubetask
from kubetask import AbortRun, OutOfMemory, Queue, Retry, RetryDecision, TaskContext, logger, task
from kubetask.sdk import TaskDefinition, validate_task_id
from kubetask.spec import QueueRef, RetrySpec, TaskSpec


def ctx() -> TaskContext:
    return TaskContext.local("t", run_id="r-1", run_name="run-1", tags=["a"], attempt=2, max_attempts=3)


# --------------------------------------------------------------------------- decorator forms


def test_bare_decorator_derives_id_from_function_name_with_dashes() -> None:
    @task
    def send_welcome_email(payload: dict[str, Any], ctx: TaskContext) -> str:
        """Docstring kept."""
        return "sent"

    assert isinstance(send_welcome_email, TaskDefinition)
    assert send_welcome_email.id == "send-welcome-email"
    assert send_welcome_email.explicit_id is False
    assert send_welcome_email.retry == Retry()
    assert send_welcome_email.queue is None
    assert send_welcome_email.max_duration_seconds is None


def test_decorator_with_arguments_keeps_id_retry_queue_and_duration() -> None:
    retry = Retry(max_attempts=5, factor=3, min_timeout_ms=10, max_timeout_ms=100, randomize=False)
    queue = Queue(name="emails", concurrency_limit=2, per_key_concurrency_limit=1)

    @task(id="hello", retry=retry, queue=queue, max_duration_seconds=60)
    def greet(payload: dict[str, Any], ctx: TaskContext) -> str:
        return "hi"

    assert greet.id == "hello"
    assert greet.explicit_id is True
    assert greet.retry is retry
    assert greet.queue is queue
    assert greet.max_duration_seconds == 60


def test_empty_parentheses_work_like_the_bare_decorator() -> None:
    @task()
    def resize(payload: dict[str, Any], ctx: TaskContext) -> None:
        return None

    assert resize.id == "resize"


def test_definition_is_callable_and_keeps_the_original_function() -> None:
    def add(payload: dict[str, Any], ctx: TaskContext) -> int:
        """Adds."""
        return int(payload["a"]) + int(payload["b"])

    definition = task(add)
    assert definition.fn is add
    assert definition({"a": 1, "b": 2}, ctx()) == 3
    assert definition.__name__ == "add"  # type: ignore[attr-defined]  # functools.update_wrapper's
    assert definition.__doc__ == "Adds."
    assert definition.__wrapped__ is add  # type: ignore[attr-defined]
    assert "add" in repr(definition)


def test_positional_string_id_is_rejected_with_a_hint() -> None:
    with pytest.raises(TypeError, match=r"@task\(id='hello'\)"):
        task("hello")  # type: ignore[call-overload]


def test_applying_the_decorator_twice_is_rejected() -> None:
    @task
    def once(payload: dict[str, Any], ctx: TaskContext) -> None:
        return None

    with pytest.raises(TypeError, match="already a task"):
        task(once)


def test_hints_of_the_wrong_type_are_rejected() -> None:
    def f(payload: dict[str, Any], ctx: TaskContext) -> None:
        return None

    with pytest.raises(TypeError, match="Retry"):
        task(retry={"max_attempts": 2})(f)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="Queue"):
        task(queue="q")(f)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="max_duration_seconds"):
        task(max_duration_seconds=1)(f)


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize("good", ["a", "hello", "send-email-2", "0abc", "a" * 63])
def test_valid_dns1123_ids_are_accepted(good: str) -> None:
    assert validate_task_id(good) == good

    @task(id=good)
    def f(payload: dict[str, Any], ctx: TaskContext) -> None:
        return None

    assert f.id == good


@pytest.mark.parametrize(
    "bad", ["", "Hello", "snake_case", "-lead", "trail-", "has space", "dot.ted", "a" * 64]
)
def test_invalid_ids_are_rejected_at_decoration_time(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid task id"):

        @task(id=bad)
        def f(payload: dict[str, Any], ctx: TaskContext) -> None:
            return None


def test_function_name_that_makes_an_invalid_id_asks_for_an_explicit_id() -> None:
    def _private(payload: dict[str, Any], ctx: TaskContext) -> None:
        return None

    with pytest.raises(ValueError, match=r"pass @task\(id=\.\.\.\)"):
        task(_private)
    assert task(id="private")(_private).id == "private"


# --------------------------------------------------------------------------- execution


async def test_sync_task_runs_in_a_worker_thread() -> None:
    seen: dict[str, Any] = {}

    @task
    def blocking(payload: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        seen["thread"] = threading.current_thread()
        return {"doubled": payload["n"] * 2, "attempt": ctx.attempt.number}

    assert blocking.is_async is False
    result = await blocking.execute({"n": 21}, ctx())
    assert result == {"doubled": 42, "attempt": 2}
    assert seen["thread"] is not threading.current_thread()


async def test_async_task_is_awaited_on_the_running_loop() -> None:
    @task
    async def non_blocking(payload: dict[str, Any], ctx: TaskContext) -> str:
        await asyncio.sleep(0)
        return f"{ctx.run.name}:{payload['x']}"

    assert non_blocking.is_async is True
    assert await non_blocking.execute({"x": "y"}, ctx()) == "run-1:y"


async def test_sync_callable_returning_a_coroutine_is_awaited() -> None:
    async def inner(payload: dict[str, Any], ctx: TaskContext) -> int:
        return 7

    def wrapper(payload: dict[str, Any], ctx: TaskContext) -> Any:
        return inner(payload, ctx)

    assert await task(wrapper).execute({}, ctx()) == 7


async def test_exceptions_from_the_task_propagate_from_execute() -> None:
    @task
    def aborts(payload: dict[str, Any], ctx: TaskContext) -> None:
        raise AbortRun("bad input")

    with pytest.raises(AbortRun, match="bad input"):
        await aborts.execute({}, ctx())


def test_abort_run_is_an_ordinary_exception() -> None:
    assert issubclass(AbortRun, Exception)
    assert str(AbortRun("stop")) == "stop"


# --------------------------------------------------------------------------- hints


def test_retry_defaults() -> None:
    retry = Retry()
    assert (
        retry.max_attempts,
        retry.factor,
        retry.min_timeout_ms,
        retry.max_timeout_ms,
        retry.randomize,
    ) == (
        3,
        2.0,
        1000,
        60000,
        True,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": 101},
        {"factor": 0.5},
        {"min_timeout_ms": -1},
        {"max_timeout_ms": -1},
        {"min_timeout_ms": 5000, "max_timeout_ms": 4000},
        {"unknown": 1},
    ],
)
def test_retry_rejects_out_of_range_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        Retry(**kwargs)


def test_hints_are_frozen_and_documented() -> None:
    retry = Retry()
    with pytest.raises(pydantic.ValidationError):
        retry.max_attempts = 5  # type: ignore[misc]
    queue = Queue(name="q")
    with pytest.raises(pydantic.ValidationError):
        queue.name = "other"  # type: ignore[misc]
    for model in (Retry, Queue, OutOfMemory):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
    assert "authoritative" in (Retry.__doc__ or "") or "wins" in (Retry.__doc__ or "")


@pytest.mark.parametrize(
    "kwargs",
    [{"concurrency_limit": 0}, {"per_key_concurrency_limit": 0}, {"name": "Not_A_Name"}, {"name": ""}],
)
def test_queue_rejects_invalid_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        Queue(**kwargs)


def test_queue_fields_are_optional() -> None:
    assert Queue() == Queue(name=None, concurrency_limit=None, per_key_concurrency_limit=None)


def test_the_decorator_options_are_the_task_specs_models() -> None:
    retry = Retry(
        non_retryable_errors=["ValueError", "billing.errors.Declined"],
        out_of_memory=OutOfMemory(resources={"limits": {"memory": "1Gi"}}),
    )
    # One model: Retry, Queue and OutOfMemory are the Task spec's (no second mapping).
    assert isinstance(retry, RetrySpec) and issubclass(Queue, QueueRef)
    assert set(Retry.model_fields) == set(RetrySpec.model_fields)

    @task(id="billing", retry=retry, queue=Queue(name="money", concurrency_limit=2), max_duration_seconds=90)
    def billing(payload: dict[str, Any], ctx: TaskContext) -> None: ...

    assert isinstance(billing.spec, TaskSpec)
    assert billing.spec.model_dump(by_alias=True, exclude_none=True, mode="json") == {
        "retry": {
            "maxAttempts": 3,
            "factor": 2.0,
            "minTimeoutMs": 1000,
            "maxTimeoutMs": 60000,
            "randomize": True,
            "nonRetryableErrors": ["ValueError", "billing.errors.Declined"],
            "outOfMemory": {"resources": {"limits": {"memory": "1Gi"}}},
        },
        "queue": {"name": "money", "concurrencyLimit": 2},
        "maxDurationSeconds": 90,
    }
    assert Retry().non_retryable_errors == [] and Retry().out_of_memory is None


def test_options_the_task_spec_rejects_raise_at_decoration_with_the_field() -> None:
    with pytest.raises(ValueError, match=r"max_duration_seconds: Input should be greater than or equal to 5"):
        task(id="short", max_duration_seconds=3)(lambda payload, ctx: None)


@pytest.mark.parametrize("name", ["", "Not A Class", "1Error", "a..b", ".Error", "x" * 257])
def test_non_retryable_error_names_must_be_class_names(name: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        Retry(non_retryable_errors=(name,))
    with pytest.raises(pydantic.ValidationError):
        RetrySpec(non_retryable_errors=[name])


# --------------------------------------------------------------------------- catch_error


def test_retry_decisions() -> None:
    assert RetryDecision.skip() == RetryDecision("skip")
    before = datetime.now(UTC)
    later = RetryDecision.retry_after(90)
    assert later.kind == "retry" and later.at is not None
    assert before + timedelta(seconds=90) <= later.at <= datetime.now(UTC) + timedelta(seconds=90)
    assert RetryDecision.retry_after(timedelta(0)).at is not None
    at = datetime(2030, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    assert RetryDecision.retry_at(at) == RetryDecision("retry", datetime(2030, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("make", "error", "says"),
    [
        (lambda: RetryDecision.retry_after(-1), ValueError, "0 or more seconds"),
        (lambda: RetryDecision.retry_after(float("inf")), ValueError, "0 or more seconds"),
        (lambda: RetryDecision.retry_after(True), TypeError, "seconds or a timedelta"),
        (lambda: RetryDecision.retry_after("5"), TypeError, "seconds or a timedelta"),  # type: ignore[arg-type]
        (lambda: RetryDecision.retry_after(1e300), ValueError, "too far"),
        (lambda: RetryDecision.retry_at(datetime(2030, 1, 1)), ValueError, "aware datetime"),
        (lambda: RetryDecision.retry_at("2030-01-01"), TypeError, "takes a datetime"),  # type: ignore[arg-type]
        (lambda: RetryDecision("retry"), ValueError, "retry_after"),
        (lambda: RetryDecision("later"), ValueError, "'skip' or 'retry'"),  # type: ignore[arg-type]
    ],
)
def test_bad_retry_decisions_say_what_to_pass(make: Any, error: type[Exception], says: str) -> None:
    with pytest.raises(error, match=says):
        make()


def test_decide_calls_sync_and_async_hooks_with_the_error_and_the_context() -> None:
    seen: list[tuple[BaseException, TaskContext, bool]] = []

    def sync_hook(error: BaseException, c: TaskContext) -> RetryDecision | None:
        seen.append((error, c, threading.current_thread() is threading.main_thread()))
        return RetryDecision.skip()

    async def async_hook(error: BaseException, c: TaskContext) -> RetryDecision | None:
        seen.append((error, c, True))
        return None

    def f(payload: dict[str, Any], c: TaskContext) -> None:
        return None

    boom, c = ValueError("boom"), ctx()
    assert asyncio.run(task(catch_error=sync_hook)(f).decide(boom, c)) == RetryDecision.skip()
    assert asyncio.run(task(catch_error=async_hook)(f).decide(boom, c)) is None
    assert asyncio.run(task(f).decide(boom, c)) is None  # no hook: the policy decides
    assert [(e, x) for e, x, _ in seen] == [(boom, c), (boom, c)]
    assert seen[0][2] is False  # a sync hook runs in a thread, like a sync task


def test_a_hook_that_returns_something_else_is_an_error_that_says_what_to_return() -> None:
    def f(payload: dict[str, Any], c: TaskContext) -> None:
        return None

    definition = task(catch_error=lambda e, c: "skip")(f)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match=r"returned 'skip'; return RetryDecision.skip\(\)"):
        asyncio.run(definition.decide(ValueError(), ctx()))
    with pytest.raises(TypeError, match="catch_error must be a function"):
        task(catch_error="skip")(f)  # type: ignore[call-overload]


# --------------------------------------------------------------------------- context and logger


def test_context_exposes_run_task_attempt_and_the_task_logger() -> None:
    c = ctx()
    assert (c.run.id, c.run.name, c.run.tags) == ("r-1", "run-1", ("a",))
    assert c.task.id == "t"
    assert (c.attempt.number, c.attempt.max_attempts, c.attempt.is_last) == (2, 3, False)
    assert isinstance(c.logger, logging.Logger)
    assert c.logger.name == "kubetask.task"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.run.name = "x"  # type: ignore[misc]


def test_module_logger_is_the_kubetask_logger_and_parent_of_the_task_logger() -> None:
    assert logger is logging.getLogger("kubetask")
    assert ctx().logger.parent is logger


def test_top_level_package_exports_the_sdk_and_a_version() -> None:
    assert set(kubetask.__all__) >= {
        "task",
        "Retry",
        "Queue",
        "AbortRun",
        "RetryDecision",
        "OutOfMemory",
        "TaskContext",
        "logger",
        "__version__",
    }
    assert kubetask.RetryDecision is kubetask.sdk.RetryDecision
    assert kubetask.task is task
    assert isinstance(kubetask.__version__, str) and kubetask.__version__


def test_sdk_and_runner_import_no_operator_dependencies() -> None:
    code = (
        "import sys, kubetask, kubetask.sdk, kubetask.runner, kubetask.runner.main\n"
        "heavy = {'kopf', 'sqlalchemy', 'aiohttp', 'kubernetes', 'kubernetes_asyncio', 'psycopg'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
