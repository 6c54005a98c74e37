"""/metrics during a run, scraped from the operator process as Prometheus would: the live
gauges (runs by phase, the queue's running count) show the run while it runs, and the
counters (runs finished, attempts by outcome, start latency, database statements) move by
exactly what the run did."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import wait_for
from tests.e2e.harness import Operator, Stack
from tests.e2e.test_control_loop import source

pytestmark = pytest.mark.e2e

#: Fails its first attempt, succeeds its second after sleeping ``s`` seconds.
FLAKY_SLEEPER = {
    "source": source(
        "def f(payload, ctx):\n"
        "    if ctx.attempt.number == 1:\n"
        "        raise RuntimeError('first attempt fails')\n"
        "    time.sleep(payload.get('s', 1))\n"
        "    return ctx.attempt.number",
        "flaky",
    ),
    "retry": {"maxAttempts": 3, "minTimeoutMs": 500, "maxTimeoutMs": 1000},
    "queue": {"name": "metered", "concurrencyLimit": 4},
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(op: Operator) -> Samples:
    with urllib.request.urlopen(f"{op.api}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_the_numbers_move_with_a_run(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_task(ns, "flaky", FLAKY_SLEEPER)
    queue = f"{ns}/metered"
    before = scrape(operator)
    name = stack.create_run(ns, "flaky", payload={"s": 8})

    # While the second attempt runs: the live gauges (read every few seconds) show it.
    def running_shown() -> bool:
        now = scrape(operator)
        return (
            value(now, "kubetask_runs", namespace=ns, task="flaky", phase="Running") == 1
            and value(now, "kubetask_queue_running", queue=queue) == 1
            and value(now, "kubetask_queue_limit", queue=queue) == 4
            and value(now, "kubetask_attempts_total", namespace=ns, task="flaky", outcome="Failed") == 1
        )

    wait_for(running_shown, 60, "the running run in the live gauges, after its failed first attempt")
    run = stack.wait_run(ns, name, timeout=120)
    assert run["status"]["phase"] == "Succeeded", run["status"]

    def finished_shown() -> bool:
        now = scrape(operator)
        return (
            value(now, "kubetask_runs", namespace=ns, task="flaky", phase="Running") == 0
            and value(now, "kubetask_queue_running", queue=queue) == 0
        )

    wait_for(finished_shown, 30, "the gauges to let the finished run go")
    after = scrape(operator)
    labels = {"namespace": ns, "task": "flaky"}

    def moved(name: str, **more: str) -> float:
        return value(after, name, **labels, **more) - value(before, name, **labels, **more)

    assert moved("kubetask_runs_finished_total", phase="Succeeded") == 1
    assert moved("kubetask_attempts_total", outcome="Failed") == 1
    assert moved("kubetask_attempts_total", outcome="Succeeded") == 1
    assert moved("kubetask_run_start_latency_seconds_count") == 1
    # The first pod came after the run's creation, within the test's minute.
    latency = value(after, "kubetask_run_start_latency_seconds_sum", **labels)
    assert 0 < latency < 60, latency
    assert total(after, "kubetask_db_statement_seconds_count") > total(
        before, "kubetask_db_statement_seconds_count"
    )
    # Nothing failed in the control loop or at pod creation on the way.
    assert total(after, "kubetask_reconcile_errors_total") == total(before, "kubetask_reconcile_errors_total")
    assert total(after, "kubetask_pod_create_errors_total") == 0
