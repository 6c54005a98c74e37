"""Matching a failed attempt's exception against a Task's ``retry.nonRetryableErrors``.

The match happens in the operator, not in the runner: the rule belongs to the Task
resource, which the operator reads (and may change between attempts), while the runner
only reports what was raised, as the class hierarchy ``error.types``
(:func:`kubetask.protocol.exception_types`). So a changed Task applies to the next
failure at once, without a new image, and a runner of any version is judged by the same
rule.
"""

from __future__ import annotations

from collections.abc import Iterable


def non_retryable_match(patterns: Iterable[str], types: Iterable[str]) -> tuple[str, str] | None:
    """The first ``(pattern, type)`` where a pattern names one of the types, or None.

    ``types`` are ``module.QualifiedName`` strings, the most derived class first. A
    pattern names a type when it is the whole name or its end after a dot: ``ValueError``
    matches ``builtins.ValueError`` (and a subclass whose bases include it),
    ``billing.errors.Declined`` and ``errors.Declined`` match ``billing.errors.Declined``,
    while ``Declined2`` and ``rors.Declined`` do not.
    """
    wanted = tuple(patterns)
    if not wanted:
        return None
    for name in types:
        for pattern in wanted:
            if name == pattern or name.endswith("." + pattern):
                return pattern, name
    return None
