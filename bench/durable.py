"""Durable execution: event -> resumed pod latency, and the operator's memory with
10,000 waiting runs (issue 9).

1. resume: ``--runs`` Runs of a Task that waits for the event ``bench.go`` matching
   ``{"i": <its index>}`` (7-day timeout), created ``--wave`` at a time and left to reach
   ``Waiting`` (their pods run for real and exit; the node holds at most 110 pods). The
   Queue is the Task's own, with no concurrency limit, so admission never holds a
   resume back. Once every run is Waiting and every pod gone, the Task's pod template
   gets a nodeSelector no node matches (``--run-resumed``: not), so the resumed pods are
   created and stored but never scheduled: what is measured is the operator's work, not
   the kubelet's on this same 2-core machine. After ``--calm`` seconds of rest (the
   kubelet cleans up the exited pods), one non-matching event warms the API's
   token and access review caches; then the events are sent by a pool of ``--senders``
   threads, as fast as they answer (one POST /api/v1/events per run, a new connection
   each). Per run: the time just before the POST, the time its 202 was read, and the
   ADDED event of the run's second pod (the pod watch in this process, one clock). The
   path measured: the event stored and the wait satisfied (one transaction), NOTIFY,
   the leader's timer loop, the run's reconcile (Waiting -> Running: the slot is granted
   in the same transaction), the next reconcile creates the pod, the API server stores
   it, the watch delivers it. Baseline, same operator, same run: as many Runs of a Task
   ``return 1`` (same pod template, also a Queue without limit) created by the same pool,
   measured from the create's answer to their first pod ADDED.
2. memory: the operator's VmRSS (``/proc/<pid>/status``) once its start-up work is over
   (its CPU use quiet for 3 s) and ``--settle`` seconds more, then sampled for ``--idle``
   seconds (with its CPU use), with ``--waiting`` runs Waiting against the same on an
   empty database and namespace (the baseline, same Task). The waiting runs are ONE run
   the operator really ran until it waited, cloned while no operator runs: its rows
   (runs, attempts, checkpoints, log lines) by SQL, each clone waiting for its own
   ``{"i": k}``, and a Run resource per clone (created bare, its status patched from the
   seed's with the new run id). The Run resources are needed: an operator that finds a
   live row without its Run resource cancels the run (``RunDeleted``), and it watches
   and lists them, so a fair measure has them. Start-up times: process start -> the log
   line ``leading:`` (the first resync queued every live run), and -> quiet (those
   reconciles done).

Ratios are against the baseline measured in the same run.

    python -m bench.durable [--parts resume,memory] [--runs 200] [--wave 50] [--senders 8]
        [--run-resumed] [--calm 15] [--waiting 10000] [--settle 5] [--idle 30]
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
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool
from tests.e2e.harness import GROUP, VERSION, Operator, Stack, service_account_token

from bench.common import (
    DISTURBANCES,
    NOWHERE,
    AllPods,
    CpuMeter,
    admin_database_url,
    bench_database,
    bench_namespace,
    create_bare_run,
    holds_lease,
    insert_copies,
    percentile,
    print_table,
    process_cpu_seconds,
    ratio,
    stack,
    start_operator,
    summary_ms,
    task_source,
    wait_for,
    wait_task_ready,
    write_results,
)
from kubetask.pods import LABEL_RUN
from kubetask.store import tables as t

WAITER = "waiter"
NOOP = "noop"
EVENT = "bench.go"
WAIT_DAYS = 7
WAITER_SOURCE = task_source(
    "async def f(payload, ctx):\n"
    f"    data = await ctx.wait_for_event({EVENT!r}, {{'i': payload['i']}}, timeout={WAIT_DAYS * 86400})\n"
    "    return data['i']",
    WAITER,
)
NOOP_SOURCE = task_source("def f(payload, ctx):\n    return 1", NOOP)
RETRY = {"maxAttempts": 1}
#: What the event sender's token may do (POST /api/v1/events needs ``patch runs``).
SENDER_RULES = [{"apiGroups": [GROUP], "resources": ["runs"], "verbs": ["get", "list", "patch"]}]
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
QUANTILES = ("p50", "p95", "p99", "max")


# ---- shared -------------------------------------------------------------------------------------------


def summary(seconds: list[float]) -> dict[str, float]:
    """summary_ms plus p95 (the issue asks for it), in milliseconds."""
    out = summary_ms(seconds)
    if seconds:
        out["p95"] = round(percentile([s * 1000 for s in seconds], 95), 3)
    return out


def log_lines(op: Operator) -> list[str]:
    """The lines of ``op``'s log since its start."""
    with contextlib.suppress(OSError):
        return op.log_path.read_text(errors="replace").split(op.start_marker)[-1].splitlines()
    return []


