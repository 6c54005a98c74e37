"""The control loop: database statements per run, leader fail-over, start-up with history.

1. statements: one operator run through ``bench.opstats``; a Task ``return 1``; Runs
   created one at a time (``--runs``, after ``--warmup``), each left to finish and the
   operator to go quiet before the next. Per run: the statements the operator process
   sent from just before the create to the Run's status ``Succeeded`` seen, and to quiet
   (the pod deleted, nothing sent for 2 s), by code path. The runner API runs in the
   operator process: its statements are counted, except the log batches
   (``POST /runner/v1/logs``, reported apart); the periodic resync is background and
   reported apart too. ``--baseline-ref`` measures the operator of another commit the
   same way in the same run (its ``operator/`` tree from ``git archive``).
2. failover: two operator processes for one namespace sharing the API ports
   (SO_REUSEPORT), a Queue with ``concurrencyLimit`` 2 and 4 Runs per trial; once the
   leader has created the 2 pods it may, it is SIGKILLed; measured from the signal to the
   next pod ADDED (the new leader's: nothing else can start one), with the new leader's
   log lines for where the time goes. The stopped process is replaced by a new follower
   between trials. With the operator's default lease timings, with the e2e harness's
   short ones, with SIGTERM (a graceful stop releases the Lease), and the baseline: the
   leader left alone (the next pod then waits only for a slot).
3. startup: process start -> the log line ``leading:`` (first resync done) and -> the
   pod of a Run created just before the start, with ``--history`` finished runs in the
   database and ``--resources`` of them still Run resources in Kubernetes, against an
   empty start (fresh database and namespace each time). The history is one Run the
   operator really ran, cloned: its rows (run, attempt, log lines, TTL timer) by SQL, its
   status onto Run objects created while no operator runs; ages spread over 29 days.

    python -m bench.control_loop [--parts statements,failover,startup] [--runs 20] [--trials 5]
        [--history 10000] [--resources 1000] [--starts 3] [--baseline-ref COMMIT]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.e2e.harness import GROUP, TERMINAL, VERSION, HeldPort, Operator, Stack

from bench import opstats
from bench.common import (
    EXTRACTED,
    OPERATOR_REF,
    AllPods,
    admin_database_url,
    bench_database,
    bench_namespace,
    create_bare_run,
    holds_lease,
    insert_copies,
    operator_code,
    print_table,
    ratio,
    stack,
    start_operator,
    summary_ms,
    task_source,
    wait_for,
    wait_task_ready,
    write_results,
)
from kubetask.store import tables as t

TASK = "noop"
SPEC: dict[str, Any] = {
    "source": task_source("def f(payload, ctx):\n    return 1", TASK),
    "retry": {"maxAttempts": 1},
}
#: The issue's numbers for statements per run (not measured here).
STATEMENTS_TARGET, STATEMENTS_BEFORE = 25, 53
FAILOVER_TARGET_S = 15.0
LIMIT = 2
#: The log level of operators whose INFO lines a part reads (``leading:``, transitions).
INFO = "INFO"
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


# ---- shared -------------------------------------------------------------------------------------------


def log_times(op: Operator, needle: str) -> list[float]:
    """When (``time.time()``) the lines of ``op``'s log since its start containing
    ``needle`` were written (the log's local timestamps, millisecond resolution)."""
    with contextlib.suppress(OSError):
        raw = op.log_path.read_text(errors="replace").split(op.start_marker)[-1]
        return [
            dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for line in raw.splitlines()
            if needle in line and (m := LOG_TIME.match(line))
        ]
    return []


def started_at(op: Operator) -> float:
    """``time.time()`` just before the process was started (the harness's start marker)."""
    return float(op.start_marker.split(" started ")[1].split()[0])


def phase(st: Stack, ns: str, name: str) -> str:
    return str((st.get_run(ns, name).get("status") or {}).get("phase") or "")


def wait_phase(st: Stack, ns: str, name: str, timeout: float, every: float = 0.05) -> str:
    """Polls the Run until its phase is terminal; returns it."""
    seen = ""

    def done() -> bool:
        nonlocal seen
        seen = phase(st, ns, name)
        return seen in TERMINAL

    wait_for(done, timeout, f"Run {ns}/{name} to finish", every=every)
    return seen


def seconds(values: list[float]) -> dict[str, float]:
    """p50/p90/max/mean of durations in seconds (summary_ms, back in seconds)."""
    s = summary_ms(values)
    return {k: (v if k == "n" else round(v / 1000, 2)) for k, v in s.items()}


# ---- 1. statements per run ----------------------------------------------------------------------------


def kind_of(path: str) -> str:
    """Which bucket a code path's statements go to: the runner's log batches and the
    periodic background work (the resync, the metrics' readings of live runs and queues:
    a fixed number per period, however many runs) are reported apart from the run's own
    statements."""
    if path.startswith("post_logs"):
        return "log batches"
    if path.startswith("Resync.loop"):
        return "periodic resync"
    if path.startswith("LiveGauges.loop"):
        return "periodic metrics"
    return "run"


def split(stats: dict[str, int]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for path, n in stats.items():
        out[kind_of(path)] += n
    return dict(out)


def statements_part(st: Stack, args: argparse.Namespace, ref: str | None) -> dict[str, Any]:
    code = operator_code(ref) if ref else None
    with (
        bench_database(admin_database_url(), migrate=False) as url,
        bench_namespace(st, "stmts") as ns,
    ):
        op = start_operator(
            st,
            url,
            ns,
            count_statements=True,
            code=code,
            KUBETASK_BENCH_OPSTATS_EVERY="0.1",
        )
        path = str(getattr(op, "stats_path", ""))
        # The commit the operator ran (the working tree's code unless a ref says otherwise).
        label = EXTRACTED.get(ref or os.environ.get(OPERATOR_REF) or "", "working tree")
        print(f"1. statements ({label}): namespace {ns}, operator log {op.log_path}", flush=True)
        runs: list[dict[str, Any]] = []
        try:
            st.apply_task(ns, TASK, SPEC)
            wait_task_ready(st, ns, TASK, timeout=120)
            with AllPods(st, ns) as w:
                for i in range(args.warmup + args.runs):
                    runs.append(one_run(st, ns, w, path, f"s-{i:03d}"))
            examples = opstats.read_examples(path)
        finally:
            op.stop()
    measured = runs[args.warmup :]
    per_run = {
        "to_succeeded": [r["to_succeeded"]["run"] for r in measured],
        "to_quiet": [r["to_quiet"]["run"] for r in measured],
    }
    paths: Counter[str] = Counter()
    commits: Counter[str] = Counter()
    for r in measured:
        paths.update({p: n for p, n in r["statements"].items() if kind_of(p) == "run"})
        commits.update({p: n for p, n in r["commits"].items() if kind_of(p) == "run"})
    n = len(measured)
    return {
        "operator": label,
        "runs": n,
        "phases": Counter(r["phase"] for r in measured),
        "statements_per_run": {k: summary(v) for k, v in per_run.items()},
        "commits_per_run": round(sum(commits.values()) / n, 2),
        "apart_per_run": {
            k: round(sum(r["to_quiet"].get(k, 0) for r in measured) / n, 2)
            for k in ("log batches", "periodic resync", "periodic metrics")
        },
        "by_path_per_run": {p: round(c / n, 2) for p, c in paths.most_common()},
        "by_outer_inner_per_run": {p: round(c / n, 2) for p, c in opstats.by_outer_inner(paths).items()},
        "examples": examples,
        "samples": runs,
    }


def summary(values: list[int]) -> dict[str, float]:
    return {
        "mean": round(sum(values) / len(values), 2),
        "min": min(values),
        "max": max(values),
    }


def one_run(st: Stack, ns: str, w: AllPods, path: str, name: str) -> dict[str, Any]:
    """Create one Run; the operator's statements until its status says it is over, and
    until the operator is quiet again (its pod deleted, nothing sent for 2 s)."""
    s0 = opstats.read_after(path, time.time())
    st.create_run(ns, TASK, name=name)
    final = wait_phase(st, ns, name, timeout=180)
    s1 = opstats.read_after(path, time.time())
    last, changed = s1, time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = opstats.read_after(path, time.time())
        if split(opstats.diff(now, last)["statements"]).get("run", 0):
            last, changed = now, time.monotonic()
        pod = w.attempt_pods().get(name)
        gone = pod is None or any(e.name == pod[0] and e.type == "DELETED" for e in w.snapshot())
        quiet_for = time.monotonic() - changed
        if quiet_for >= 2 and (gone or quiet_for >= 6):
            break
    to_succeeded, to_quiet = opstats.diff(s1, s0), opstats.diff(last, s0)
    return {
        "name": name,
        "phase": final,
        "to_succeeded": split(to_succeeded["statements"]),
        "to_quiet": split(to_quiet["statements"]),
        "statements": to_quiet["statements"],
        "commits": to_quiet["commits"],
    }


def print_statements(parts: list[dict[str, Any]]) -> None:
    mine = parts[0]
    rows: list[list[Any]] = []
    for p in parts:
        s = p["statements_per_run"]
        rows += [
            [
                f"{p['operator']}: created -> Succeeded seen",
                s["to_succeeded"]["mean"],
                s["to_succeeded"]["min"],
                s["to_succeeded"]["max"],
            ],
            [
                f"{p['operator']}: created -> quiet (clean-up included)",
                s["to_quiet"]["mean"],
                s["to_quiet"]["min"],
                s["to_quiet"]["max"],
            ],
        ]
    mean = mine["statements_per_run"]["to_succeeded"]["mean"]
    rows += [
        [f"ratio to the target ({STATEMENTS_TARGET}, the issue's)", ratio(mean, STATEMENTS_TARGET), "", ""],
        [
            f"ratio to before the rewrite ({STATEMENTS_BEFORE}, the issue's)",
            ratio(mean, STATEMENTS_BEFORE),
            "",
            "",
        ],
    ]
    for p in parts[1:]:
        base = p["statements_per_run"]["to_succeeded"]["mean"]
        rows.append([f"ratio to {p['operator']} (same run)", ratio(mean, base), "", ""])
    print_table(
        f"statements per run, created one at a time ({mine['runs']} runs; log batches and the "
        "periodic resync and metrics not included)",
        ["", "mean", "min", "max"],
        rows,
    )
    for p in parts:
        apart = ", ".join(f"{k} {v}" for k, v in p["apart_per_run"].items())
        print(
            f"{p['operator']}: {p['commits_per_run']} commits per run; per run apart: {apart}; "
            f"phases {dict(p['phases'])}"
        )
        print(f"{p['operator']}: statements per run by code path (outermost > innermost):")
        for path, n in list(p["by_outer_inner_per_run"].items())[:14]:
            print(f"  {n:6.2f}  {path}")
    print(f"{mine['operator']}: the same, full paths, each with the distinct statements sent on it:")
    for path, n in list(mine["by_path_per_run"].items())[:25]:
        print(f"  {n:6.2f}  {path}")
        for sql in mine["examples"].get(path, []):
            print(f"            {sql[:110]}")


# ---- 2. fail-over -----------------------------------------------------------------------------------


#: (label, the harness's short lease timings, what is done to the leader)
FAILOVER_MODES = [
    ("defaults, SIGKILL", False, "kill"),
    ("harness timings, SIGKILL", True, "kill"),
    ("defaults, SIGTERM", False, "term"),
    ("defaults, leader left alone (baseline)", False, "none"),
]


def failover_part(st: Stack, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with (
        bench_database(admin_database_url(), migrate=False) as url,
        bench_namespace(st, "failover") as ns,
        AllPods(st, ns) as w,
    ):
        held = (HeldPort(), HeldPort())
        ports = (held[0].port, held[1].port)
        print(f"2. fail-over: namespace {ns}, API ports {ports}", flush=True)
        try:
            for label, short, action in FAILOVER_MODES:
                out[label] = failover_mode(st, ns, url, ports, w, args, short=short, action=action)
                s = out[label]["seconds"]
                print(f"  {label}: -> next pod p50 {s.get('p50')} s, max {s.get('max')} s", flush=True)
        finally:
            for h in held:
                h.release()
    return out


def failover_mode(
    st: Stack,
    ns: str,
    url: str,
    ports: tuple[int, int],
    w: AllPods,
    args: argparse.Namespace,
    *,
    short: bool,
    action: str,
) -> dict[str, Any]:
    def replica(name: str, *, lead: bool) -> Operator:
        return start_operator(
            st,
            url,
            ns,
            name=name,
            port=ports[0],
            runner_port=ports[1],
            harness_timings=short,
            wait_leading=lead,
            KUBETASK_LOG_LEVEL=INFO,
        )

    tag = ("s" if short else "d") + action[0]
    ops = [replica("a", lead=True), replica("b", lead=False)]
    trials: list[dict[str, Any]] = []
    try:
        st.apply_queue(ns, "q", {"concurrencyLimit": LIMIT})
        st.apply_task(ns, TASK, {**SPEC, "queue": {"name": "q"}})
        wait_task_ready(st, ns, TASK, timeout=120)
        for trial in range(args.trials):
            names = [f"{tag}-{trial}-{j}" for j in range(2 * LIMIT)]
            res, leader, follower = failover_trial(st, ns, w, ops, names, action=action)
            trials.append({"trial": trial, **res})
            print(f"    trial {trial}: {trials[-1]}", flush=True)
            if action != "none":
                # The stopped process is replaced by a new follower, as a Deployment would.
                ops = [follower, replica(leader.name, lead=False)]
    finally:
        for op in ops:
            op.stop()
    return {
        "short_timings": short,
        "action": action,
        "seconds": seconds([x["seconds"] for x in trials]),
        "to_became_leader": seconds([x["to_became_leader"] for x in trials if x["to_became_leader"]]),
        "to_leading": seconds([x["to_leading"] for x in trials if x["to_leading"]]),
        "trials": trials,
    }


def failover_trial(
    st: Stack, ns: str, w: AllPods, ops: list[Operator], names: list[str], *, action: str
) -> tuple[dict[str, Any], Operator, Operator]:
    """Create the Runs; once the leader created the pods the limit allows, SIGKILL it
    (``kill``), SIGTERM it (``term``) or not (``none``); time the next pod. Returns the
    numbers, the leader and the other replica."""

    def with_pods() -> dict[str, float]:
        pods = w.attempt_pods()
        return {n: pods[n][1] for n in names if n in pods}

    for name in names:
        st.create_run(ns, TASK, name=name)
    wait_for(lambda: len(with_pods()) >= LIMIT, 120, "the first pods", every=0.05)
    leader = next(op for op in ops if holds_lease(st, ns, op))
    follower = next(op for op in ops if op is not leader)
    before = set(with_pods())
    t0 = time.time()
    if action == "kill":
        leader.kill()
    elif action == "term":
        leader.stop()
    wait_for(lambda: bool(set(with_pods()) - before), 180, "the next pod", every=0.05)
    t_pod = min(at for n, at in with_pods().items() if n not in before)
    became = [x for x in log_times(follower, "became leader") if x >= t0]
    leading = [x for x in log_times(follower, "leading:") if x >= t0]
    phases = st.wait_all(ns, names, timeout=300)
    return (
        {
            "seconds": round(t_pod - t0, 3),
            "to_became_leader": round(became[0] - t0, 3) if became else None,
            "to_leading": round(leading[0] - t0, 3) if leading else None,
            "pods_before": len(before),
            "phases": dict(Counter(r["status"]["phase"] for r in phases.values())),
        },
        leader,
        follower,
    )


def print_failover(res: dict[str, Any]) -> None:
    rows: list[list[Any]] = []
    for label, r in res.items():
        s = r["seconds"]
        rows.append(
            [
                label,
                s.get("n", 0),
                s.get("p50"),
                s.get("p90"),
                s.get("max"),
                r["to_became_leader"].get("p50", "-"),
                r["to_leading"].get("p50", "-"),
            ]
        )
    labels = list(res)
    base = res[labels[-1]]["seconds"]
    for label in labels[:-1]:
        s = res[label]["seconds"]
        rows.append(
            [
                f"ratio {label} / baseline",
                "",
                ratio(s.get("p50", 0), base.get("p50", 0)),
                ratio(s.get("p90", 0), base.get("p90", 0)),
                ratio(s.get("max", 0), base.get("max", 0)),
                "",
                "",
            ]
        )
    print_table(
        f"fail-over: signal to the leader -> next attempt pod ADDED (s); target <= {FAILOVER_TARGET_S:.0f} s "
        "with the default timings",
        ["", "n", "p50", "p90", "max", "-> became leader p50", "-> leading: p50"],
        rows,
    )


# ---- 3. start-up ---------------------------------------------------------------------------------------


def startup_part(st: Stack, args: argparse.Namespace) -> dict[str, Any]:
    admin = admin_database_url()
    out: dict[str, list[dict[str, Any]]] = {"empty": [], "loaded": []}
    order = [
        s for i in range(args.starts) for s in (("empty", "loaded") if i % 2 == 0 else ("loaded", "empty"))
    ]
    with bench_database(admin) as url, bench_namespace(st, "history") as ns, AllPods(st, ns) as w:
        print(
            f"3. start-up: seeding {args.history} finished runs, {args.resources} Run resources in {ns} ...",
            flush=True,
        )
        seeded = seed_history(st, url, ns, args.history, args.resources)
        print(f"   seeded in {seeded['seconds']} s", flush=True)
        for k, side in enumerate(order):
            if side == "loaded":
                out["loaded"].append(one_start(st, url, ns, w, f"first-{k}"))
            else:
                with (
                    bench_database(admin) as eurl,
                    bench_namespace(st, "empty") as ens,
                    AllPods(st, ens) as ew,
                ):
                    st.apply_task(ens, TASK, SPEC)
                    out["empty"].append(one_start(st, eurl, ens, ew, f"first-{k}"))
            print(f"   {side}: {out[side][-1]}", flush=True)
    res: dict[str, Any] = {"seed": seeded, "starts": out}
    for side in ("empty", "loaded"):
        res[side] = {
            k: seconds([x[k] for x in out[side]])
            for k in ("to_first_line", "to_api", "to_leading", "to_pod", "first_line_to_leading")
        }
    return res


def one_start(st: Stack, url: str, ns: str, w: AllPods, name: str) -> dict[str, Any]:
    """Create a Run, start an operator, time its start-up; stop it once the Run is over."""
    st.create_run(ns, TASK, name=name)
    op = start_operator(st, url, ns, name="start", wait_leading=False, KUBETASK_LOG_LEVEL=INFO)
    t_api = time.time()
    t0 = started_at(op)
    try:
        wait_for(lambda: name in w.attempt_pods(), 300, f"the pod of {name}", every=0.05)
        t_pod = w.attempt_pods()[name][1]
        wait_for(lambda: bool(log_times(op, "leading:")), 60, "the log line leading:")
        t_leading = log_times(op, "leading:")[0]
        t_first = log_times(op, " starting (database ")[0]
        final = wait_phase(st, ns, name, timeout=180, every=0.5)
    finally:
        op.stop()
    return {
        "to_first_line": round(t_first - t0, 3),
        "to_api": round(t_api - t0, 3),
        "to_leading": round(t_leading - t0, 3),
        "to_pod": round(t_pod - t0, 3),
        "first_line_to_leading": round(t_leading - t_first, 3),
        "phase": final,
    }


def seed_history(st: Stack, url: str, ns: str, history: int, resources: int) -> dict[str, Any]:
    """``history`` finished runs in the database, ``resources`` of them still Run objects;
    the first is a Run the operator really ran, the others are copies of it."""
    t0 = time.monotonic()
    op = start_operator(st, url, ns, name="seed")
    try:
        st.apply_task(ns, TASK, SPEC)
        wait_task_ready(st, ns, TASK, timeout=120)
        st.create_run(ns, TASK, name="seed")
        wait_phase(st, ns, "seed", timeout=180, every=0.5)
        time.sleep(3)  # the pod's clean-up, the last status patch
    finally:
        op.stop()
    seed = st.get_run(ns, "seed")
    seed_id = seed["status"]["runId"]

    # Run objects first (no operator runs): their uids go into the rows.
    names = [f"done-{i:05d}" for i in range(1, resources)]
    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda n: create_bare_run(st, ns, n, {"task": TASK}), names))
    uids = [c["metadata"]["uid"] for c in created]
    ids = [f"run_{hashlib.sha1(u.encode()).hexdigest()[:20]}" for u in uids]
    n_old = history - resources
    old_uids = [str(uuid.uuid4()) for _ in range(n_old)]
    rows = {
        "ids": ids + [f"run_{hashlib.sha1(u.encode()).hexdigest()[:20]}" for u in old_uids],
        "names": names + [f"gone-{i:05d}" for i in range(n_old)],
        "uids": uids + old_uids,
        # Ages: Run resources within their TTL (7 days), the others over 29 days (record
        # retention is 90 days, log retention 30).
        "ages": [6 * 86400 * (i + 1) / len(ids) for i in range(len(ids))]
        + [29 * 86400 * (i + 1) / n_old for i in range(n_old)],
        "deleted": [False] * len(ids) + [True] * n_old,
    }
    counts = clone_rows(url, seed_id, rows)

    status = seed["status"]
    raw = json.dumps(status)

    def patch(i: int) -> None:
        body = {"status": json.loads(raw.replace(seed_id, ids[i]))}
        st.custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, "runs", names[i], body)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(patch, range(len(names))))
    return {"seconds": round(time.monotonic() - t0, 1), "rows": counts, "run_objects": resources}


