"""The throughput benchmark's kill runs: 16 clients on 2 browsers (batching on, level high), a fresh pool each, one
serving browser SIGKILLed mid-load; the answers per 250 ms show the dip and the recovery (``kill_timeline``), and the
PNG shows the run whose dip is the median (``plot_kill``). Run by ``benchmarks.throughput``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.client_load import Load, warm
from benchmarks.results import save_chart, summary

BIN_S = 0.25                         # the kill run's timeline resolution


def kill_run(reference: dict[str, np.ndarray], seconds: float, kill_at: float, warm_s: float,
             temp: Path) -> dict[str, Any]:
    """16 clients on 2 browsers (batching on, level high); the busiest serving browser is SIGKILLed."""
    import ray

    from events.state import browsers_alive
    from webpool import ResourcePool

    pool = ResourcePool.remote(max_connections=2, event_log=str(temp / "events-kill"),
                               fault_tolerance={"level": "high", "recovery_strategy": "failover"})
    try:
        warm(pool, 2, warm_s, standby=1)
        load = Load(pool, 16, 1, reference)
        start = time.perf_counter()
        load.start()
        time.sleep(kill_at)
        state = ray.get(pool.get_state.remote())
        victim = next(b.browser_id for b in browsers_alive(state) if not b.standby)
        killed_at = time.perf_counter() - start
        ray.get(pool.inject_fault.remote(victim, "kill_browser"))
        time.sleep(max(0.0, seconds - kill_at))   # as long after the kill as planned, however late it came
        load.stop()
        seconds = time.perf_counter() - start
        stats = ray.get(pool.get_recovery_statistics.remote())
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)
    bins = np.zeros(int(np.ceil(seconds / BIN_S)))   # the whole run, a late kill's tail included
    for t, _ in load.done:
        i = int((t - start) / BIN_S)
        if 0 <= i < len(bins):
            bins[i] += 1
    rate = bins / BIN_S
    return {
        "clients": 16, "browsers": 2, "level": "high", "killed": victim, "killed_at_s": killed_at,
        "seconds": seconds, "bin_s": BIN_S, "answers_per_s": rate.tolist(),
        **kill_timeline(rate, killed_at, BIN_S),
        "answered": len(load.done), "wrong": load.wrong, "errors": len(load.errors),
        "error_examples": load.errors[:3], "recovery_statistics": stats,
    }


AFTER_KILL_EARLY_S = 2.0             # the kill's own effect (detection, failover, reruns) falls in here


def kill_timeline(rate: np.ndarray, killed_at: float, bin_s: float) -> dict[str, float]:
    """What a kill did to the answers per bin: the steady rate before it (median over the bins after a 1 s
    ramp), the dip (from the kill to the end of the last bin under half that rate that follows it without a
    second of recovery between), the mean rate in the first 2 s after the kill and in the rest of the run,
    each over the mean rate before (the pool also replaces its standby then, on the same cores), and the
    bins with no answer after the kill; and the service the kill cost, as seconds of the rate before: each bin
    after the kill short of that rate adds its shortfall (``lost_s``: a bin with no answer adds its whole
    length, one at half the rate half of it). Unlike the dip, whose end is one bin crossing a threshold, it
    counts a shallow, long slowdown too and moves little with one bin's noise."""
    k = int(killed_at / bin_s)
    before = rate[int(1.0 / bin_s):k]
    steady = float(np.median(before)) if len(before) else 0.0
    mean_before = float(before.mean()) if len(before) else 0.0
    low = np.flatnonzero(rate[k:] < steady / 2)
    dip_bins = 0
    for i in low.tolist():
        if i - dip_bins > int(1.0 / bin_s):
            break
        dip_bins = i + 1
    early, late = rate[k:k + int(AFTER_KILL_EARLY_S / bin_s)], rate[k + int(AFTER_KILL_EARLY_S / bin_s):]

    def ratio(part: np.ndarray) -> float | None:
        return float(part.mean() / mean_before) if len(part) and mean_before > 0 else None

    lost_s = float((np.clip(1.0 - rate[k:] / mean_before, 0.0, 1.0) * bin_s).sum()) if mean_before > 0 else None
    return {"steady_answers_per_s": steady, "dip_s": dip_bins * bin_s, "early_rate_ratio": ratio(early),
            "late_rate_ratio": ratio(late), "empty_bins_after": int((rate[k:] == 0).sum()), "lost_s": lost_s}


def kill_runs(reference: dict[str, np.ndarray], runs: int, seconds: float, kill_at: float, warm_s: float,
              temp: Path) -> dict[str, Any]:
    """``runs`` kill runs, each on a fresh pool, every one counted: totals, the dip's median and p95, and
    which run the PNG shows (the one whose dip is the median's, the lower of two)."""
    done = []
    for i in range(runs):
        done.append(kill_run(reference, seconds, kill_at, warm_s, temp / f"kill-{i}"))
        print(f"  kill run {i + 1}/{runs}: dip {done[-1]['dip_s']:.2f} s, {done[-1]['answered']} answered, "
              f"{done[-1]['wrong']} wrong, {done[-1]['errors']} errors", flush=True)
    dips = [r["dip_s"] for r in done]
    order = sorted(range(runs), key=lambda i: dips[i])
    return {"runs": done, "answered": sum(r["answered"] for r in done), "wrong": sum(r["wrong"] for r in done),
            "errors": sum(r["errors"] for r in done), "dip_s": summary(dips), "shown": order[(runs - 1) // 2],
            **{key: summary([r[key] for r in done if r[key] is not None])
               for key in ("early_rate_ratio", "late_rate_ratio", "empty_bins_after", "lost_s")}}


def plot_kill(kills: dict[str, Any], path: Path) -> Path:
    """The timeline of the run ``kills["shown"]`` (the median dip), titled with all runs' totals."""
    from matplotlib.figure import Figure  # no pyplot: no global backend to set, renders with Agg

    kill = kills["runs"][kills["shown"]]
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    rate = kill["answers_per_s"]
    ax.step([i * kill["bin_s"] for i in range(len(rate))], rate, where="post", color="#1f77b4",
            label=f"answers/s ({kill['bin_s'] * 1000:.0f} ms bins)")
    ax.axvline(kill["killed_at_s"], color="#d62728", linestyle="--", label="browser SIGKILLed")
    ax.axhline(kill["steady_answers_per_s"], color="#7f7f7f", linestyle=":", label="steady (median before)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("answers per second")
    ax.set_ylim(bottom=0)              # a rate read against zero: a dip looks as deep as it is
    runs = len(kills["runs"])
    # None when no run lasted AFTER_KILL_EARLY_S past its kill (a quick run on a slow machine): said, not faked
    late = "n/a" if kills["late_rate_ratio"] is None else f"{kills['late_rate_ratio']['median']:.2f}x"
    lost = "n/a" if not kills.get("lost_s") else f"{kills['lost_s']['median']:.2f} s"
    ax.set_title(f"16 clients, 2 browsers, level high: run {kills['shown'] + 1} of {runs} (median dip), dip "
                 f"{kill['dip_s']:.2f} s\nall runs: {kills['answered']} answered, {kills['wrong']} wrong, "
                 f"{kills['errors']} errors; dip median {kills['dip_s']['median']:.2f} s, p95 "
                 f"{kills['dip_s']['p95']:.2f} s\nfrom {AFTER_KILL_EARLY_S:.0f} s after the kill: {late} the rate "
                 f"before (a new standby starts); service lost, median: {lost} of the rate before", fontsize=8)
    ax.legend(loc="lower right", fontsize=8)
    return save_chart(fig, path)
