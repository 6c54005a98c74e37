"""Exceptions a task raises to steer what happens to its run."""

from __future__ import annotations

from typing import Any

__all__ = ["AbortRun", "ChildRunFailed", "ReplayMismatch", "Suspended", "WaitTimeout"]


class AbortRun(Exception):
    """Fail the run now, without retrying.

    Any other exception a task raises fails the *attempt*; the run is retried while the
    Task's retry policy allows. Raise ``AbortRun`` when retrying cannot help (bad input,
    a permanent refusal from a downstream system): the attempt is reported as failed and
    not retryable, and the runner exits with code 10.

    The message (``str(exc)``) becomes the run's error message.
    """


class WaitTimeout(Exception):
    """A durable wait (``ctx.wait_for_event``, ``ctx.wait_for_token``) timed out."""

    def __init__(self, message: str, *, name: str = "") -> None:
        super().__init__(message)
        self.name = name


class ChildRunFailed(Exception):
    """The child run of ``ctx.trigger_and_wait`` did not succeed. ``phase`` is its phase
    (``Failed``, ``Canceled``, ``TimedOut``...), ``error`` its error (``type``, ``message``)."""

    def __init__(self, run_id: str, phase: str, error: dict[str, Any] | None) -> None:
        err = error or {}
        detail = f"{err.get('type', phase)}: {err.get('message', '')}".rstrip(": ")
        super().__init__(f"child run {run_id} ended {phase}: {detail}")
        self.run_id = run_id
        self.phase = phase
        self.error = err


class ReplayMismatch(Exception):
    """A replay of the task called a different step or wait at the same position than
    the run's journal recorded: the code between steps is not deterministic (it must not
    branch on time, randomness or outside state; put those in steps). Not retried."""


class Suspended(BaseException):
    """Raised inside a task when it suspends on a durable wait: the runner catches it and
    exits with code 14 (the run becomes ``Waiting``). A BaseException, so that a task's
    ``except Exception`` does not swallow it; do not catch it."""
