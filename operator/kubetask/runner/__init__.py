"""The runner: the entrypoint of every attempt pod (``python -m kubetask.runner``).

- :mod:`~kubetask.runner.main`: fetch the attempt, run the task, report, exit code;
- :mod:`~kubetask.runner.config`: the pod's environment;
- :mod:`~kubetask.runner.loader`: loading the task from an entrypoint or a source file;
- :mod:`~kubetask.runner.client`: the API client with its retries;
- :mod:`~kubetask.runner.logship`: log capture and shipping.

The requests and answers are the models of :mod:`kubetask.protocol`, the exit codes its
``EXIT_*`` constants. See docs/runner.md. Importing this package reads no environment
variables; :func:`main` does.
"""

from kubetask.runner.main import main

__all__ = ["main"]
