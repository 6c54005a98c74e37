"""The logger tasks write to.

``from kubetask import logger`` gives the ``kubetask`` logger. Inside an attempt pod the
runner attaches a handler to it that ships every record to the operator (stream ``log``)
and echoes it to the container's stderr, so ``kubectl logs`` shows it too. Outside the
runner it is an ordinary :class:`logging.Logger`: configure it as you like.

``ctx.logger`` (the ``kubetask.task`` logger) is a child of this one and is captured the
same way.
"""

from __future__ import annotations

import logging as _logging

__all__ = ["TASK_LOGGER_NAME", "logger"]

#: Name of the logger handed to tasks as ``ctx.logger``.
TASK_LOGGER_NAME = "kubetask.task"

#: The ``kubetask`` logger.
logger: _logging.Logger = _logging.getLogger("kubetask")
