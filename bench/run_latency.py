"""Run create -> pod created latency, against batch/v1 Jobs on the same cluster in the same
run (the Job controller is the baseline).

Two phases that never overlap, at the same steady rate, in one namespace:

- jobs: N Jobs (runner image, ``python -c pass``, restartPolicy Never, backoffLimit 0);
- runs: N Runs of a Task with inline source ``return 1``, handled by a kubetask operator
  process on this host (fresh database, watching only the benchmark's namespace).

For each object, t0 is taken just before the create call and t1 when a pod watch in this
process sees the object's pod ADDED; latency = t1 - t0 (one clock, both sides measured
the same way). Between the phases every pod is gone, so the node is quiet when the next
phase starts.

    python -m bench.run_latency [--count 200] [--rate 1] [--rounds 2] [--unscheduled]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from tests.e2e.harness import GROUP, TERMINAL, VERSION, Stack

from bench.common import (
    NOWHERE,
    AllPods,
    CpuMeter,
    admin_database_url,
    bench_database,
    bench_namespace,
    print_table,
    process_cpu_seconds,
    ratio,
    run_phases,
    stack,
    start_operator,
    summary_ms,
    task_source,
    wait_for,
    wait_task_ready,
    write_results,
)

TASK = "noop"


def paced(n: int, rate: float, create: Callable[[int], object]) -> tuple[list[float], float]:
    """Call create(i) for i in 0..n-1 at ``rate`` per second; returns each call's t0
    (time.time() just before it) and the rate achieved."""
    t0s: list[float] = []
    start = time.monotonic() + 0.05
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        t0s.append(time.time())
        create(i)
    took = time.monotonic() - start
    return t0s, (n - 1) / took if n > 1 and took > 0 else float("nan")


def job_body(name: str, image: str, *, unscheduled: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"bench": "job"}},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 10,
                    "containers": [
                        {
                            "name": "main",
                            "image": image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["python", "-c", "pass"],
                        }
                    ],
                },
            },
        },
    }
    if unscheduled:
        body["spec"]["template"]["spec"]["nodeSelector"] = NOWHERE
    return body


def pod_runtimes(w: AllPods, names: set[str]) -> list[float]:
    """ADDED -> terminal phase seen, for the pods named (how busy the node was)."""
    added: dict[str, float] = {}
    out: list[float] = []
    for ev in w.snapshot():
        if ev.name not in names:
            continue
        if ev.type == "ADDED":
            added.setdefault(ev.uid, ev.at)
        elif ev.phase in ("Succeeded", "Failed") and ev.uid in added:
            out.append(ev.at - added.pop(ev.uid))
    return out


def job_pods(w: AllPods) -> dict[str, tuple[str, float]]:
    """Job name -> (its first pod's name, when that pod's ADDED was seen)."""
    out: dict[str, tuple[str, float]] = {}
    for ev in w.snapshot():
        job = ev.labels.get("job-name") or ev.labels.get("batch.kubernetes.io/job-name")
        if ev.type == "ADDED" and job and job not in out:
            out[job] = (ev.name, ev.at)
    return out


def wait_no_pods(st: Stack, ns: str, timeout: float) -> None:
    wait_for(lambda: not st.core.list_namespaced_pod(ns).items, timeout, f"no pods left in {ns}", every=1)


def background_cpu(seconds: float = 3.0) -> float:
    """Host CPU use while this benchmark does nothing (other users of the cluster)."""
    cpu = CpuMeter().start()
    time.sleep(seconds)
    return cpu.stop()


def jobs_phase(
    st: Stack, ns: str, w: AllPods, args: argparse.Namespace, rnd: int, count: int
) -> dict[str, Any]:
    batch = client.BatchV1Api()
    image = st.runner_image

    def create(prefix: str) -> Callable[[int], object]:
        return lambda i: batch.create_namespaced_job(
            ns, job_body(f"{prefix}-{i:04d}", image, unscheduled=args.unscheduled)
        )

    if rnd == 0:
        for i in range(args.warmup):
            create("jwarm")(i)
        wait_for(lambda: sum(j.startswith("jwarm-") for j in job_pods(w)) >= args.warmup, 120, "warm-up pods")
        if not args.unscheduled:
            time.sleep(5)
    idle = background_cpu()
    print(f"round {rnd}: {count} Jobs at {args.rate}/s (background CPU {idle}%) ...", flush=True)
    cpu = CpuMeter().start()
    prefix = f"job-{rnd}"
    t0s, achieved = paced(count, args.rate, create(prefix))
    names = [f"{prefix}-{i:04d}" for i in range(count)]
    wait_for(lambda: all(n in job_pods(w) for n in names), args.timeout, "a pod for every Job", every=0.2)
    cpu.stop()
    seen = job_pods(w)
    lat = [seen[n][1] - t0 for n, t0 in zip(names, t0s, strict=True)]

    def done() -> bool:
        items = batch.list_namespaced_job(ns).items
        return all((j.status.succeeded or 0) + (j.status.failed or 0) > 0 for j in items)

    if not args.unscheduled:
        with contextlib.suppress(TimeoutError):
            wait_for(done, args.timeout, "every Job to finish", every=1)
    items = batch.list_namespaced_job(ns).items
    ok = sum(1 for j in items if (j.status.succeeded or 0) > 0 and j.metadata.name.startswith(prefix))
    runtimes = pod_runtimes(w, {seen[n][0] for n in names})
    batch.delete_collection_namespaced_job(ns, propagation_policy="Background")
    wait_no_pods(st, ns, args.timeout)
    return {
        "kind": "jobs",
        "round": rnd,
        "latency_s": lat,
        "achieved_rate": round(achieved, 2),
        "succeeded": ok,
        "background_cpu_percent": idle,
        "host_cpu_busy_percent": cpu.busy_percent,
        "pod_runtime_s": runtimes,
    }


def runs_phase(
    st: Stack, ns: str, w: AllPods, args: argparse.Namespace, rnd: int, count: int
) -> dict[str, Any]:
    def create(prefix: str) -> Callable[[int], object]:
        return lambda i: st.create_run(ns, TASK, name=f"{prefix}-{i:04d}")

    if rnd == 0:
        spec: dict[str, Any] = {
            "source": task_source("def f(payload, ctx):\n    return 1", TASK),
            "retry": {"maxAttempts": 1},
        }
        if args.unscheduled:
            spec["podTemplate"] = {"nodeSelector": NOWHERE}
        st.apply_task(ns, TASK, spec)
        wait_task_ready(st, ns, TASK)
        for i in range(args.warmup):
            create("rwarm")(i)
        wait_for(
            lambda: sum(n.startswith("rwarm-") for n in w.attempt_pods()) >= args.warmup, 120, "warm-up pods"
        )
        if not args.unscheduled:
            time.sleep(5)
    idle = background_cpu()
    print(f"round {rnd}: {count} Runs at {args.rate}/s (background CPU {idle}%) ...", flush=True)
    cpu = CpuMeter().start()
    prefix = f"run-{rnd}"
    t0s, achieved = paced(count, args.rate, create(prefix))
    names = [f"{prefix}-{i:04d}" for i in range(count)]
    wait_for(
        lambda: all(n in w.attempt_pods() for n in names), args.timeout, "a pod for every Run", every=0.2
    )
    cpu.stop()
    seen = w.attempt_pods()
    lat = [seen[n][1] - t0 for n, t0 in zip(names, t0s, strict=True)]

    if not args.unscheduled:
        with contextlib.suppress(TimeoutError):
            wait_for(
                lambda: set(run_phases(st, ns)) <= TERMINAL, args.timeout, "every Run to finish", every=1
            )
    final = run_phases(st, ns)
    runtimes = pod_runtimes(w, {seen[n][0] for n in names})
    # The operator deletes ended pods itself; deleting the Runs cancels the unscheduled ones
    # (the operator deletes their pods) and leaves nothing behind.
    with contextlib.suppress(ApiException):
        st.custom.delete_collection_namespaced_custom_object(GROUP, VERSION, ns, "runs")
    wait_no_pods(st, ns, args.timeout)
    wait_for(
        lambda: not st.custom.list_namespaced_custom_object(GROUP, VERSION, ns, "runs")["items"],
        args.timeout,
        "the Runs to be deleted",
        every=1,
    )
    return {
        "kind": "runs",
        "round": rnd,
        "latency_s": lat,
        "achieved_rate": round(achieved, 2),
        "run_phases": final,
        "background_cpu_percent": idle,
        "host_cpu_busy_percent": cpu.busy_percent,
        "pod_runtime_s": runtimes,
    }


def abba(rounds: int, first: str) -> list[str]:
    """jobs, runs, runs, jobs, jobs, runs, ...: a linear drift of the cluster's background
    load then weighs on both kinds alike."""
    a, b = (first, "runs" if first == "jobs" else "jobs")
    out: list[str] = []
    for i in range(rounds):
        out += [a, b] if i % 2 == 0 else [b, a]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", "-n", type=int, default=200, help="Runs, and Jobs (default 200)")
    ap.add_argument("--rate", type=float, default=1.0, help="creations per second (default 1)")
    ap.add_argument("--rounds", type=int, default=2, help="ABBA rounds the count is split over (default 2)")
    ap.add_argument(
        "--unscheduled",
        action="store_true",
        help="pods match no node: never run, so the node's load does not enter the numbers",
    )
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured objects before the first phase of each")
    ap.add_argument("--first", choices=["jobs", "runs"], default="jobs", help="kind measured first")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for any one step")
    args = ap.parse_args()

    st = stack()
    phases: list[dict[str, Any]] = []
    per_round = [
        args.count // args.rounds + (1 if i < args.count % args.rounds else 0) for i in range(args.rounds)
    ]
    with bench_database(admin_database_url(), migrate=False) as url, bench_namespace(st, "latency") as ns:
        op = start_operator(st, url, ns)
        assert op.proc is not None
        pid = op.proc.pid
        print(f"namespace {ns}, operator log {op.log_path}", flush=True)
        try:
            with AllPods(st, ns) as w:
                seen: dict[str, int] = {"jobs": 0, "runs": 0}
                for kind in abba(args.rounds, args.first):
                    rnd = seen[kind]
                    seen[kind] += 1
                    phase = jobs_phase if kind == "jobs" else runs_phase
                    cpu0 = process_cpu_seconds(pid)
                    phases.append(phase(st, ns, w, args, rnd, per_round[rnd]))
                    # The operator's own CPU over the phase (idle during the Jobs' phases).
                    phases[-1]["operator_cpu_s"] = round(process_cpu_seconds(pid) - cpu0, 2)
                    time.sleep(3)
        finally:
            op.stop()

    results: dict[str, Any] = {}
    for kind in ("jobs", "runs"):
        mine = [p for p in phases if p["kind"] == kind]
        lat = [x for p in mine for x in p["latency_s"]]
        results[kind] = {
            "latency_ms": summary_ms(lat),
            "per_round_p50_ms": [summary_ms(p["latency_s"])["p50"] for p in mine],
            "achieved_rate": min(p["achieved_rate"] for p in mine),
            "background_cpu_percent": [p["background_cpu_percent"] for p in mine],
            "host_cpu_busy_percent": [p["host_cpu_busy_percent"] for p in mine],
            "pod_runtime_ms": summary_ms([x for p in mine for x in p["pod_runtime_s"]]),
            "operator_cpu_s": [p["operator_cpu_s"] for p in mine],
        }
    results["jobs"]["succeeded"] = sum(p["succeeded"] for p in phases if p["kind"] == "jobs")
    results["runs"]["run_phases"] = [p["run_phases"] for p in phases if p["kind"] == "runs"]
    j, r = results["jobs"]["latency_ms"], results["runs"]["latency_ms"]
    results["ratio_p50"] = ratio(r["p50"], j["p50"])
    results["ratio_p99"] = ratio(r["p99"], j["p99"])
    results["phases"] = [
        {
            **p,
            "latency_s": [round(x, 4) for x in p["latency_s"]],
            "pod_runtime_s": [round(x, 3) for x in p["pod_runtime_s"]],
        }
        for p in phases
    ]
    where = "pods never scheduled" if args.unscheduled else "pods run"
    print_table(
        f"create -> pod ADDED, {args.count} each at {args.rate}/s, {where}, {args.rounds} ABBA rounds (ms)",
        [
            "",
            "p50",
            "p90",
            "p99",
            "mean",
            "max",
            "p50 per round",
            "CPU % bg/during",
            "operator CPU s",
            "pod runtime p50",
        ],
        [
            [
                label,
                x["latency_ms"]["p50"],
                x["latency_ms"]["p90"],
                x["latency_ms"]["p99"],
                x["latency_ms"]["mean"],
                x["latency_ms"]["max"],
                " ".join(f"{v:.0f}" for v in x["per_round_p50_ms"]),
                " ".join(
                    f"{b:.0f}/{d:.0f}"
                    for b, d in zip(x["background_cpu_percent"], x["host_cpu_busy_percent"], strict=True)
                ),
                " ".join(f"{v:.1f}" for v in x["operator_cpu_s"]),
                x["pod_runtime_ms"].get("p50", "-"),
            ]
            for label, x in (("Job (baseline)", results["jobs"]), ("kubetask Run", results["runs"]))
        ]
        + [["ratio Run/Job", results["ratio_p50"], "", results["ratio_p99"], "", "", "", "", "", ""]],
    )
    print(
        f"Run phases at the end of each round: {results['runs']['run_phases']}; Jobs succeeded: "
        f"{results['jobs']['succeeded']}/{args.count}; slowest creation rate achieved: "
        f"Jobs {results['jobs']['achieved_rate']}/s, Runs {results['runs']['achieved_rate']}/s"
    )
    write_results("run_latency", args, results)


if __name__ == "__main__":
    main()
