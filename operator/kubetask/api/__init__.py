"""The kubetask HTTP API, on two listeners. See docs/api.md.

- :mod:`~kubetask.api.server`: both applications, every route, the listeners,
  ``/healthz``, ``/metrics``;
- :mod:`~kubetask.api.runner`: ``/runner/v1`` (runner listener) and the per-attempt token;
- :mod:`~kubetask.api.auth`: bearer tokens (TokenReview) and RBAC (SubjectAccessReview);
- :mod:`~kubetask.api.runs`: reading runs (list, one run, logs), query parameters, cursors;
- :mod:`~kubetask.api.actions`: trigger, batch, cancel, replay, bulk cancel and replay;
- :mod:`~kubetask.api.catalog`: tasks and queues of a namespace, queue changes;
- :mod:`~kubetask.api.openapi`: the OpenAPI 3.1 document, generated;
- :mod:`~kubetask.api.errors`: the JSON error body, the middleware, reading bodies;
- :mod:`~kubetask.api.state`: what the handlers find in the application.

The bodies of ``/runner/v1`` are the models of :mod:`kubetask.protocol`; those of
``/api/v1`` the models of :mod:`kubetask.apimodels`.
"""

from kubetask.api.server import Apps, Listeners, make_app, make_public_app, make_runner_app, start_api

__all__ = ["Apps", "Listeners", "make_app", "make_public_app", "make_runner_app", "start_api"]
