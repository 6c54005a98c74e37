"""Loading the task: ``KUBETASK_ENTRYPOINT`` (``module:function``) or else the inline
source file, as a :class:`~kubetask.sdk.task.TaskDefinition`. Anything that goes wrong is a
:class:`TaskLoadError` whose message names the problem (docs/runner.md, "Loading the task").

Also here: tracebacks without the runner's own frames, for load errors and task errors.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from kubetask.runner.config import RunnerConfig
from kubetask.sdk.task import TaskDefinition

#: The module name inline source is loaded under.
INLINE_MODULE_NAME = "kubetask_inline_task"


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


def user_traceback(exc: BaseException) -> TracebackType | None:
    """The traceback without the leading runner/SDK/asyncio frames (they only add noise)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not (filename.startswith("<frozen ") or str(Path(filename).resolve()).startswith(_INTERNAL_DIRS)):
            break
        tb = tb.tb_next
    return tb


def format_exc(exc: BaseException) -> str:
    """``exc`` and its :func:`user_traceback`, formatted as Python prints them."""
    return "".join(traceback.format_exception(type(exc), exc, user_traceback(exc)))


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
            format_exc(exc),
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
            format_exc(exc),
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
