"""The ``kubetask`` command (typer + rich), one module per command group: ``admin``
(operator, db, crds), ``deploy``, ``runs`` (list, get, logs, watch, cancel, replay, bulk), ``schedules``, ``catalog``
(trigger, tasks, queues), ``dashboard`` (the dashboard on a local address); ``common``
holds the options, the client and the formatting.
docs/cli.md describes every command.

Heavy modules (kopf, SQLAlchemy, aiohttp, rich tables) are imported inside the commands
that need them, so ``kubetask --help`` is quick.
"""

from __future__ import annotations

from kubetask.cli import admin, catalog, dashboard, deploy, runs, schedules  # noqa: F401  (they register their commands)
from kubetask.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