def clone_rows(url: str, seed_id: str, rows: dict[str, list[Any]]) -> dict[str, int]:
    """Copies of the seed run's rows (runs, attempts, log lines, timers), one per element
    of ``rows``: every column copied but the keys and names, every time moved back by the
    element's age; a run whose resource is gone has no timer left (its TTL fired)."""
    series = (
        "unnest(CAST(:ids AS text[]), CAST(:names AS text[]), CAST(:uids AS text[]), "
        "CAST(:ages AS float8[]), CAST(:deleted AS boolean[])) AS g(id, name, uid, age, deleted)"
    )
    age = "make_interval(secs => g.age)"
    copies: list[tuple[Any, dict[str, str], str]] = [
        (
            t.Run.__table__,
            {
                "id": "g.id",
                "name": "g.name",
                "uid": "g.uid",
                "resource_deleted": "g.deleted",
                "wake_at": f"CASE WHEN g.deleted THEN NULL ELSE src.wake_at - {age} END",
            },
            "src.id = :seed",
        ),
        (
            t.Attempt.__table__,
            {
                "run_id": "g.id",
                "pod_name": "g.name || '-1'",
                "token_hash": "encode(sha256(convert_to(g.id, 'UTF8')), 'hex')",
            },
            "src.run_id = :seed",
        ),
        (t.LogLine.__table__, {"run_id": "g.id"}, "src.run_id = :seed"),
        (t.Timer.__table__, {"key": "g.id"}, "src.key = :seed AND NOT g.deleted"),
    ]
    return insert_copies(url, copies, series, {**rows, "seed": seed_id}, shift_times=age)


