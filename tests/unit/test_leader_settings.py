"""LeaseSettings: the election's timing is validated once, when the settings are made."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from kubetask.control.leader import LeaseSettings, new_identity


def settings(**overrides: Any) -> LeaseSettings:
    return LeaseSettings(**{"namespace": "kubetask-system", "identity": "op-0_abcd", **overrides})


def test_defaults_are_client_go_like_and_valid() -> None:
    s = settings()
    assert s.name == "kubetask-operator"
    assert (s.lease_duration, s.renew_deadline, s.retry_period) == (10.0, 7.0, 2.0)


def test_short_test_timings_are_valid() -> None:
    settings(lease_duration=2, renew_deadline=1.4, retry_period=0.3)


@pytest.mark.parametrize("renew_deadline", [10.0, 12.0])
def test_renew_deadline_must_be_shorter_than_lease_duration(renew_deadline: float) -> None:
    with pytest.raises(ValueError, match=r"renew_deadline \(.*\) must be shorter than lease_duration"):
        settings(lease_duration=10.0, renew_deadline=renew_deadline)


@pytest.mark.parametrize("retry_period", [7.0, 8.0])
def test_retry_period_must_be_shorter_than_renew_deadline(retry_period: float) -> None:
    with pytest.raises(ValueError, match=r"retry_period \(.*\) must be shorter than renew_deadline"):
        settings(retry_period=retry_period)


@pytest.mark.parametrize("field", ["lease_duration", "renew_deadline", "retry_period"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf")])
def test_durations_must_be_positive_and_finite(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{field} must be a positive number"):
        settings(**{field: value})


@pytest.mark.parametrize("field", ["namespace", "name", "identity"])
def test_names_must_not_be_empty(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must not be empty"):
        settings(**{field: ""})


def test_identity_is_required_and_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        LeaseSettings(namespace="ns")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        LeaseSettings("ns", "lease", "me")  # type: ignore[call-arg]


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings().lease_duration = 1.0  # type: ignore[misc]


def test_new_identities_are_unique_per_process_start() -> None:
    a, b = new_identity("kubetask-operator-7d9f"), new_identity("kubetask-operator-7d9f")
    assert a != b
    assert a.startswith("kubetask-operator-7d9f_")
    assert new_identity()  # defaults to the host (pod) name
