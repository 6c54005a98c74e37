"""Which names of a Task's retry.nonRetryableErrors name a reported exception."""

from __future__ import annotations

import pytest

from kubetask.engine.errortypes import non_retryable_match
from kubetask.protocol import MAX_ERROR_TYPES, exception_types


class PaymentError(Exception):
    pass


class Declined(PaymentError):
    class Soft(Exception):
        pass


def test_the_reported_hierarchy_is_the_mro_most_derived_first_without_object() -> None:
    assert exception_types(Declined("x")) == [
        f"{__name__}.Declined",
        f"{__name__}.PaymentError",
        "builtins.Exception",
        "builtins.BaseException",
    ]
    assert exception_types(Declined.Soft())[0] == f"{__name__}.Declined.Soft"
    assert exception_types(KeyError("k")) == [
        "builtins.KeyError",
        "builtins.LookupError",
        "builtins.Exception",
        "builtins.BaseException",
    ]


def test_a_very_deep_hierarchy_is_cut() -> None:
    cls: type[Exception] = Exception
    for i in range(MAX_ERROR_TYPES + 5):
        cls = type(f"E{i}", (cls,), {})
    types = exception_types(cls())
    assert len(types) == MAX_ERROR_TYPES and types[0].endswith(f".E{MAX_ERROR_TYPES + 4}")


@pytest.mark.parametrize(
    ("pattern", "matched"),
    [
        ("Declined", f"{__name__}.Declined"),  # the class's own name
        (f"{__name__}.Declined", f"{__name__}.Declined"),  # module.QualifiedName
        ("PaymentError", f"{__name__}.PaymentError"),  # a base class
        ("Exception", "builtins.Exception"),  # any base
        ("builtins.Exception", "builtins.Exception"),
    ],
)
def test_a_name_matches_the_class_or_a_base_by_name_or_qualified_name(pattern: str, matched: str) -> None:
    assert non_retryable_match([pattern], exception_types(Declined())) == (pattern, matched)


def test_a_nested_class_matches_by_its_own_name_and_its_qualified_name() -> None:
    types = exception_types(Declined.Soft())
    assert non_retryable_match(["Soft"], types) == ("Soft", f"{__name__}.Declined.Soft")
    assert non_retryable_match(["Declined.Soft"], types) is not None
    assert non_retryable_match(["Declined"], types) is None  # the outer class is no base


@pytest.mark.parametrize(
    "pattern", ["Decline", "clined", "ValueError", "other_module.Declined", "Declined.X"]
)
def test_names_that_are_no_class_of_the_hierarchy_do_not_match(pattern: str) -> None:
    assert non_retryable_match([pattern], exception_types(Declined())) is None


def test_nothing_matches_without_patterns_or_types() -> None:
    assert non_retryable_match([], exception_types(Declined())) is None
    assert non_retryable_match(["Declined"], []) is None
