"""The runner: the entrypoint of every attempt pod (``python -m kubetask.runner``).

See :mod:`kubetask.runner.main` and docs/runner.md. Importing this package reads no
environment variables; :func:`main` does.
"""

from kubetask.runner.main import ExitCode, main

__all__ = ["ExitCode", "main"]
