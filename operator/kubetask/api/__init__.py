"""The kubetask HTTP API: the runner endpoints attempt pods call, and the read-only public
endpoints the CLI uses. See docs/api.md."""

from kubetask.api.app import make_app, start_api

__all__ = ["make_app", "start_api"]
