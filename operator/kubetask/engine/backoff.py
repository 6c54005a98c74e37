"""Back-off between attempts."""

from __future__ import annotations

import random
from collections.abc import Callable

from kubetask.spec import RetrySpec


def delay_ms(retry: RetrySpec, *, failed_attempt: int, rand: Callable[[], float] = random.random) -> int:
    """Milliseconds to wait after attempt ``failed_attempt`` (1-based) failed, before
    the next attempt's pod is created.

    delay = min(max, min_timeout * factor**(n-1)); with ``randomize`` it is multiplied
    by a factor drawn uniformly from [1, 2) and capped at ``max_timeout_ms`` again, so
    the cap holds whatever the jitter (the same rule Trigger.dev documents).
    """
    if failed_attempt < 1:
        raise ValueError(f"failed_attempt counts from 1, got {failed_attempt}")
    # Exponents past ~1000 overflow a float; by then the cap has long been reached.
    exponent = min(failed_attempt - 1, 1000)
    try:
        base = retry.min_timeout_ms * retry.factor**exponent
    except OverflowError:
        base = float(retry.max_timeout_ms)
    base = min(float(retry.max_timeout_ms), base)
    if retry.randomize:
        base *= 1.0 + rand()
    return int(min(float(retry.max_timeout_ms), base))
