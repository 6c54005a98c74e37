"""The kubetask HTTP API: the runner endpoints attempt pods call, and the read-only public
endpoints the CLI uses. See docs/api.md.

- :mod:`~kubetask.api.server`: the application (every route), ``/healthz``, ``/metrics``;
- :mod:`~kubetask.api.runner`: ``/runner/v1`` and the per-attempt token;
- :mod:`~kubetask.api.runs`: ``/api/v1`` (runs, one run, logs), query parameters, cursors;
- :mod:`~kubetask.api.errors`: the JSON error body, the middleware, reading bodies;
- :mod:`~kubetask.api.state`: what the handlers find in the application.

The bodies of ``/runner/v1`` are the models of :mod:`kubetask.protocol`.
"""

from kubetask.api.server import make_app, start_api

__all__ = ["make_app", "start_api"]
