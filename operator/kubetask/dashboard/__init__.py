"""The dashboard: server-rendered pages (Jinja2) on the public API's listener, behind the
same authentication and authorization (docs/dashboard.md).

- Pages live under ``/dashboard/``; a caller signs in with a Kubernetes bearer token, kept
  in an HttpOnly, SameSite=Strict cookie (or sends it as the API's headers, which is how
  ``kubetask dashboard`` authenticates its local address).
- The pages' scripts call the public API itself, mounted again under ``/dashboard/api/v1``
  with the cookie as the credential: one set of handlers, queries and permission checks for
  the API, the CLI and the dashboard. A cookie-authenticated request that changes anything
  must carry :data:`~kubetask.dashboard.views.CSRF_HEADER` (a header a cross-site form
  cannot send).
- Every asset (CSS, JavaScript) is served by the operator from this package: the pages make
  no request to any other origin.
"""

from __future__ import annotations

from kubetask.dashboard.views import add_dashboard

__all__ = ["add_dashboard"]
