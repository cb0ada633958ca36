"""Serving under load: many clients, one pool, batching off and on, against CPU onnxruntime in the same run.

For browsers = 1 and 2 and batching off (``max_batch_size=1``) and on (the pool's defaults), a pool
serves MiniLM requests of 1 and of 8 distinct sentences from 1, 4, 16 and 64 client threads of this
driver, each sending its next request when its last one is answered. Each cell runs ``trials``
windows of ``trial_s`` seconds after a ramp window of the same length; a window's throughput counts
the requests answered in it, and every answer's latency is kept. Every answer is compared with the
numpy reference for its own texts (a wrong or mixed-up row counts as wrong, never dropped).

Baseline: CPU onnxruntime on the same ONNX file and the same cores (all of them, and one thread),
each at its best batch size, measured in this run. The ceiling (``benchmarks/browsers_alone.py``): the same
browsers with no pool in front, the most rows per second they compute here; each target
is set against it (a target above it no pool of these browsers can meet). Then the kill runs (10; quick: 1): 16 clients,
2 browsers, batching on, level high, a fresh pool each; one serving browser is SIGKILLed mid-load,
and the answers per 250 ms show the dip and the recovery (PNG: the run whose dip is the median).

Writes ``results/throughput.json`` and ``results/throughput_kill.png``; ``--kill-only`` runs only the
kill runs and writes ``results/throughput_kill.json`` (and the PNG).
Run: ``python -m benchmarks.throughput [--quick] [--kill-only] [--kill-runs N]`` (or ``webpool bench throughput``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.browsers_alone import browsers_alone, pool_threads
from benchmarks.client_load import MODEL, TEXTS, TOLERANCE, Load, warm
from benchmarks.results import ended, load_text, machine, results_dir, summary, summary_ms, utc_now, write_results
from benchmarks.throughput_kill import AFTER_KILL_EARLY_S, kill_runs, plot_kill
from webpool.helptext import plain
from webpool.localray import configure_auth_env, start_local_ray


def cpu_seconds_by_part() -> dict[str, float]:
    """CPU seconds used so far by each part of the system, from /proc (Linux; empty elsewhere): the pages
    (Chromium renderers), the rest of Chromium, the pool, log and browser actors, Playwright's driver,
    this driver (the clients), and the rest of Ray."""
    parts: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in (p for p in os.listdir("/proc") if p.isdigit()) if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(pid) == os.getpid():
            part = "driver (clients)"
        elif "--type=renderer" in cmd:
            part = "chromium renderers (pages)"
        elif "chromium" in cmd or "chrome" in cmd:
            part = "chromium (browser, gpu, utility)"
        elif cmd.startswith("ray::"):
            part = cmd.split()[0].split(".")[0]
        elif "playwright" in cmd:
            part = "playwright driver"
        elif "ray" in cmd:
            part = "ray (raylet, gcs, workers)"
        else:
            continue
        parts[part] = parts.get(part, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return parts


def measure_cell(pool: Any, clients: int, rows: int, trials: int, trial_s: float,
                 reference: dict[str, np.ndarray]) -> dict[str, Any]:
    import ray

    before = dict(ray.get(pool.get_state.remote()).metrics)
    load = Load(pool, clients, rows, reference)
    start = time.perf_counter()
    load.start()
    time.sleep(trial_s)
    cpu_before = cpu_seconds_by_part()                   # the ramp window is not counted
    time.sleep(trial_s * trials)
    cpu = {k: round(v - cpu_before.get(k, 0.0), 2) for k, v in cpu_seconds_by_part().items()}
    load.stop()
    after = dict(ray.get(pool.get_state.remote()).metrics)
    # What else the pool did meanwhile (browsers launched, drained, failed...): where time may have gone.
    pool_events = {k: v - before.get(k, 0) for k, v in after.items()
                   if v != before.get(k, 0) and not k.startswith("operation")}
    windows = [start + trial_s * (i + 1) for i in range(trials + 1)]      # the first window is the ramp
    per_trial = [sum(1 for t, _ in load.done if lo <= t < hi) / trial_s for lo, hi in itertools.pairwise(windows)]
    latencies = [lat * 1000 for t, lat in load.done if windows[0] <= t < windows[-1]]
    lat = np.asarray(latencies) if latencies else np.zeros(0)
    return {
        "clients": clients, "rows_per_request": rows, "trials": trials, "trial_s": trial_s,
        "ramp_s": trial_s, "answered": len(load.done), "wrong": load.wrong, "errors": len(load.errors),
        "error_examples": load.errors[:3],
        # Over all windows together (answers / seconds), and per window: a window shorter than a request's
        # latency counts bursts, so its median can be far from the rate.
        "throughput_req_s": len(latencies) / (trial_s * trials),
        "requests_per_s": summary(per_trial),
        "latency": summary_ms(latencies) | ({"p99_ms": float(np.percentile(lat, 99))} if len(lat) else {}),
        "pool_events": pool_events,
        "cpu_s": dict(sorted(((k, v) for k, v in cpu.items() if v > 0), key=lambda kv: -kv[1])),
        "cpu_s_available": (os.cpu_count() or 1) * trial_s * trials,
    }


def native_baseline(threads_list: list[int], batches: list[int], trials: int) -> dict[str, Any]:
    """CPU onnxruntime on the pool's ONNX file: rows/s at each batch size and thread count (``trials``
    runs of ~0.3 s each), and the best."""
    import onnxruntime as ort

    from sharding.models import minilm
    from sharding.models.registry import artifacts

    [art] = artifacts(MODEL)
    out: dict[str, Any] = {}
    for threads in threads_list:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        session = ort.InferenceSession(str(art.path), so, providers=["CPUExecutionProvider"])
        cells = {}
        for batch in batches:
            feeds = minilm.tokenize([TEXTS[i % len(TEXTS)] for i in range(batch)])
            session.run(None, feeds)
            per_trial = []
            for _ in range(trials):
                t0, n = time.perf_counter(), 0
                while time.perf_counter() - t0 < 0.3:
                    session.run(None, feeds)
                    n += 1
                per_trial.append(n * batch / (time.perf_counter() - t0))
            cells[str(batch)] = summary(per_trial)
        best = max(cells, key=lambda b: cells[b]["median"])
        out[f"{threads}_threads"] = {"by_batch": cells, "best_batch": int(best),
                                     "best_rows_per_s_median": cells[best]["median"]}
    return out


def run(quick: bool, trials: int | None = None, trial_s: float | None = None, kill_only: bool = False,
        kill_n: int | None = None) -> dict[str, Any]:
    import ray

    from sharding.models import minilm
    from webpool import ResourcePool

    kill_n = kill_n or (1 if quick else 10)
    trials = trials or (2 if quick else 10)
    trial_s = trial_s or (0.5 if quick else 1.0)
    browsers_list = [1] if quick else [1, 2]
    clients_list = [1, 4] if quick else [1, 4, 16, 64]
    rows_list = [1] if quick else [1, 8]
    warm_s = 1.0 if quick else 8.0
    reference = dict(zip(TEXTS, minilm.reference_embed(TEXTS), strict=True))
    results: dict[str, Any] = {
        "benchmark": "throughput_kill" if kill_only else "throughput", "quick": quick,
        "date": utc_now(),
        "machine": machine(),
        "model": MODEL, "tolerance": TOLERANCE, "cells": [],
    }
    temp = Path(tempfile.mkdtemp(prefix="wpbench-", dir="/tmp"))
    started_ray = not ray.is_initialized()       # a test shares its session's Ray
    if started_ray:
        start_local_ray(temp / "ray")
    try:
        for browsers in [] if kill_only else browsers_list:
            for batching in (False, True):
                options = {} if batching else {"max_batch_size": 1}
                pool = ResourcePool.remote(max_connections=browsers,
                                           event_log=str(temp / f"events-{browsers}-{batching}"), **options)
                try:
                    warm(pool, browsers, warm_s)
                    for rows in rows_list:
                        for clients in clients_list:
                            cell = measure_cell(pool, clients, rows, trials, trial_s, reference)
                            results["cells"].append({"browsers": browsers, "batching": batching} | cell)
                            _progress(results["cells"][-1])
                finally:
                    ray.get(pool.shutdown.remote())
                    ray.kill(pool)
        results["kill"] = kill_runs(reference, kill_n, 4.0 if quick else 12.0, 1.5 if quick else 4.0, warm_s, temp)
    finally:
        if started_ray:
            ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    ended(results["machine"])        # the pools' part (the ceilings follow)
    if kill_only:
        return results
    # Quick (CI) keeps what the targets are computed from: the pool's own thread count, pages and native.
    results["browsers_alone"] = browsers_alone(MODEL, reference, TOLERANCE, browsers_list,
                                               [8] if quick else [1, 8, 16, 32], trials, trial_s, warm_s,
                                               thread_per_core=not quick)
    threads = [1] if quick else sorted({1, os.cpu_count() or 1})
    results["native_onnxruntime"] = native_baseline(threads, [1, 8] if quick else [1, 8, 16, 32, 64],
                                                     trials=3 if quick else 10)
    results["targets"] = targets(results)
    return results


def _progress(cell: dict[str, Any]) -> None:
    print(f"  browsers={cell['browsers']} batching={'on' if cell['batching'] else 'off'} "
          f"rows={cell['rows_per_request']} clients={cell['clients']}: "
          f"{cell['throughput_req_s']:.1f} req/s, p50 {cell['latency']['median_ms']:.0f} ms, "
          f"wrong {cell['wrong']}, errors {cell['errors']}", flush=True)


def _cell(r: dict[str, Any], browsers: int, batching: bool, rows: int, clients: int) -> dict[str, Any] | None:
    wanted = (browsers, batching, rows, clients)
    return next((c for c in r["cells"]
                 if (c["browsers"], c["batching"], c["rows_per_request"], c["clients"]) == wanted), None)


def targets(r: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, from this run's own cells (None where the run did not measure the cell)."""
    browsers = max(c["browsers"] for c in r["cells"])
    clients = max(c["clients"] for c in r["cells"] if c["clients"] <= 16)
    on, off = _cell(r, browsers, True, 1, clients), _cell(r, browsers, False, 1, clients)
    one = _cell(r, browsers, True, 1, 1)
    native = max(v["best_rows_per_s_median"] for v in r["native_onnxruntime"].values())

    def ratio(a: dict | None, b: dict | float | None) -> float | None:
        if a is None or b is None:
            return None
        return a["throughput_req_s"] / (b if isinstance(b, float) else b["throughput_req_s"])

    # What each target needs the pool to answer (req/s; a request is one row here), against what the same
    # browsers compute with nothing in front of them: a target above that ceiling no pool of them can meet.
    ceiling = r["browsers_alone"][f"{browsers}_pages_{pool_threads(browsers)}_threads"]["best_rows_per_s"]

    def needs(req_s: float | None) -> dict[str, Any]:
        return {"needs_req_s": req_s, "browsers_alone_rows_s": ceiling,
                "within_ceiling": None if req_s is None else req_s <= ceiling}

    kill = r.get("kill", {})
    return {
        "case": f"{clients} clients, {browsers} browser(s), single sentences",
        "vs_one_sequential_client": {"ratio": ratio(on, one), "target": 5.0,
                                     **needs(5.0 * one["throughput_req_s"] if one else None)},
        "vs_batching_off": {"ratio": ratio(on, off), "target": 2.0,
                            **needs(2.0 * off["throughput_req_s"] if off else None)},
        "vs_native_onnxruntime_best": {"ratio": ratio(on, float(native)), "target": 0.6,   # rows = requests
                                       **needs(0.6 * float(native))},
        "p99_over_p50": {"ratio": on["latency"]["p99_ms"] / on["latency"]["median_ms"] if on else None, "target": 3.0},
        # Closed-loop clients (each sends its next request when answered): throughput = clients / mean latency
        # (Little's law), so a p50 of 150 ms needs about clients / 0.150 s while the mean stays near the p50.
        "p50_ms": {"value": on["latency"]["median_ms"] if on else None, "target": 150.0, **needs(clients / 0.150)},
        "browsers_alone_vs_native": ceiling / float(native),
        "kill": {"runs": len(kill.get("runs", [])), "wrong": kill.get("wrong"), "errors": kill.get("errors"),
                 "dip_s": kill.get("dip_s"), "target_dip_s_median": 1.5},
    }


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"webpool throughput ({r['date']}, {r['machine']['cpus']} CPUs{load_text(r['machine'])}"
                    f"{', quick' if r['quick'] else ''})")
    for col in ("browsers", "rows/req", "clients", "batching", "req/s", "req/s per window (median, p95)", "p50 ms",
                "p95 ms", "p99 ms", "wrong", "errors"):
        t.add_column(col)
    for c in r["cells"]:
        t.add_row(str(c["browsers"]), str(c["rows_per_request"]), str(c["clients"]), "on" if c["batching"] else "off",
                  f"{c['throughput_req_s']:.1f}",
                  f"{c['requests_per_s']['median']:.1f}, {c['requests_per_s']['p95']:.1f}",
                  f"{c['latency']['median_ms']:.0f}", f"{c['latency']['p95_ms']:.0f}", f"{c['latency']['p99_ms']:.0f}",
                  str(c["wrong"]), str(c["errors"]))
    if r["cells"]:
        Console().print(t)
    for name, v in r.get("native_onnxruntime", {}).items():
        print(f"native onnxruntime, {name.replace('_', ' ')}: best {v['best_rows_per_s_median']:.0f} rows/s "
              f"(batch {v['best_batch']})")
    for name, v in r.get("browsers_alone", {}).items():
        print(f"browsers alone, {name.replace('_', ' ')}: best {v['best_rows_per_s']:.0f} rows/s "
              f"(batch {v['best_batch']}; by batch: "
              + ", ".join(f"{b}: {c['rows_per_s']:.0f}" for b, c in v["by_batch"].items()) + ")")
    for name, v in r.get("targets", {}).items():
        print(f"{name}: {v}")
    kills = r["kill"]
    print(f"kill runs: {len(kills['runs'])}, {kills['answered']} answered, {kills['wrong']} wrong, "
          f"{kills['errors']} errors; dip (s): {kills['dip_s']}; answers/s over before, first "
          f"{AFTER_KILL_EARLY_S:.0f} s after: {kills['early_rate_ratio']}, rest: {kills['late_rate_ratio']}; "
          f"empty bins after: {kills['empty_bins_after']}; service lost (s of the rate before): {kills['lost_s']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_auth_env()
    parser = argparse.ArgumentParser(description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI): 1 browser, 1 and 4 clients, "
                        "the baselines at the pool's thread count only")
    parser.add_argument("--trials", type=int, help="windows per cell (default 10; quick 2)")
    parser.add_argument("--trial-s", type=float, help="seconds per window (default 1.0; quick 0.5)")
    parser.add_argument("--kill-runs", type=int, help="kill runs, each on a fresh pool (default 10; quick 1)")
    parser.add_argument("--kill-only", action="store_true",
                        help="only the kill runs (writes throughput_kill.json; the cells' JSON is left as it is)")
    args = parser.parse_args(argv)
    if args.kill_runs is not None and args.kill_runs < 1:
        parser.error("--kill-runs must be at least 1")
    r = run(args.quick, args.trials, args.trial_s, kill_only=args.kill_only, kill_n=args.kill_runs)
    out = write_results("throughput_kill" if args.kill_only else "throughput", args.quick, r)
    png = plot_kill(r["kill"], results_dir() / f"throughput_kill{'-quick' if args.quick else ''}.png")
    print_table(r)
    print(f"wrote {out} and {png}")
    return r


if __name__ == "__main__":
    main()
