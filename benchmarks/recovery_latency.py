"""Recovery latency on real browsers, against what Ray gives for free; and the cost of fault tolerance.

For each (fault, strategy, level) and N trials, on a pool warmed with all-MiniLM-L6-v2:
a batch request is put in flight, a real fault is injected into the browser serving it, and three
numbers are taken:

- detection latency: fault -> ``BrowserFailed`` in the event log (the log's timestamp), the fault's time
  being when ``pool.inject_fault`` returns (a kill is the last thing that call does);
- recovery latency: ``BrowserFailed`` -> the first ``RecoveryCompleted`` of that browser (log timestamps);
- time to result: fault -> the correct answer (checked against ``minilm.reference_embed``,
  max abs error <= 1e-4) of the first request that met the fault. That is the request in flight,
  unless the fault landed only after it finished (a renderer busy in wasm handles ``Page.crash`` and
  a queued hang after the run); then it is the client's next request, sent as soon as the first
  answered. At level high that request may be answered by its hedge (a copy sent to an idle browser
  holding the model once it ran longer than nearly all requests do): outcome ``hedged_*``, and the time
  to result can then come before the detection. Faults that break no request (a memory ceiling crossed)
  have no time to result: their detection and recovery are still measured. ``kill_gpu`` (the GPU
  process's SIGKILL) is measured on a pool of its own on the webgpu backend (SwiftShader where there is no
  GPU; embeddings then checked to 1e-3), where it loses the WebGPU device: on wasm it would break nothing.

Two baselines are measured in the same run. The plain one is what a Ray user writes today: a Ray actor
owning a BrowserCore with MiniLM loaded in ``__init__``, ``max_restarts=1, max_task_retries=1`` and
nothing else. Its actor process is SIGKILLed and a call issued right after is timed to its correct answer.
Browser-level faults leave it a zombie (Ray sees a live actor); those are reported as "never" with the
time waited, not as a number. The careful one (``WatchfulBrowserActor``) is the strongest fair baseline:
the same actor, but it ends its own process on its browser's failure signals or a call deadline, so that
Ray restarts it and runs the call again (``max_restarts=-1, max_task_retries=-1``); every fault is put to
it, then a call timed to its correct answer. The ratios in the tables are against the careful one
(``vs_baseline``; ``vs_plain_baseline`` against the plain one).

The fault-tolerance overhead is the steady-state throughput (sequential and with 4 requests in
flight) and latency at levels none, medium, high (and critical, voting over 3 browsers).

Writes ``results/recovery_latency.json`` (``-quick`` with --quick), a PNG chart next to it, and
prints tables; while it runs, the results so far are in ``recovery_latency.partial.json``. One pool
serves all trials of a (strategy, level); it is replaced when a trial leaves it unfit for the next
(a browser left failed, one whose circuit breaker is about to open, a failing health check).

Run: ``python -m benchmarks.recovery_latency [--quick] [--trials N] [--faults ...]
[--strategies ...]``. A vanished node is measured on a multi-node cluster of its own, by the cluster
tests' scenario script (``--vanished-node-only --vanished-node-trials N`` runs that part alone).

The code is in modules of its own: ``recovery_common`` (constants, ``Config``, the pure helpers),
``pool_trials`` (the pool's trials), ``ray_baselines`` (the two Ray baselines), ``vanished_node`` (the
multi-node scenario) and ``recovery_report`` (tables, chart, markdown); this module runs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks.pool_trials import close_pool, run_pool_cases, settle
from benchmarks.ray_baselines import _baseline_ratios, run_baseline, run_watchful_baseline
from benchmarks.recovery_common import (
    AFTER_KILL_POOL,
    ANSWER_TIMEOUT,
    FAULTS,
    LEVELS,
    MODEL,
    OPEN_TIMEOUT,
    OVERHEAD_LEVELS,
    OVERHEAD_TEXT,
    QUICK,
    STRATEGIES,
    TOLERANCE,
    Config,
    Workload,
    _max_err,
    ratio,
)
from benchmarks.recovery_report import markdown, print_tables, write_chart
from benchmarks.results import ended, machine, results_dir, summary_ms, utc_now, write_json
from benchmarks.vanished_node import run_vanished_node, vanished_node_line
from events.errors import InputError
from webpool.helptext import plain
from webpool.localray import configure_auth_env, start_local_ray

log = logging.getLogger(__name__)

NOT_MEASURED: dict[str, str] = {}


def _start_ray(temp: Path) -> bool:
    """Start an embedded Ray unless one is running (tests share theirs). Returns True if we started it."""
    configure_auth_env()
    import ray

    if ray.is_initialized():
        return False
    start_local_ray(temp / "ray")
    return True


# ----- overhead of the levels ---------------------------------------------------------------------------------
def overhead_level(level: str, cfg: Config, event_root: Path, reference: np.ndarray) -> dict[str, Any]:
    """Steady-state throughput and latency of single-sentence requests at one level (default pool options)."""
    import ray

    from webpool import ResourcePool

    browsers = 3 if level == "critical" else 1
    ft: dict[str, Any] = {"level": level}
    if level == "critical":
        ft |= {"vote_k": 3, "standby_browsers": 0}
    pool = ResourcePool.remote(max_connections=browsers, event_log=str(event_root / f"overhead-{level}"),
                               fault_tolerance=ft)
    try:
        for _ in range(3):     # the first one launches the browser(s) and loads the model
            ray.get(pool.infer.remote(MODEL, {"text": OVERHEAD_TEXT}), timeout=OPEN_TIMEOUT)
        settle(pool, 1 if level == "high" else 0, 0.5)
        wrong = 0
        seq_ms = []
        t_start = time.perf_counter()
        for _ in range(cfg.overhead_requests):
            t0 = time.perf_counter()
            out = ray.get(pool.infer.remote(MODEL, {"text": OVERHEAD_TEXT}), timeout=ANSWER_TIMEOUT)
            seq_ms.append((time.perf_counter() - t0) * 1000)
            wrong += _max_err(out["embedding"], reference) > TOLERANCE
        seq_s = time.perf_counter() - t_start

        conc_ms: list[float] = []
        started: dict[Any, float] = {}
        sent = 0
        t_start = time.perf_counter()
        while sent < cfg.overhead_requests or started:
            while sent < cfg.overhead_requests and len(started) < cfg.concurrency:
                started[pool.infer.remote(MODEL, {"text": OVERHEAD_TEXT})] = time.perf_counter()
                sent += 1
            ready, _ = ray.wait(list(started), num_returns=1, timeout=ANSWER_TIMEOUT)
            if not ready:
                raise TimeoutError(f"no answer within {ANSWER_TIMEOUT:.0f} s")
            [done] = ready
            conc_ms.append((time.perf_counter() - started.pop(done)) * 1000)
            wrong += _max_err(ray.get(done)["embedding"], reference) > TOLERANCE
        conc_s = time.perf_counter() - t_start
        stats = ray.get(pool.get_recovery_statistics.remote())
    finally:
        close_pool(pool)
    return {
        "browsers": browsers, "fault_tolerance": ft, "wrong_answers": int(wrong),
        # Level high: slow requests copied to the standby (what hedging cost, with no fault at all).
        "hedges": {"sent": stats["hedges_sent"], "won": stats["hedges_won"]},
        "sequential": {"requests_per_s": cfg.overhead_requests / seq_s, "latency": summary_ms(seq_ms)},
        "concurrent": {"in_flight": cfg.concurrency, "requests_per_s": cfg.overhead_requests / conc_s,
                       "latency": summary_ms(conc_ms)},
    }


def overhead_ratios(levels: dict[str, dict[str, Any]]) -> None:
    base = levels.get("none")
    for result in levels.values():
        if base is None or "error" in base or "error" in result:
            result["vs_none"] = None
            continue
        result["vs_none"] = {
            mode: {"throughput": ratio(result[mode]["requests_per_s"], base[mode]["requests_per_s"]),
                   "latency_median": ratio(result[mode]["latency"]["median_ms"], base[mode]["latency"]["median_ms"]),
                   "latency_p95": ratio(result[mode]["latency"]["p95_ms"], base[mode]["latency"]["p95_ms"])}
            for mode in ("sequential", "concurrent")
        }


# ----- the run ------------------------------------------------------------------------------------------------
def run(cfg: Config, advance: Callable[[str], None] = lambda _d: None,
        checkpoint: Callable[[dict[str, Any]], None] = lambda _r: None) -> dict[str, Any]:
    """The whole benchmark; ``checkpoint`` gets the results so far after each phase and case (a run of
    hours that is stopped leaves what it measured)."""
    from sharding.models import minilm

    work = Workload.of(cfg.batch)
    single = minilm.reference_embed([OVERHEAD_TEXT])[0]
    temp = Path(tempfile.mkdtemp(prefix="wprec-", dir="/tmp"))   # short: Ray's socket paths have a length limit
    started_ray = _start_ray(temp)
    t_run = time.perf_counter()
    r: dict[str, Any] = {
        "benchmark": "recovery_latency", "quick": cfg.quick, "complete": False,
        "date": utc_now(),
        "machine": machine(),
        "duration_s": None, "phases": {},
        "config": dataclasses.asdict(cfg) | {"model": MODEL, "tolerance": TOLERANCE,
                                             "max_connections": 1, "standby_browsers_at_high": 1},
        "definitions": {
            "fault_time": "when pool.inject_fault returned to the driver (wall clock); a kill is the last "
                          "thing that call does, after a PID lookup over CDP (inject_ms is the whole call)",
            "detection_ms": "fault -> BrowserFailed (event log timestamp, same host clock)",
            "recovery_ms": "BrowserFailed -> first RecoveryCompleted of that browser (event log timestamps)",
            "time_to_result_ms": "fault -> correct answer of the first request that met the fault "
                                 "(the one in flight, else the next one, sent as soon as the first answered)",
            "beyond_request_median_ms": "median time to result minus the median of the same batch with no "
                                        "fault (steady_request): what the fault cost beyond running it again",
            "rerun_start_ms": "fault -> the first OperationStarted after the browser's recovery completed: when "
                              "the work started again (the rerun's own time excluded)",
            "after_kill": "level high, failover, a warmed-up standby: a one-sentence request sent as soon as "
                          "inject_fault(serving browser, 'kill_browser') returned, timed to its correct answer, "
                          "vs the median of 5 of the same request with no fault just before (ratio per trial)",
            "kill_actor": "the same fault on every side: SIGKILL of the actor's process (the pool's browser actor "
                          "kills itself: pool.inject_fault(browser, 'kill_actor'); the baselines' from the driver)",
            "vs_baseline": "against the careful Ray actor (careful_baseline: it ends its process on its browser's "
                           "failure signals or a call deadline, so Ray restarts it); vs_plain_baseline: against "
                           "the plain one (baseline), which cannot notice its browser's failure",
        },
        "baseline": None, "careful_baseline": None, "cases": [], "pools": {}, "after_kill": {},
        "overhead": {"levels": {}, "text": OVERHEAD_TEXT,
                     "pool": "max_connections=1 (critical: 3, vote_k=3, no standby), default health interval and "
                             "request timeout"},
        "not_measured": dict(NOT_MEASURED),
    }
    phases = r["phases"]
    try:
        t0 = time.perf_counter()
        r["baseline"] = run_baseline(cfg, work, advance)
        phases["baseline_s"] = round(time.perf_counter() - t0, 1)
        checkpoint(r)
        t0 = time.perf_counter()
        r["careful_baseline"] = run_watchful_baseline(cfg, work, advance)
        phases["careful_baseline_s"] = round(time.perf_counter() - t0, 1)
        checkpoint(r)
        t0 = time.perf_counter()
        run_pool_cases(cfg, work, temp / "events", advance, r["cases"], r["pools"], lambda: checkpoint(r),
                       r["after_kill"])
        # Ratios against the careful Ray actor (the strongest fair baseline); the plain one's as well.
        _baseline_ratios(r["cases"], r["careful_baseline"])
        _baseline_ratios(r["cases"], r["baseline"], key="vs_plain_baseline")
        phases["recovery_cases_s"] = round(time.perf_counter() - t0, 1)
        checkpoint(r)
        t0 = time.perf_counter()
        overhead = r["overhead"]["levels"]
        for level in cfg.overhead_levels:
            advance(f"overhead at level {level}")
            try:
                overhead[level] = overhead_level(level, cfg, temp / "events", single)
            except Exception as exc:     # one level that cannot be measured does not void the others
                log.warning("overhead level failed", extra={"level": level, "error": str(exc)})
                overhead[level] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        overhead_ratios(overhead)
        phases["overhead_s"] = round(time.perf_counter() - t0, 1)
        if not cfg.vanished_node:
            r["not_measured"]["vanished_node"] = ("not measured in this run (--quick or --no-vanished-node): it "
                                                  "needs the multi-node scenario")
        else:
            t0 = time.perf_counter()
            advance("a node vanishing under load (multi-node cluster)")
            r["vanished_node"] = run_vanished_node(temp)
            phases["vanished_node_s"] = round(time.perf_counter() - t0, 1)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    ended(r["machine"])
    r["duration_s"] = round(time.perf_counter() - t_run, 1)
    r["complete"] = True
    return r


def _config_from_args(args: argparse.Namespace) -> Config:
    base = QUICK if args.quick else Config()
    changes: dict[str, Any] = {}
    for name in ("faults", "strategies", "levels", "overhead_levels"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = tuple(value)
    if args.trials is not None:
        changes["trials"] = args.trials
        if not args.quick:
            changes["baseline_kill_trials"] = args.trials
    for name in ("batch", "zombie_wait_s", "request_timeout", "health_interval", "memory_limit_mb",
                 "overhead_requests", "baseline_kill_trials", "baseline_other_trials", "vanished_node",
                 "after_kill_trials"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=plain(__doc__.split("\n\n")[0]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI size: kill_actor, disconnect x failover x high, "
                                                            "1 trial; overhead at none and medium")
    parser.add_argument("--trials", type=int, help="trials per (fault, strategy, level); default 20")
    parser.add_argument("--faults", nargs="+", choices=FAULTS)
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES)
    parser.add_argument("--levels", nargs="+", choices=LEVELS)
    parser.add_argument("--batch", type=int, help="sentences in the request put in flight (default 24)")
    parser.add_argument("--overhead-levels", nargs="*", choices=OVERHEAD_LEVELS, dest="overhead_levels",
                        help="levels for the overhead measurement (none given: skip it)")
    parser.add_argument("--overhead-requests", type=int, dest="overhead_requests")
    parser.add_argument("--baseline-kill-trials", type=int, dest="baseline_kill_trials",
                        help="baseline actor kills (default: --trials)")
    parser.add_argument("--baseline-other-trials", type=int, dest="baseline_other_trials",
                        help="baseline trials per browser-level fault (default 2; 0: none)")
    parser.add_argument("--zombie-wait", type=float, dest="zombie_wait_s",
                        help="seconds the baseline is given to answer after a browser-level fault")
    parser.add_argument("--request-timeout", type=float, dest="request_timeout")
    parser.add_argument("--health-interval", type=float, dest="health_interval")
    parser.add_argument("--memory-limit-mb", type=int, dest="memory_limit_mb")
    parser.add_argument("--after-kill-trials", type=int, dest="after_kill_trials",
                        help="one-sentence requests right after a SIGKILL, on the failover/high pool (default 10)")
    parser.add_argument("--no-vanished-node", dest="vanished_node", action="store_false", default=None,
                        help="skip the multi-node scenario (a node removed under load)")
    parser.add_argument("--vanished-node-only", action="store_true",
                        help="run only the multi-node scenario and merge it into the JSON in --out-dir")
    parser.add_argument("--vanished-node-trials", type=int, default=1, metavar="N",
                        help="runs of the multi-node scenario, each on a fresh cluster (~1 min each; default 1)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where results go (default: $WEBPOOL_RESULTS or results/)")
    parser.add_argument("--markdown", type=Path, metavar="JSON",
                        help="print the results in JSON as the README's markdown table and exit")
    args = parser.parse_args(argv)
    args.out_dir = args.out_dir or results_dir()
    if args.markdown is not None:
        print(markdown(orjson.loads(args.markdown.read_bytes())))
        return {}
    if args.vanished_node_only:
        path = args.out_dir / "recovery_latency.json"
        r = orjson.loads(path.read_bytes()) if path.exists() else {}
        temp = Path(tempfile.mkdtemp(prefix="wprec-", dir="/tmp"))
        try:
            r["vanished_node"] = run_vanished_node(temp, args.vanished_node_trials)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        write_json(r, path)
        v = r["vanished_node"]
        print(orjson.dumps({k: x for k, x in v.items() if k != "per_trial"}, option=orjson.OPT_INDENT_2).decode())
        print(vanished_node_line(v) if v.get("time_to_result") else "not measured")
        return r
    try:
        cfg = _config_from_args(args)
    except InputError as exc:
        parser.error(str(exc))

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    kill = "kill_actor" in cfg.faults
    total = (len(cfg.faults) * len(cfg.strategies) * len(cfg.levels) * cfg.trials + len(cfg.overhead_levels)
             + (cfg.baseline_kill_trials if kill else 0) + (len(cfg.faults) - kill) * cfg.baseline_other_trials
             + cfg.vanished_node
             + (cfg.after_kill_trials if AFTER_KILL_POOL[0] in cfg.strategies and AFTER_KILL_POOL[1] in cfg.levels
                else 0))
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "recovery_latency-quick" if cfg.quick else "recovery_latency"
    partial_out = out_dir / f"{stem}.partial.json"     # the results so far, while it runs
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("starting", total=total)

        def advance(description: str) -> None:
            bar.update(task, advance=1, description=description)

        r = run(cfg, advance, lambda partial: write_json(partial, partial_out))
    out = out_dir / f"{stem}.json"
    write_json(r, out)
    partial_out.unlink(missing_ok=True)
    write_chart(r, out_dir / f"{stem}.png")
    print_tables(r)
    print(f"wrote {out} and {stem}.png")
    return r


if __name__ == "__main__":
    main()
