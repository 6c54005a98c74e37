"""``python -m bench.opstats operator``: the kubetask operator, counting the database
statements and transactions it sends by code path.

A SQLAlchemy ``before_cursor_execute`` / ``commit`` listener on every engine attributes each
statement to the kubetask coroutines that issued it (found from the greenlet SQLAlchemy's
asyncio layer runs in: its parent's suspended frame is the awaiting coroutine stack). The
counts are written as JSON to ``$KUBETASK_BENCH_OPSTATS`` every
``$KUBETASK_BENCH_OPSTATS_EVERY`` seconds (default 0.5), with the time of writing. The
overhead is a frame walk per statement; use it to explain numbers, not to produce them.

With ``$KUBETASK_BENCH_PROFILE`` set, SIGUSR1 starts a cProfile and SIGUSR2 stops it and
writes it there.
"""

from __future__ import annotations

import cProfile
import json
import os
import runpy
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from contextvars import ContextVar
from types import FrameType
from typing import Any

import greenlet  # type: ignore[import-untyped]
from sqlalchemy import event
from sqlalchemy.engine import Engine

#: Frames that only carry work to the code that does it (the process's entry around the
#: event loop, the leader's wrapper, the work queues' workers, the API's middleware): not
#: a code path.
PLUMBING = {"<module>", "main", "run_operator", "operator_cmd", "_await", "middleware"}
PLUMBING_PREFIXES = ("WorkQueue.",)
statements: Counter[str] = Counter()
commits: Counter[str] = Counter()
#: The distinct statements seen on each code path (the first few, 160 characters each).
examples: dict[str, list[str]] = {}
EXAMPLES_PER_PATH = 8


def path_of(frame: FrameType | None) -> str:
    """The kubetask functions on the stack from ``frame`` out, outermost first, joined by
    " > " (e.g. ``Controller.reconcile > Attempts.reconcile > Transitions.apply``); ""
    when there are none. :func:`outer_inner` shortens it."""
    names: list[str] = []
    while frame is not None:
        code = frame.f_code
        if f"{os.sep}kubetask{os.sep}" in code.co_filename:
            name = code.co_qualname
            if name not in PLUMBING and not name.startswith(PLUMBING_PREFIXES) and name not in names[-1:]:
                names.append(name)
        frame = frame.f_back
    return " > ".join(reversed(names))


#: The path of the code whose ``async with`` SQLAlchemy finishes in a task of its own.
_carried: ContextVar[str] = ContextVar("opstats_carried", default="?")


def where() -> str:
    """The code path of the statement being sent (see :func:`path_of`), "?" if unknown."""
    g = greenlet.getcurrent()
    # SQLAlchemy's asyncio layer runs the sync ORM in a greenlet whose parent is
    # suspended in the awaiting coroutine stack.
    return path_of(g.parent.gr_frame if g.parent is not None else sys._getframe(2)) or _carried.get()


def _carry_paths_into_shielded_tasks() -> None:
    """SQLAlchemy ends ``async with sessions.begin()`` (the commit, with the flush of what is
    still pending) and ``async with session`` in a task of its own, shielded from
    cancellation (``_run_to_completion``): no kubetask frame is on that task's stack. The
    path of the code that left the block is handed to it in a context variable (a task
    copies the context it is created in)."""
    from sqlalchemy.ext.asyncio import engine as sa_engine
    from sqlalchemy.ext.asyncio import session as sa_session

    original = sa_session._run_to_completion  # type: ignore[attr-defined]

    async def run_to_completion(coro: Coroutine[Any, Any, Any]) -> Any:
        token = _carried.set(path_of(sys._getframe(1)) or "?")
        try:
            return await original(coro)
        finally:
            _carried.reset(token)

    sa_session._run_to_completion = run_to_completion  # type: ignore[attr-defined]
    sa_engine._run_to_completion = run_to_completion  # type: ignore[attr-defined]


def outer_inner(path: str) -> str:
    """'outermost > innermost' of a path :func:`where` gave."""
    names = path.split(" > ")
    return names[0] if len(names) == 1 else f"{names[0]} > {names[-1]}"


def by_outer_inner(counts: dict[str, int]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for path, n in counts.items():
        out[outer_inner(path)] += n
    return dict(out.most_common())


def _on_statement(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
    path = where()
    statements[path] += 1
    seen = examples.setdefault(path, [])
    if len(seen) < EXAMPLES_PER_PATH:
        sql = " ".join(statement.split())[:160]
        if sql not in seen:
            seen.append(sql)


def _on_commit(*_: Any) -> None:
    commits[where()] += 1


def _dump(path: str, every: float) -> None:
    while True:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(
                {
                    "statements": dict(statements),
                    "commits": dict(commits),
                    "examples": {k: list(v) for k, v in dict(examples).items()},
                    "at": time.time(),
                },
                f,
            )
        os.replace(tmp, path)
        time.sleep(every)


def _profiler(path: str) -> None:
    """SIGUSR1 starts a cProfile of the event loop's thread, SIGUSR2 stops it and
    writes it to ``path`` (pstats format)."""
    prof = cProfile.Profile()

    def on(*_: Any) -> None:
        prof.enable()

    def off(*_: Any) -> None:
        prof.disable()
        prof.dump_stats(path)

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)


def main() -> None:
    if prof := os.environ.get("KUBETASK_BENCH_PROFILE"):
        _profiler(prof)
    _carry_paths_into_shielded_tasks()
    event.listen(Engine, "before_cursor_execute", _on_statement)
    event.listen(Engine, "commit", _on_commit)
    path = os.environ.get("KUBETASK_BENCH_OPSTATS")
    if path:
        every = float(os.environ.get("KUBETASK_BENCH_OPSTATS_EVERY", "0.5"))
        threading.Thread(target=_dump, args=(path, every), daemon=True).start()
    sys.argv = ["kubetask", *sys.argv[1:]]
    runpy.run_module("kubetask.cli", run_name="__main__", alter_sys=True)


def read(path: str) -> dict[str, Counter[str]]:
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return {"statements": Counter(), "commits": Counter()}
    return {"statements": Counter(raw["statements"]), "commits": Counter(raw["commits"])}


def read_after(path: str, after: float, timeout: float = 30) -> dict[str, Counter[str]]:
    """The counts of the first dump written after ``after`` (``time.time()``): every
    statement sent before that moment is in them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, ValueError):
            raw = {}
        if raw.get("at", 0) > after:
            return {"statements": Counter(raw["statements"]), "commits": Counter(raw["commits"])}
        time.sleep(0.02)
    raise TimeoutError(f"{path} was not written for {timeout:.0f}s")


def read_examples(path: str) -> dict[str, list[str]]:
    """Code path -> the distinct statements sent on it (the first few)."""
    try:
        with open(path) as f:
            return dict(json.load(f).get("examples", {}))
    except (OSError, ValueError):
        return {}


def diff(after: dict[str, Counter[str]], before: dict[str, Counter[str]]) -> dict[str, dict[str, int]]:
    return {k: dict((after[k] - before[k]).most_common()) for k in ("statements", "commits")}


if __name__ == "__main__":
    main()
