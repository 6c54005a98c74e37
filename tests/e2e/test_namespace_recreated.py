"""A namespace deleted under runs in flight, then created again under the same name (as
a CI job or a GitOps tool re-creating an environment does): the old runs end, their queue
slots come back, and the namespace's new runs get the queue's whole capacity."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.e2e.conftest import wait_for
from tests.e2e.harness import TERMINAL, Operator, PodWatcher, Stack
from tests.e2e.test_control_loop import SLEEPER, token_secrets
from tests.e2e.test_faults import leftovers

pytestmark = pytest.mark.e2e

LIMIT = 2
TASK = {**SLEEPER, "queue": {"name": "shared"}}
EMPTY = {"slots": 0, "running": 0, "live_attempts": 0}


def create_namespace(stack: Stack, name: str) -> None:
    stack.core.create_namespace({"metadata": {"name": name, "labels": {"kubetask.dev/e2e": "true"}}})
    # Pods can be created once the namespace's default ServiceAccount exists.
    wait_for(lambda: _has_default_account(stack, name), 30, f"the ServiceAccount of {name}")


def _has_default_account(stack: Stack, ns: str) -> bool:
    try:
        stack.core.read_namespaced_service_account("default", ns)
    except ApiException:
        return False
    return True


def gone(stack: Stack, ns: str) -> bool:
    try:
        stack.core.read_namespace(ns)
    except ApiException as e:
        return bool(e.status == 404)
    return False


@contextlib.contextmanager
def deleted_at_the_end(stack: Stack, name: str) -> Iterator[str]:
    try:
        yield name
    finally:
        with contextlib.suppress(ApiException):
            stack.core.delete_namespace(name, propagation_policy="Background")


def setup(stack: Stack, ns: str) -> None:
    stack.apply_queue(ns, "shared", {"concurrencyLimit": LIMIT})
    stack.apply_task(ns, "sleeper", TASK)


def phases(stack: Stack, ns: str, names: list[str]) -> list[str]:
    return sorted((stack.get_run(ns, n).get("status") or {}).get("phase", "") for n in names)


@pytest.mark.parametrize("operator_away", [False, True], ids=["watching", "operator-away"])
def test_runs_of_a_namespace_deleted_and_created_again_end_and_give_their_slots_back(
    stack: Stack,
    ns: str,
    e2e_database: str,
    start_operator: Callable[..., Operator],
    operator_away: bool,
) -> None:
    """``operator-away``: the operator is SIGKILLed before the namespace is deleted and
    started again once it exists anew, so it sees none of the deletions happen."""
    # The operator's Lease stays in `ns`; the runs live in `victim`.
    with deleted_at_the_end(stack, f"e2e-recreated-{secrets.token_hex(3)}") as victim:
        create_namespace(stack, victim)
        op = start_operator(namespaces=[ns, victim])
        setup(stack, victim)
        with PodWatcher(stack, victim) as before:
            old = [stack.create_run(victim, "sleeper", payload={"s": 600}) for _ in range(2 * LIMIT)]
            wait_for(
                lambda: (
                    phases(stack, victim, old) == ["Queued"] * LIMIT + ["Running"] * LIMIT
                    and len(before.alive) == LIMIT
                ),
                90,
                "two runs running and two queued",
            )
            ids = {n: stack.get_run(victim, n)["status"]["runId"] for n in old}
            if operator_away:
                op.kill()
            stack.core.delete_namespace(victim)
            wait_for(lambda: gone(stack, victim), 120, f"namespace {victim} to go")
        create_namespace(stack, victim)
        setup(stack, victim)
        if operator_away:
            op = start_operator("back", namespaces=[ns, victim])

        # Every old run ended (its record says how), and the queue holds nothing of them.
        def records() -> dict[str, dict[str, Any]]:
            return {n: op.get(f"/api/v1/runs/{i}") for n, i in ids.items()}

        wait_for(lambda: all(r["phase"] in TERMINAL for r in records().values()), 60, "the old runs to end")
        wait_for(lambda: leftovers(e2e_database, victim) == EMPTY, 30, "the old runs' slots to be released")
        ended = {n: (r["phase"], r["reason"]) for n, r in records().items()}
        assert set(ended.values()) == {("Canceled", "RunDeleted")}, ended

        # The new runs under the same name get the queue's whole capacity.
        with PodWatcher(stack, victim) as after:
            new = [stack.create_run(victim, "sleeper", payload={"s": 4}) for _ in range(LIMIT)]
            done = stack.wait_all(victim, new, timeout=120)
            wait_for(lambda: not stack.pods(victim), 30, "the new runs' pods to be deleted")
        assert {r["status"]["phase"] for r in done.values()} == {"Succeeded"}, done
        assert after.max_alive.get("shared") == LIMIT, after.max_alive
        # None of the old runs got a pod in the new namespace.
        assert {ev.labels["kubetask.dev/run"] for ev in after.events} == set(new)
        assert token_secrets(stack, victim) == []
        assert leftovers(e2e_database, victim) == EMPTY
        assert {n: (r["phase"], r["reason"]) for n, r in records().items()} == ended
