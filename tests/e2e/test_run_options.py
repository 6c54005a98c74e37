"""Run options and rate limits on the real cluster: a delayed run holds nothing until its
time, a run not started within its TTL expires without a pod, and a Queue's rate limit
spaces pod starts as a token bucket. Pod creation times come from a watcher of every
pod event of the namespace."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.e2e.conftest import wait_for
from tests.e2e.harness import Operator, PodWatcher, Stack

pytestmark = pytest.mark.e2e


def source(body: str, task_id: str) -> str:
    return f"from kubetask import task\nimport time\n\n@task(id={task_id!r})\n{body}\n"


QUICK = {
    "source": source("def f(payload, ctx):\n    return payload.get('n')", "quick"),
    "retry": {"maxAttempts": 1},
}


def test_a_delayed_run_has_no_pod_until_its_delay_is_over(stack: Stack, ns: str, operator: Operator) -> None:
    stack.apply_task(ns, "quick", QUICK)
    with PodWatcher(stack, ns) as watcher:
        created = time.time()
        stack.create_run(ns, "quick", name="later", delaySeconds=8, payload={"n": 1})
        run = stack.wait_run(ns, "later", {"Delayed"}, timeout=60)
        assert run["status"]["nextAttemptAt"], run["status"]
        admitted = {c["type"]: c for c in run["status"]["conditions"]}["Admitted"]
        assert (admitted["status"], admitted["reason"]) == ("False", "Delayed")
        st = stack.wait_run(ns, "later", timeout=120)["status"]
        first = min(watcher.first_created().values())
    assert st["phase"] == "Succeeded" and st["output"] == 1, st
    # The pod came after the delay (the watcher's clock; 1 s for the Run's own creation).
    assert first - created >= 8 - 1, first - created


def test_a_run_not_started_within_its_ttl_expires_without_a_pod(
    stack: Stack, ns: str, operator: Operator
) -> None:
    blocker = source("def f(payload, ctx):\n    time.sleep(payload['s'])\n    return 1", "blocker")
    stack.apply_task(
        ns,
        "blocker",
        {"source": blocker, "retry": {"maxAttempts": 1}, "queue": {"name": "one", "concurrencyLimit": 1}},
    )
    with PodWatcher(stack, ns) as watcher:
        stack.create_run(ns, "blocker", name="holder", payload={"s": 40})
        stack.wait_run(ns, "holder", {"Running"}, timeout=120)
        stack.create_run(ns, "blocker", name="impatient", ttlSeconds=5, payload={"s": 1})
        st = stack.wait_run(ns, "impatient", timeout=60)["status"]
        assert st["phase"] == "Expired" and st["reason"] == "Expired", st
        assert st["attempts"] == []
        stack.patch_run(ns, "holder", {"cancel": True})
        stack.wait_run(ns, "holder", timeout=60)
    assert not [n for n in watcher.uids_by_name if n.startswith("impatient-")]


def grant_times(database_url: str, ns: str) -> list[float]:
    """When each attempt got its slot: ``attempts.created_at``, written in the grant's
    own transaction (PostgreSQL's clock)."""
    engine = create_engine(database_url, poolclass=NullPool)
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT a.created_at FROM attempts a JOIN runs r ON r.id = a.run_id "
                "WHERE r.namespace = :ns ORDER BY a.created_at"
            ),
            {"ns": ns},
        ).scalars()
        out = [ts.timestamp() for ts in rows]
    engine.dispose()
    return out


def rate_limit_in_db(database_url: str, queue: str) -> int | None:
    engine = create_engine(database_url, poolclass=NullPool)
    with engine.connect() as c:
        found = c.execute(text("SELECT rate_limit FROM queues WHERE name = :q"), {"q": queue}).scalar()
    engine.dispose()
    return None if found is None else int(found)


def at_most(starts: list[float], limit: int, interval: float, slack: float) -> None:
    """A token bucket's promise: in any window of w seconds at most limit + w / interval
    starts (``slack``: seconds of measurement noise)."""
    for i, first in enumerate(starts):
        for j in range(i, len(starts)):
            assert j - i + 1 <= limit + (starts[j] - first + slack) / interval, (i, j, starts[j] - first)


