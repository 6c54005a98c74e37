"""What a task's ``catch_error`` hook decides about a failed attempt: :class:`RetryDecision`.

::

    from datetime import timedelta
    from kubetask import RetryDecision, task

    def on_error(error: BaseException, ctx: TaskContext) -> RetryDecision | None:
        if isinstance(error, RateLimited):
            return RetryDecision.retry_after(error.reset_seconds)   # not before the limit resets
        if isinstance(error, InvalidInput):
            return RetryDecision.skip()                              # retrying cannot help
        return None                                                  # the retry policy decides

    @task(id="sync-account", catch_error=on_error)
    def sync_account(payload, ctx): ...

The runner calls the hook when the task raises (not for ``AbortRun``, which already means
"do not retry") and reports the decision with the failure; the operator applies it. A
retry decision never adds attempts: the Task's ``maxAttempts`` still bounds them, and a
Task's ``retry.nonRetryableErrors`` still fails the run (the Task resource is
authoritative). docs/retries.md has the whole picture.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from kubetask.sdk.context import TaskContext

__all__ = ["CatchError", "RetryDecision"]


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Whether, and when, a failed attempt is retried. Make one with :meth:`skip`,
    :meth:`retry_after` or :meth:`retry_at`; return ``None`` from ``catch_error`` to
    leave it to the Task's retry policy."""

    kind: Literal["skip", "retry"]
    """``skip``: fail the run now. ``retry``: the next attempt not before :attr:`at`."""
    at: datetime | None = None
    """For ``retry``: the earliest start of the next attempt (aware, UTC)."""

    def __post_init__(self) -> None:
        # The constructors below are the way in; this keeps a hand-made one honest.
        if self.kind == "skip" and self.at is not None:
            raise ValueError("RetryDecision('skip') takes no time; use RetryDecision.skip()")
        if self.kind == "retry" and (self.at is None or self.at.tzinfo is None):
            raise ValueError(
                "use RetryDecision.retry_after(seconds) or RetryDecision.retry_at(aware datetime)"
            )
        if self.kind not in ("skip", "retry"):
            raise ValueError(f"RetryDecision kind must be 'skip' or 'retry', got {self.kind!r}")

    @classmethod
    def skip(cls) -> RetryDecision:
        """Fail the run now, without another attempt (like raising ``AbortRun``, but
        decided after the fact, with the original error kept as the run's error)."""
        return cls("skip")

    @classmethod
    def retry_after(cls, delay: float | timedelta) -> RetryDecision:
        """Retry, but not before ``delay`` (seconds, or a ``timedelta``) from now, instead
        of the retry policy's back-off. ``0`` retries as soon as a slot is free."""
        if isinstance(delay, bool) or not isinstance(delay, int | float | timedelta):
            raise TypeError(f"retry_after takes seconds or a timedelta, not {type(delay).__name__}")
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"retry_after needs a delay of 0 or more seconds, got {delay!r}")
        try:
            at = datetime.now(UTC) + timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"retry_after: {delay!r} is too far in the future") from None
        return cls("retry", at)

    @classmethod
    def retry_at(cls, when: datetime) -> RetryDecision:
        """Retry, but not before ``when`` (an aware ``datetime``), instead of the retry
        policy's back-off. A time in the past retries as soon as a slot is free."""
        if not isinstance(when, datetime):
            raise TypeError(f"retry_at takes a datetime, not {type(when).__name__}")
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError(
                f"retry_at needs an aware datetime, got the naive {when.isoformat()}; "
                "use e.g. datetime.now(UTC) + timedelta(minutes=5)"
            )
        return cls("retry", when.astimezone(UTC))


#: ``catch_error(error, ctx)``: sync or async, returning a :class:`RetryDecision` or None.
CatchError = Callable[[BaseException, TaskContext], RetryDecision | Awaitable[RetryDecision | None] | None]
