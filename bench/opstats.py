"""``python -m bench.opstats operator``: the kubetask operator, counting the database
statements and transactions it sends by code path.

A SQLAlchemy ``before_cursor_execute`` / ``commit`` listener on every engine attributes each
statement to the kubetask coroutines that issued it (found from the greenlet SQLAlchemy's
asyncio layer runs in: its parent's suspended frame is the awaiting coroutine stack). The
counts are written as JSON to ``$KUBETASK_BENCH_OPSTATS`` twice a second. The overhead is a
frame walk per statement; use it to explain numbers, not to produce them.

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
from typing import Any

import greenlet
from sqlalchemy import event
from sqlalchemy.engine import Engine

#: The process's own frames around the event loop: not a code path.
OUTER = {"<module>", "main", "run_operator", "operator_cmd"}
statements: Counter[str] = Counter()
commits: Counter[str] = Counter()


def where() -> str:
    """'outermost kubetask function > innermost kubetask function' of the caller."""
    g = greenlet.getcurrent()
    frame = g.parent.gr_frame if g.parent is not None else sys._getframe(2)
    names: list[str] = []
    while frame is not None:
        code = frame.f_code
        if f"{os.sep}kubetask{os.sep}" in code.co_filename:
            names.append(code.co_qualname)
        frame = frame.f_back
    names = [n for n in names if n not in OUTER]
    if not names:
        return "?"
    return names[-1] if len(names) == 1 else f"{names[-1]} > {names[0]}"


def _on_statement(*_: Any) -> None:
    statements[where()] += 1


def _on_commit(*_: Any) -> None:
    commits[where()] += 1


def _dump(path: str) -> None:
    while True:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"statements": dict(statements), "commits": dict(commits), "at": time.time()}, f)
        os.replace(tmp, path)
        time.sleep(0.5)


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
    event.listen(Engine, "before_cursor_execute", _on_statement)
    event.listen(Engine, "commit", _on_commit)
    path = os.environ.get("KUBETASK_BENCH_OPSTATS")
    if path:
        threading.Thread(target=_dump, args=(path,), daemon=True).start()
    sys.argv = ["kubetask", *sys.argv[1:]]
    runpy.run_module("kubetask.cli", run_name="__main__", alter_sys=True)


def read(path: str) -> dict[str, Counter[str]]:
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return {"statements": Counter(), "commits": Counter()}
    return {"statements": Counter(raw["statements"]), "commits": Counter(raw["commits"])}


def diff(after: dict[str, Counter[str]], before: dict[str, Counter[str]]) -> dict[str, dict[str, int]]:
    return {k: dict((after[k] - before[k]).most_common()) for k in ("statements", "commits")}


if __name__ == "__main__":
    main()