def test_a_rate_limit_of_5_per_10s_over_30_runs(
    stack: Stack, ns: str, operator: Operator, e2e_database: str
) -> None:
    stack.apply_queue(ns, "rated", {"rateLimit": {"limit": 5, "periodSeconds": 10}})
    stack.apply_task(ns, "quick", {**QUICK, "queue": {"name": "rated"}})
    # The operator applies a Queue resource a moment after it exists; runs admitted before
    # that would not be limited (as in a cluster): start once the limit is in PostgreSQL.
    wait_for(lambda: rate_limit_in_db(e2e_database, f"{ns}/rated") == 5, 60, "the rate limit applied")
    with PodWatcher(stack, ns) as watcher:
        names = [stack.create_run(ns, "quick", payload={"n": i}) for i in range(30)]
        wait_for(
            lambda: any(
                (c.get("reason") == "RateLimited")
                for st in (stack.get_run(ns, n).get("status") or {} for n in names)
                for c in st.get("conditions") or []
            ),
            60,
            "a run to say it waits for the rate limit",
        )
        done = stack.wait_all(ns, names, timeout=240)
        starts = sorted(watcher.first_created().values())
    assert {r["status"]["phase"] for r in done.values()} == {"Succeeded"}
    assert len(starts) == 30
    # A token bucket: a burst of 5, then one start every 2 s; in any window of w seconds
    # at most 5 + w / 2 starts. Exactly for the grants (PostgreSQL's clock, 0.1 s for the
    # operator's and the database's clocks); for the pods as the watcher saw them created,
    # with up to one interval (2 s) of pod-creation latency under load.
    grants = grant_times(e2e_database, ns)
    assert len(grants) == 30
    at_most(grants, 5, 2.0, slack=0.1)
    at_most(starts, 5, 2.0, slack=2.0)
    # And the limiter did hold them back: 25 starts after the burst need about 50 s.
    assert grants[-1] - grants[0] >= 25 * 2 - 0.5
    assert starts[-1] - starts[0] >= 25 * 2 - 2


def test_debounce_leading_runs_the_first_trigger_and_drops_the_burst(
    stack: Stack, ns: str, operator: Operator
) -> None:
    stack.apply_task(ns, "quick", QUICK)
    debounce = {"key": "user-1", "delaySeconds": 20, "mode": "leading"}
    with PodWatcher(stack, ns) as watcher:
        names = [stack.create_run(ns, "quick", payload={"n": i}, debounce=debounce) for i in range(5)]
        done = stack.wait_all(ns, names, timeout=120)
    phases = {n: (r["status"]["phase"], r["status"]["reason"]) for n, r in done.items()}
    ran = [n for n, (phase, _) in phases.items() if phase == "Succeeded"]
    assert len(ran) == 1, phases
    assert done[ran[0]]["status"]["output"] == 0  # the first trigger's payload
    others = [done[n]["status"] for n in names if n != ran[0]]
    assert {(o["phase"], o["reason"]) for o in others} == {("Deduplicated", "Debounced")}
    assert {o["originalRun"] for o in others} == {done[ran[0]]["status"]["runId"]}
    assert len(watcher.uids_by_name) == 1


def test_debounce_trailing_runs_once_with_the_last_payload_and_max_delay_bounds_it(
    stack: Stack, ns: str, operator: Operator
) -> None:
    stack.apply_task(ns, "quick", QUICK)
    trailing = {"key": "doc-9", "delaySeconds": 4, "mode": "trailing"}
    with PodWatcher(stack, ns) as watcher:
        names = [stack.create_run(ns, "quick", payload={"n": i}, debounce=trailing) for i in range(4)]
        last_trigger = time.time()
        done = stack.wait_all(ns, names, timeout=120)
        first_pod = min(watcher.first_created().values())
    ran = [r["status"] for r in done.values() if r["status"]["phase"] == "Succeeded"]
    assert len(ran) == 1 and ran[0]["output"] == 3, [r["status"] for r in done.values()]  # the last payload
    assert sum(1 for r in done.values() if r["status"]["reason"] == "Debounced") == 3
    assert first_pod - last_trigger >= 4 - 1  # after the quiet time (1 s for the watcher)
    # A steady stream (every second, for 8 s) with maxDelaySeconds 5: the burst's run does
    # not wait for the stream to end.
    stream = {"key": "stream", "delaySeconds": 3, "mode": "trailing", "maxDelaySeconds": 5}
    with PodWatcher(stack, ns) as watcher:
        start = time.time()
        names = []
        for i in range(8):
            names.append(stack.create_run(ns, "quick", payload={"n": 100 + i}, debounce=stream))
            time.sleep(1)
        done = stack.wait_all(ns, names, timeout=120)
        pods = sorted(watcher.first_created().values())
    ran = [r["status"] for r in done.values() if r["status"]["phase"] == "Succeeded"]
    assert len(ran) >= 2, [(r["status"]["phase"], r["status"]["reason"]) for r in done.values()]
    assert pods[0] - start <= 5 + 2  # the first burst's run started by its maxDelay (2 s slack)
