"""The child process of :func:`kubetask.deploy.discover.find_tasks`:
``python -m kubetask.deploy.index ROOT OUT MODULE...``.

Imports each module with ``ROOT`` first on ``sys.path`` and writes to ``OUT`` (JSON)
either ``{"tasks": [{"id", "entrypoint", "spec"}, ...]}`` or ``{"error": "what to fix"}``.
A separate process, so that the user's module-level code (prints, ``sys.exit``, changes
to ``sys.modules``) cannot disturb the command; the task functions themselves are only
looked at, never called.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from kubetask.sdk.task import TaskDefinition


def _where(error: BaseException, root: Path) -> str:
    """``path/to/tasks.py:12`` of the innermost frame in the user's code, if any."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename.startswith(str(root))]
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {last.filename}:{last.lineno})"


def index(root: Path, modules: list[str]) -> dict[str, Any]:
    sys.path.insert(0, str(root))
    found: dict[int, tuple[str, TaskDefinition]] = {}
    for name in modules:
        try:
            module = importlib.import_module(name)
        except BaseException as e:  # SystemExit too: the user's code, reported
            what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            return {
                "error": f"cannot import module {name} of the package under {root}: {what}{_where(e, root)}"
            }
        for attr, value in sorted(vars(module).items()):
            if not isinstance(value, TaskDefinition):
                continue
            entrypoint = f"{name}:{attr}"
            home = (
                getattr(value.fn, "__module__", None) == name and getattr(value.fn, "__name__", None) == attr
            )
            known = found.get(id(value))
            # A function re-exported elsewhere (from .tasks import hello) keeps the
            # entrypoint of the module that defines it.
            if known is None or home:
                found[id(value)] = (entrypoint, value)
    by_id: dict[str, tuple[str, TaskDefinition]] = {}
    for entrypoint, definition in found.values():
        if definition.id in by_id:
            other = by_id[definition.id][0]
            first, second = sorted((other, entrypoint))
            return {
                "error": f"two @task functions have the id {definition.id!r} ({first} and {second}): "
                "task ids name Task resources and must be unique; pass @task(id=...) to one of them"
            }
        by_id[definition.id] = (entrypoint, definition)
    return {
        "tasks": [
            {
                "id": task_id,
                "entrypoint": entrypoint,
                "spec": definition.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
            }
            for task_id, (entrypoint, definition) in sorted(by_id.items())
        ]
    }


def main(argv: list[str]) -> None:
    root, out, modules = Path(argv[0]), Path(argv[1]), argv[2:]
    result = index(root, modules)
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
    # The user's modules may have started threads; their work is not ours to wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
