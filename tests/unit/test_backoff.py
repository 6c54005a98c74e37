from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubetask.engine.backoff import delay_ms
from kubetask.spec import RetrySpec


def fixed(value: float):  # type: ignore[no-untyped-def]
    return lambda: value


def test_retry_waits_min_timeout_then_doubles() -> None:
    retry = RetrySpec(factor=2, min_timeout_ms=1000, max_timeout_ms=60_000, randomize=False)
    assert [delay_ms(retry, failed_attempt=n) for n in range(1, 6)] == [1000, 2000, 4000, 8000, 16000]


def test_delay_is_capped_at_max_timeout() -> None:
    retry = RetrySpec(factor=3, min_timeout_ms=1000, max_timeout_ms=5000, randomize=False)
    assert [delay_ms(retry, failed_attempt=n) for n in range(1, 5)] == [1000, 3000, 5000, 5000]


def test_jitter_multiplies_by_one_to_two() -> None:
    retry = RetrySpec(factor=2, min_timeout_ms=1000, max_timeout_ms=60_000, randomize=True)
    assert delay_ms(retry, failed_attempt=2, rand=fixed(0.0)) == 2000
    assert delay_ms(retry, failed_attempt=2, rand=fixed(0.5)) == 3000
    assert delay_ms(retry, failed_attempt=2, rand=fixed(0.999999)) == 3999


def test_jitter_never_exceeds_the_cap() -> None:
    retry = RetrySpec(factor=2, min_timeout_ms=1000, max_timeout_ms=1500, randomize=True)
    assert delay_ms(retry, failed_attempt=1, rand=fixed(0.99)) == 1500
    assert delay_ms(retry, failed_attempt=10, rand=fixed(0.99)) == 1500


def test_huge_attempt_numbers_do_not_overflow() -> None:
    retry = RetrySpec(factor=100, min_timeout_ms=1, max_timeout_ms=7000, randomize=False, max_attempts=100)
    assert delay_ms(retry, failed_attempt=10_000) == 7000


def test_attempt_numbers_count_from_one() -> None:
    with pytest.raises(ValueError, match="counts from 1"):
        delay_ms(RetrySpec(), failed_attempt=0)


@given(
    factor=st.floats(min_value=1, max_value=100),
    lo=st.integers(min_value=0, max_value=100_000),
    span=st.integers(min_value=0, max_value=100_000),
    n=st.integers(min_value=1, max_value=200),
    r=st.floats(min_value=0, max_value=0.999999),
)
def test_delay_stays_within_bounds(factor: float, lo: int, span: int, n: int, r: float) -> None:
    retry = RetrySpec(factor=factor, min_timeout_ms=lo, max_timeout_ms=lo + span, randomize=True)
    plain = delay_ms(retry.model_copy(update={"randomize": False}), failed_attempt=n)
    jittered = delay_ms(retry, failed_attempt=n, rand=fixed(r))
    assert lo <= plain <= lo + span or plain == lo + span
    assert plain <= jittered <= min(lo + span, 2 * plain + 1)