STARTUP_COLUMNS = [
    ("to_first_line", "p50", "first log line p50"),
    ("to_api", "p50", "API up p50"),
    ("to_leading", "p50", "leading: p50"),
    ("to_leading", "max", "leading: max"),
    ("to_pod", "p50", "first pod p50"),
    ("to_pod", "max", "first pod max"),
    ("first_line_to_leading", "p50", "first line -> leading: p50"),
]


def print_startup(res: dict[str, Any]) -> None:
    rows: list[list[Any]] = []
    for side, label in (("empty", "empty start (baseline)"), ("loaded", "with history")):
        r = res[side]
        rows.append([label, r["to_pod"].get("n", 0), *(r[k].get(q, "-") for k, q, _ in STARTUP_COLUMNS)])
    e, lo = res["empty"], res["loaded"]
    rows.append(
        [
            "ratio history / empty",
            "",
            *(ratio(lo[k].get(q, 0), e[k].get(q, 0)) for k, q, _ in STARTUP_COLUMNS),
        ]
    )
    print_table(
        f"start-up: process start -> (s); history: {res['seed']['rows'].get('runs', 0) + 1} finished runs in "
        f"the database, {res['seed']['run_objects']} Run resources",
        ["", "n", *(h for _, _, h in STARTUP_COLUMNS)],
        rows,
    )