def line_time(line: str) -> float | None:
    """``time.time()`` of a log line (its local timestamp, millisecond resolution)."""
    m = LOG_TIME.match(line)
    if m is None:
        return None
    return dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def log_times(op: Operator, needle: str) -> list[float]:
    return [x for line in log_lines(op) if needle in line and (x := line_time(line)) is not None]


def log_problems(op: Operator) -> list[str]:
    """WARNING/ERROR lines of ``op``'s log since its start (tracebacks' first line only)."""
    return [line for line in log_lines(op) if re.search(r"\[(WARNING|ERROR|CRITICAL) *\]", line)]


def started_at(op: Operator) -> float:
    """``time.time()`` just before the process was started (the harness's start marker)."""
    return float(op.start_marker.split(" started ")[1].split()[0])


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` field in KiB (VmRSS, VmHWM), -1 if unreadable."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    return -1


def wait_quiet(pid: int, *, window: float = 3.0, busy: float = 0.05, timeout: float = 900) -> float:
    """Wait until process ``pid`` used less than ``busy`` of a core over ``window``
    seconds; returns ``time.time()`` at the start of that quiet window."""
    samples: list[tuple[float, float]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now, cpu = time.time(), process_cpu_seconds(pid)
        samples.append((now, cpu))
        old = [s for s in samples if s[0] <= now - window]
        if old and cpu - old[-1][1] < busy * (now - old[-1][0]):
            return old[-1][0]
        time.sleep(0.25)
    raise TimeoutError(f"process {pid} did not go quiet in {timeout:.0f}s")


def phases_of(st: Stack, ns: str) -> dict[str, str]:
    """Run name -> phase ("" before the first status), a page of 500 at a time."""
    out: dict[str, str] = {}
    token = None
    while True:
        kw: dict[str, Any] = {"limit": 500}
        if token:
            kw["_continue"] = token
        res = cast(dict[str, Any], st.custom.list_namespaced_custom_object(GROUP, VERSION, ns, "runs", **kw))
        for r in res["items"]:
            out[r["metadata"]["name"]] = str((r.get("status") or {}).get("phase") or "")
        token = res["metadata"].get("continue")
        if not token:
            return out


def wait_phases(st: Stack, ns: str, names: list[str], phases: set[str], timeout: float) -> None:
    def there() -> bool:
        seen = phases_of(st, ns)
        return all(seen.get(n) in phases for n in names)

    wait_for(there, timeout, f"{len(names)} Runs to be {'/'.join(sorted(phases))}", every=1)


def nth_pods(w: AllPods, n: int) -> dict[str, float]:
    """Run name -> when the ADDED event of its ``n``-th pod (by first ADDED) was seen."""
    pods: dict[str, dict[str, float]] = {}
    for ev in w.snapshot():
        run = ev.labels.get(LABEL_RUN)
        if ev.type == "ADDED" and run:
            pods.setdefault(run, {}).setdefault(ev.name, ev.at)
    out: dict[str, float] = {}
    for run, by_name in pods.items():
        times = sorted(by_name.values())
        if len(times) >= n:
            out[run] = times[n - 1]
    return out


def post_event(api: str, token: str, ns: str, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"name": EVENT, "namespace": ns, "data": data}).encode()
    request = urllib.request.Request(
        f"{api}/api/v1/events",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


# ---- 1. event -> resumed pod --------------------------------------------------------------------------


def pod_template(args: argparse.Namespace) -> dict[str, Any]:
    return {} if args.run_resumed else {"podTemplate": {"nodeSelector": NOWHERE}}


def resume_part(st: Stack, args: argparse.Namespace) -> dict[str, Any]:
    admin = admin_database_url()
    with (
        bench_database(admin) as url,
        bench_namespace(st, "resume") as ns,
        AllPods(st, ns) as w,
        service_account_token(st, ns, "sender", cluster_rules=SENDER_RULES) as token,
    ):
        op = start_operator(st, url, ns, name="resume", KUBETASK_LOG_LEVEL="INFO")
        print(f"1. resume: namespace {ns}, operator log {op.log_path}", flush=True)
        try:
            return resume_trial(st, ns, w, op, token, args)
        finally:
            op.stop()


def resume_trial(
    st: Stack, ns: str, w: AllPods, op: Operator, token: str, args: argparse.Namespace
) -> dict[str, Any]:
    st.apply_task(ns, WAITER, {"source": WAITER_SOURCE, "retry": RETRY})
    st.apply_task(ns, NOOP, {"source": NOOP_SOURCE, "retry": RETRY, **pod_template(args)})
    wait_task_ready(st, ns, WAITER, timeout=120)
    wait_task_ready(st, ns, NOOP, timeout=120)
    names = [f"w-{i:04d}" for i in range(args.runs)]
    t0 = time.monotonic()
    for wave in chunks(args.runs, args.wave):
        for i in wave:
            st.create_run(ns, WAITER, name=names[i], payload={"i": i})
        wait_phases(st, ns, [names[i] for i in wave], {"Waiting"}, timeout=600)
        print(f"   {wave.stop}/{args.runs} Waiting ({time.monotonic() - t0:.0f} s)", flush=True)
    wait_for(lambda: not st.pods(ns), 120, "the waiting runs' pods to be gone", every=0.5)
    if not args.run_resumed:
        st.apply_task(ns, WAITER, {"source": WAITER_SOURCE, "retry": RETRY, **pod_template(args)})
        wait_task_observed(st, ns, WAITER)
    time.sleep(args.calm)  # the last status patches; the kubelet's clean-up of the exited pods
    first_pods = nth_pods(w, 1)

    status, answer = post_event(op.api, token, ns, {"i": -1})  # warms the auth caches
    assert status == 202 and answer.get("resumed") == 0, (status, answer)

    def send(i: int) -> tuple[float, float, int, int]:
        t_send = time.time()
        code, body = post_event(op.api, token, ns, {"i": i})
        return t_send, time.time(), code, int(body.get("resumed", -1))

    load = os.getloadavg()
    cpu = CpuMeter().start()
    with ThreadPoolExecutor(args.senders) as pool:
        sent = list(pool.map(send, range(args.runs)))
    wait_for(lambda: len(nth_pods(w, 2)) >= args.runs, 300, "the resumed pods", every=0.2)
    busy = cpu.stop()
    second = nth_pods(w, 2)
    bad = [
        (names[i], code, resumed)
        for i, (_, _, code, resumed) in enumerate(sent)
        if (code, resumed) != (202, 1)
    ]
    t_first_send = min(s[0] for s in sent)
    t_last_answer = max(s[1] for s in sent)
    resumed_at = transition_times(op, ns, "Waiting -> ")
    res: dict[str, Any] = {
        "namespace": ns,
        "runs": args.runs,
        "senders": args.senders,
        "resumed_pods_scheduled": args.run_resumed,
        "setup_seconds": round(time.monotonic() - t0, 1),
        "not_202_or_not_1_resumed": bad,
        "send_seconds": round(t_last_answer - t_first_send, 3),
        "events_per_second": round(args.runs / (t_last_answer - t_first_send), 1),
        "post": summary([s[1] - s[0] for s in sent]),
        "answer_to_pod": summary([second[names[i]] - s[1] for i, s in enumerate(sent)]),
        "send_to_pod": summary([second[names[i]] - s[0] for i, s in enumerate(sent)]),
        # The leader's log line of the run's Waiting -> Running (or Queued) transition.
        "answer_to_transition": summary(
            [resumed_at[names[i]] - s[1] for i, s in enumerate(sent) if names[i] in resumed_at]
        ),
        "transition_to_pod": summary(
            [second[n] - resumed_at[n] for n in names if n in resumed_at and n in second]
        ),
        "first_pods_before": len(first_pods),
        # This host's load average (1, 5, 15 min) when the events were sent, and its CPU
        # use (all processes, 100 = both cores) from the first event to the last pod.
        "loadavg": load,
        "host_cpu_busy_percent": busy,
    }
    print(f"   events sent: {res['events_per_second']}/s, answer -> pod {res['answer_to_pod']}", flush=True)
    res["create"] = create_baseline(st, ns, w, args)
    print(f"   baseline: create -> pod {res['create']['answer_to_pod']}", flush=True)
    return res


def wait_task_observed(st: Stack, ns: str, name: str) -> None:
    def observed() -> bool:
        body = cast(dict[str, Any], st.custom.get_namespaced_custom_object(GROUP, VERSION, ns, "tasks", name))
        gen = body["metadata"].get("generation")
        return bool((body.get("status") or {}).get("observedGeneration") == gen)

    wait_for(observed, 60, f"Task {ns}/{name}'s change to be seen")


def transition_times(op: Operator, ns: str, needle: str) -> dict[str, float]:
    """Run name -> when the first transition log line of ``ns/<name>`` containing
    ``needle`` was written (``run <ns>/<name> (<id>): <from> -> <to> (...)``)."""
    out: dict[str, float] = {}
    prefix = re.compile(rf"run {re.escape(ns)}/([^ ]+) \(")
    for line in log_lines(op):
        if needle in line and (m := prefix.search(line)) and (at := line_time(line)) is not None:
            out.setdefault(m.group(1), at)
    return out


def create_baseline(st: Stack, ns: str, w: AllPods, args: argparse.Namespace) -> dict[str, Any]:
    """Runs of ``return 1`` created by the same pool: create answered -> first pod ADDED."""
    names = [f"c-{i:04d}" for i in range(args.runs)]
    time.sleep(args.calm)

    def create(name: str) -> tuple[float, float]:
        t_send = time.time()
        st.create_run(ns, NOOP, name=name)
        return t_send, time.time()

    load = os.getloadavg()
    cpu = CpuMeter().start()
    with ThreadPoolExecutor(args.senders) as pool:
        sent = list(pool.map(create, names))
    wait_for(lambda: all(n in nth_pods(w, 1) for n in names), 300, "the baseline's pods", every=0.2)
    busy = cpu.stop()
    first = nth_pods(w, 1)
    t_first, t_last = min(s[0] for s in sent), max(s[1] for s in sent)
    return {
        "runs": len(names),
        "send_seconds": round(t_last - t_first, 3),
        "creates_per_second": round(len(names) / (t_last - t_first), 1),
        "post": summary([s[1] - s[0] for s in sent]),
        "answer_to_pod": summary([first[n] - s[1] for n, s in zip(names, sent, strict=True)]),
        "send_to_pod": summary([first[n] - s[0] for n, s in zip(names, sent, strict=True)]),
        "loadavg": load,
        "host_cpu_busy_percent": busy,
    }


def print_resume(res: dict[str, Any]) -> None:
    base = res["create"]
    rows: list[list[Any]] = []
    for label, r, rate in (
        ("event 202 -> resumed pod ADDED", res["answer_to_pod"], res["events_per_second"]),
        ("event sent -> resumed pod ADDED", res["send_to_pod"], ""),
        ("event 202 -> Waiting -> Running logged", res["answer_to_transition"], ""),
        ("Waiting -> Running logged -> pod ADDED", res["transition_to_pod"], ""),
        ("POST /api/v1/events", res["post"], ""),
        ("baseline: Run create 201 -> pod ADDED", base["answer_to_pod"], base["creates_per_second"]),
        ("baseline: Run create sent -> pod ADDED", base["send_to_pod"], ""),
        ("baseline: POST Run", base["post"], ""),
    ):
        rows.append([label, r.get("n", 0), *(r.get(q, "-") for q in QUANTILES), rate])
    for label, a, b in (
        ("ratio event 202 / create 201 -> pod", res["answer_to_pod"], base["answer_to_pod"]),
        ("ratio event sent / create sent -> pod", res["send_to_pod"], base["send_to_pod"]),
    ):
        rows.append([label, "", *(ratio(a.get(q, 0), b.get(q, 0)) for q in QUANTILES), ""])
    where = "scheduled and run" if res["resumed_pods_scheduled"] else "never scheduled (nodeSelector nowhere)"
    print_table(
        f"resume: {res['runs']} Waiting runs, one event each from {res['senders']} threads (ms; per second: "
        f"answers/s over the burst); pods {where}; one operator, Queue without limit",
        ["", "n", *QUANTILES, "per second"],
        rows,
    )
    print(
        f"  host CPU busy (all processes, both cores) from the first request to the last pod: resume "
        f"{res['host_cpu_busy_percent']} %, baseline {base['host_cpu_busy_percent']} %"
    )
    if res["not_202_or_not_1_resumed"]:
        print(f"  events not 202 or not resuming one run: {res['not_202_or_not_1_resumed'][:5]}")


# ---- 2. memory with waiting runs ----------------------------------------------------------------------


def memory_part(st: Stack, args: argparse.Namespace) -> dict[str, Any]:
    admin = admin_database_url()
    out: dict[str, Any] = {}
    with bench_database(admin) as url, bench_namespace(st, "mem-empty") as ns:
        st.apply_task(ns, WAITER, {"source": WAITER_SOURCE, "retry": RETRY})
        print(f"2. memory: baseline, empty database and namespace {ns}", flush=True)
        out["empty"] = measure_start(st, url, ns, args, "empty")
        print(f"   empty: {brief(out['empty'])}", flush=True)
    with bench_database(admin) as url, bench_namespace(st, "mem-waiting") as ns:
        print(f"2. memory: seeding {args.waiting} Waiting runs in {ns} ...", flush=True)
        out["seed"] = seed_waiting(st, url, ns, args.waiting)
        print(f"   seeded in {out['seed']['seconds']} s: {out['seed']['rows']}", flush=True)
        out["waiting"] = measure_start(st, url, ns, args, "waiting")
        print(f"   waiting: {brief(out['waiting'])}", flush=True)
    return out


def brief(r: dict[str, Any]) -> str:
    keys = (
        "rss_kib",
        "hwm_kib",
        "to_leading",
        "to_quiet",
        "leader_terms",
        "idle_cpu_percent",
        "waiting_rows",
        "problems",
    )
    return ", ".join(f"{k} {r[k] if k != 'problems' else len(r[k])}" for k in keys)


def measure_start(st: Stack, url: str, ns: str, args: argparse.Namespace, name: str) -> dict[str, Any]:
    op = start_operator(st, url, ns, name=f"mem-{name}", wait_leading=False, KUBETASK_LOG_LEVEL="INFO")
    assert op.proc is not None
    pid = op.proc.pid
    t0 = started_at(op)
    try:
        wait_for(lambda: bool(log_times(op, "leading:")), 600, "the log line leading:")
        t_leading = log_times(op, "leading:")[0]
        while True:  # quiet while leading (not in a gap between two terms)
            t_quiet = wait_quiet(pid)
            stopped = log_times(op, "stopped leading")
            if holds_lease(st, ns, op) and (not stopped or log_times(op, "leading:")[-1] > stopped[-1]):
                break
        time.sleep(args.settle)
        rss, hwm = status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")
        load = os.getloadavg()
        samples: list[int] = []
        cpu0, m0 = process_cpu_seconds(pid), time.monotonic()
        while time.monotonic() - m0 < args.idle:
            samples.append(status_kib(pid, "VmRSS"))
            time.sleep(1)
        idle_cpu = (process_cpu_seconds(pid) - cpu0) / (time.monotonic() - m0)
        problems = log_problems(op)
        terms = len(log_times(op, "became leader"))
    finally:
        op.stop()
    return {
        "rss_kib": rss,
        "hwm_kib": hwm,
        "idle_rss_kib": {"min": min(samples), "max": max(samples), "last": samples[-1]},
        "idle_cpu_percent": round(100 * idle_cpu, 2),
        "to_leading": round(t_leading - t0, 3),
        "to_quiet": round(t_quiet - t0, 3),
        # Terms of leadership: more than 1 means it lost the Lease during start-up.
        "leader_terms": terms,
        "waiting_rows": waiting_rows(url),
        "loadavg": load,
        "problems": problems[:20],
    }


def waiting_rows(url: str) -> dict[str, int]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT phase, count(*) FROM runs GROUP BY phase")).all()
            return {str(p): int(n) for p, n in rows}
    finally:
        engine.dispose()


def seed_waiting(st: Stack, url: str, ns: str, n: int) -> dict[str, Any]:
    """``n`` Waiting runs: one the operator really ran until it waited for its event,
    ``n - 1`` copies of it (rows by SQL, Run resources by the API)."""
    t0 = time.monotonic()
    op = start_operator(st, url, ns, name="seed")
    try:
        st.apply_task(ns, WAITER, {"source": WAITER_SOURCE, "retry": RETRY})
        wait_task_ready(st, ns, WAITER, timeout=120)
        st.create_run(ns, WAITER, name="wait-00000", payload={"i": 0})
        wait_phases(st, ns, ["wait-00000"], {"Waiting"}, timeout=300)
        wait_for(lambda: not st.pods(ns), 60, "the seed's pod to be gone", every=0.5)
        time.sleep(2)  # the last status patch
    finally:
        op.stop()
    seed = st.get_run(ns, "wait-00000")
    seed_id = seed["status"]["runId"]
    names = [f"wait-{i:05d}" for i in range(1, n)]

    def create(i: int) -> dict[str, Any]:
        return create_bare_run(st, ns, names[i], {"task": WAITER, "payload": {"i": i + 1}})

    # Run objects first (no operator runs): their uids go into the rows.
    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(create, range(len(names))))
    print(f"   {len(created)} Run resources created ({time.monotonic() - t0:.0f} s)", flush=True)
    uids = [c["metadata"]["uid"] for c in created]
    ids = [f"run_{hashlib.sha1(u.encode()).hexdigest()[:20]}" for u in uids]
    counts = clone_rows(url, seed_id, {"ids": ids, "names": names, "uids": uids, "idx": list(range(1, n))})
    raw = json.dumps(seed["status"])

    def patch(i: int) -> None:
        body = {"status": json.loads(raw.replace(seed_id, ids[i]))}
        st.custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, "runs", names[i], body)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(patch, range(len(names))))
    return {"seconds": round(time.monotonic() - t0, 1), "rows": counts, "run_objects": n}


def clone_rows(url: str, seed_id: str, rows: dict[str, list[Any]]) -> dict[str, int]:
    """Copies of the seed run's rows (runs, attempts, checkpoints, log lines), one per
    element of ``rows``: every column copied but the keys, names and what says which
    event it waits for (``{"i": idx}`` in the payload and the wait's match)."""
    series = (
        "unnest(CAST(:ids AS text[]), CAST(:names AS text[]), CAST(:uids AS text[]), "
        "CAST(:idx AS int[])) AS g(id, name, uid, idx)"
    )
    which = "jsonb_build_object('i', g.idx)"
    copies: list[tuple[Any, dict[str, str], str]] = [
        (
            t.Run.__table__,
            {"id": "g.id", "name": "g.name", "uid": "g.uid", "payload": which},
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
        (
            t.Checkpoint.__table__,
            {"run_id": "g.id", "match": f"CASE WHEN src.kind = 'event' THEN {which} ELSE src.match END"},
            "src.run_id = :seed",
        ),
        (t.LogLine.__table__, {"run_id": "g.id"}, "src.run_id = :seed"),
    ]
    return insert_copies(url, copies, series, {**rows, "seed": seed_id})


def print_memory(res: dict[str, Any]) -> None:
    e, w = res["empty"], res["waiting"]
    cols: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("RSS MiB", lambda r: round(r["rss_kib"] / 1024, 1)),
        ("idle RSS max MiB", lambda r: round(r["idle_rss_kib"]["max"] / 1024, 1)),
        ("peak (VmHWM) MiB", lambda r: round(r["hwm_kib"] / 1024, 1)),
        ("-> leading: s", lambda r: r["to_leading"]),
        ("-> quiet s", lambda r: r["to_quiet"]),
        ("idle CPU %", lambda r: r["idle_cpu_percent"]),
    ]
    n = res["seed"]["run_objects"]
    rows: list[list[Any]] = [
        ["0 runs (baseline)", *(f(e) for _, f in cols)],
        [f"{n:,} Waiting runs", *(f(w) for _, f in cols)],
        ["ratio waiting / baseline", *(ratio(f(w), f(e)) for _, f in cols)],
    ]
    print_table(
        f"memory: the operator once quiet + settle; {n:,} Waiting runs (rows and Run resources) vs an empty "
        "start; start-up from the process start",
        ["", *(h for h, _ in cols)],
        rows,
    )
    print(f"  rows by phase after the measure: baseline {e['waiting_rows']}, loaded {w['waiting_rows']}")
    for label, r in (("baseline", e), ("loaded", w)):
        if r.get("leader_terms", 1) > 1:
            print(f"  {label}: lost the Lease during start-up ({r['leader_terms']} terms of leadership)")
        if r["problems"]:
            print(f"  {label}: {len(r['problems'])} WARNING/ERROR log lines, first: {r['problems'][0]}")


# ---- main ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="resume,memory", help="comma-separated parts to run")
    ap.add_argument("--runs", type=int, default=200, help="resume: Waiting runs, one event each")
    ap.add_argument("--wave", type=int, default=50, help="resume: Runs created at a time to reach Waiting")
    ap.add_argument("--senders", type=int, default=8, help="resume: threads sending the events")
    ap.add_argument(
        "--run-resumed", action="store_true", help="resume: let the resumed pods be scheduled and run"
    )
    ap.add_argument(
        "--calm", type=float, default=15.0, help="resume: seconds of rest before the events and the baseline"
    )
    ap.add_argument("--waiting", type=int, default=10_000, help="memory: Waiting runs")
    ap.add_argument("--settle", type=float, default=5.0, help="memory: seconds after quiet before RSS")
    ap.add_argument("--idle", type=float, default=30.0, help="memory: seconds of RSS/CPU sampling after")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    st = stack()
    results: dict[str, Any] = {}
    if "resume" in parts:
        results["resume"] = resume_part(st, args)
    if "memory" in parts:
        results["memory"] = memory_part(st, args)
    if "resume" in results:
        print_resume(results["resume"])
    if "memory" in results:
        print_memory(results["memory"])
    if DISTURBANCES:
        print(f"\ndisturbances: {DISTURBANCES}")
    write_results("durable", args, results)


if __name__ == "__main__":
    main()
