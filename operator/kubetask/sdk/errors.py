"""Exceptions a task raises to steer what happens to its run."""

from __future__ import annotations

__all__ = ["AbortRun"]


class AbortRun(Exception):
    """Fail the run now, without retrying.

    Any other exception a task raises fails the *attempt*; the run is retried while the
    Task's retry policy allows. Raise ``AbortRun`` when retrying cannot help (bad input,
    a permanent refusal from a downstream system): the attempt is reported as failed and
    not retryable, and the runner exits with code 10.

    The message (``str(exc)``) becomes the run's error message.
    """