# ---- main ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="statements,failover,startup", help="comma-separated parts to run")
    ap.add_argument("--runs", type=int, default=20, help="statements: Runs measured (one at a time)")
    ap.add_argument("--warmup", type=int, default=2, help="statements: unmeasured Runs first")
    ap.add_argument(
        "--baseline-ref",
        default=None,
        help="statements: also measure the operator of this commit (e.g. the one before the rewrite)",
    )
    ap.add_argument("--trials", type=int, default=5, help="fail-over: trials per mode")
    ap.add_argument("--history", type=int, default=10_000, help="start-up: finished runs in the database")
    ap.add_argument("--resources", type=int, default=1_000, help="start-up: of which Run resources remain")
    ap.add_argument("--starts", type=int, default=3, help="start-up: starts of each kind (interleaved)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    st = stack()
    results: dict[str, Any] = {}
    if "statements" in parts:
        results["statements"] = [statements_part(st, args, None)]
        if args.baseline_ref:
            results["statements"].append(statements_part(st, args, args.baseline_ref))
    if "failover" in parts:
        results["failover"] = failover_part(st, args)
    if "startup" in parts:
        results["startup"] = startup_part(st, args)
    if "statements" in results:
        print_statements(results["statements"])
    if "failover" in results:
        print_failover(results["failover"])
    if "startup" in results:
        print_startup(results["startup"])
    write_results("control_loop", args, results)


if __name__ == "__main__":
    main()
