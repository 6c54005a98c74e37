"""The dashboard's runs list with many runs: the first page as HTML and as the browser
renders it, against the API's JSON list of the same page (the baseline, same process,
same query, same run).

A fresh database gets ``--runs`` finished runs (INSERT ... SELECT copies of one seed row:
10 tasks, phases Succeeded/Failed/Canceled, one a second back in time), an operator process
on this host serves them, and a ServiceAccount token that may read runs cluster-wide
authenticates (one SubjectAccessReview, cached, as for a cluster reader). Measured, each
``--rounds`` times after one warm-up:

- ``api``: ``GET /api/v1/runs`` (the first page of 50, JSON): the baseline;
- ``html``: ``GET /dashboard/runs`` (the same page, rendered);
- ``html_rows``: ``GET /dashboard/runs?partial=rows`` (what the live refresh polls);
- ``html_filtered``: ``GET /dashboard/runs?task=task-3&phase=Failed&range=7d``;
- ``html_deep``: the page 100 pages in (``cursor``; keyset, so no slower);
- ``browser``: Chromium (Playwright) opening ``/dashboard/runs`` signed in, until the
  first contentful paint and until ``load`` (the navigation's own timings).

    python -m bench.dashboard [--runs 10000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from tests.e2e.harness import READER_RULES, service_account_token

from bench.common import (
    admin_database_url,
    bench_database,
    bench_namespace,
    insert_copies,
    print_table,
    ratio,
    stack,
    start_operator,
    summary_ms,
    write_results,
)
from kubetask.store import tables as t

CHROMIUM = "/usr/bin/chromium"
SEED = "run_seed"


def seed(url: str, ns: str, runs: int) -> None:
    engine = create_engine(url, poolclass=NullPool)
    with Session(engine) as s, s.begin():
        s.add(
            t.Run(
                id=SEED, namespace=ns, name="seed", uid="seed", task="task-0", queue=f"{ns}/task-0",
                phase="Succeeded", attempt=1, max_attempts=3, payload={"order": 1}, tags=["bench"],
                output={"ok": True}, has_output=True,
            )
        )  # fmt: skip
    engine.dispose()
    insert_copies(
        url,
        [
            (
                t.Run.__table__,
                {
                    "id": "'run_' || lpad(to_hex(g), 20, '0')",
                    "name": "'bench-' || g",
                    "uid": "md5(g::text)",
                    "task": "'task-' || (g % 10)",
                    "queue": f"'{ns}/task-' || (g % 10)",
                    "phase": "(ARRAY['Succeeded', 'Failed', 'Canceled'])[1 + g % 3]",
                    "created_at": "now() - g * interval '1 second'",
                    "started_at": "now() - g * interval '1 second'",
                    "finished_at": "now() - g * interval '1 second' + interval '3 seconds'",
                },
                "src.id = :seed",
            )
        ],
        "generate_series(1, :n) g",
        {"seed": SEED, "n": runs},
    )


def timed_get(url: str, token: str, rounds: int) -> list[float]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    out = []
    for i in range(rounds + 1):
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=30) as r:
            r.read()
        if i:  # the first is the warm-up
            out.append(time.perf_counter() - started)
    return out


def browser_render(base: str, token: str, rounds: int) -> tuple[list[float], list[float]]:
    from playwright.sync_api import sync_playwright

    paint, load = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context()
        context.add_cookies([{"name": "kubetask_token", "value": token, "url": f"{base}/dashboard/"}])
        for i in range(rounds + 1):
            page = context.new_page()
            page.goto(f"{base}/dashboard/runs", wait_until="load")
            timings = page.evaluate(
                """() => {
                    const nav = performance.getEntriesByType("navigation")[0];
                    const fcp = performance.getEntriesByName("first-contentful-paint")[0];
                    return [fcp ? fcp.startTime : null, nav.loadEventEnd];
                }"""
            )
            assert page.locator("#rows tr[data-run-id]").count() == 50
            page.close()
            if i:  # the first is the warm-up
                load.append(timings[1] / 1000)
                if timings[0] is not None:  # Chromium does not always report it for a hidden page
                    paint.append(timings[0] / 1000)
        browser.close()
    return paint, load


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    st = stack()
    with (
        bench_database(admin_database_url()) as url,
        bench_namespace(st, "dash") as ns,
        service_account_token(st, ns, "reader", cluster_rules=READER_RULES) as token,
    ):
        started = time.perf_counter()
        seed(url, ns, args.runs)
        print(f"seeded {args.runs} runs in {time.perf_counter() - started:.1f}s", flush=True)
        op = start_operator(st, url, ns)
        try:
            base = op.api
            first = json.loads(
                urllib.request.urlopen(
                    urllib.request.Request(
                        f"{base}/api/v1/runs?limit=500", headers={"Authorization": f"Bearer {token}"}
                    ),
                    timeout=30,
                ).read()
            )
            cursor = first["nextCursor"]
            for _ in range(9):  # 10 pages of 500 = 100 pages of 50 in
                page = json.loads(
                    urllib.request.urlopen(
                        urllib.request.Request(
                            f"{base}/api/v1/runs?limit=500&cursor={cursor}",
                            headers={"Authorization": f"Bearer {token}"},
                        ),
                        timeout=30,
                    ).read()
                )
                cursor = page["nextCursor"]
            results: dict[str, Any] = {
                "api": summary_ms(timed_get(f"{base}/api/v1/runs", token, args.rounds)),
                "html": summary_ms(timed_get(f"{base}/dashboard/runs", token, args.rounds)),
                "html_rows": summary_ms(timed_get(f"{base}/dashboard/runs?partial=rows", token, args.rounds)),
                "html_filtered": summary_ms(
                    timed_get(f"{base}/dashboard/runs?task=task-3&phase=Failed&range=7d", token, args.rounds)
                ),
                "html_deep": summary_ms(
                    timed_get(f"{base}/dashboard/runs?cursor={cursor}", token, args.rounds)
                ),
            }
            if Path(CHROMIUM).exists():
                paint, load = browser_render(base, token, min(args.rounds, 10))
                results["browser_first_paint"] = summary_ms(paint)
                results["browser_load"] = summary_ms(load)
        finally:
            op.stop()
    baseline = results["api"]["p50"]
    print_table(
        f"Dashboard runs list, {args.runs} runs (ms; ratio: p50 / the API's JSON page p50)",
        ["what", "p50", "p90", "max", "ratio"],
        [[k, v["p50"], v["p90"], v["max"], ratio(v["p50"], baseline)] for k, v in results.items()],
    )
    write_results("dashboard", args, {"runs": args.runs, "results": results})


if __name__ == "__main__":
    main()
