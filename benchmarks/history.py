"""analyze_performance_trends on 1M entries: the Arrow/numpy tracker vs the seed guide's list scan.

Both analyse the same operations in the same run: the tracker's Arrow table, and a Python list of
small entry objects (one per operation, as the seed's PerformanceHistoryTracker keeps them) scanned by
the guide's algorithm, re-implemented here as written (``guide_analyze``). Each scenario is timed
``--repeats`` times per side, the two sides interleaved (same machine load); the table reports median
and p95 and their ratio (guide / webpool).
The figures both sides define the same way (avg/min/max, the guide's recent/oldest means, improvement
rate) are checked to agree; success rate and trend direction are defined differently on purpose
(the guide drops failed operations before counting success and calls any nonzero slope a trend).

Also measured: folding real ``Recorded`` events into a tracker (``observe_many``), in events/s.

Prints a table and writes ``results/history.json``. Run: ``python -m benchmarks.history [--quick]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks.results import summary_ms, utc_now, write_results
from events.history import PerformanceHistoryTracker
from events.performance import SCHEMA
from events.schema import BrowserLaunched, ModelLoaded, OperationCompleted, OperationFailed, OperationStarted, Recorded
from webpool.helptext import plain

T0 = 1_700_000_000.0
SPAN_S = 3000.0          # all operations inside the guide's default one-hour window
MODELS = ("all-minilm-l6-v2", "smollm2-135m", "bert-base", "t5-small")
TYPES = ("chromium/wasm", "chromium/webgpu", "edge/wasm")
BROWSERS = 12            # browser i has type TYPES[i % 3]


def make_table(n: int, seed: int = 0) -> pa.Table:
    """n operations over SPAN_S seconds, ~3 % failed; smollm2-135m slows from ~400 ms to ~600 ms."""
    rng = np.random.default_rng(seed)
    ts = T0 + np.sort(rng.uniform(0, SPAN_S, n))
    model = rng.integers(0, len(MODELS), n)
    browser = rng.integers(0, BROWSERS, n)
    base = np.array([25.0, 400.0, 60.0, 120.0])[model] * np.array([1.0, 2.5, 1.2])[browser % 3]
    drift = np.where(model == 1, 1 + 0.5 * (ts - T0) / SPAN_S, 1.0)
    dur = base * drift * rng.lognormal(0, 0.25, n)
    ok = rng.random(n) > 0.03
    categories = np.array(["crash", "timeout", "memory"])[rng.integers(0, 3, n)]
    return pa.table({
        "op_id": pc.cast(pa.array(rng.permutation(n) + 10**9), pa.string()),
        "seq": pa.array(np.arange(n, dtype=np.int64) * 2 + 100),
        "ts": ts, "started_ts": ts - dur / 1000,
        "model": pa.array(np.array(MODELS)[model]),
        "browser_id": pa.array(np.char.add("browser-", browser.astype(str))),
        "browser_type": pa.array(np.array(TYPES)[browser % 3]),
        "operation_type": pa.array(np.where(model == 1, "generate", "infer")),
        "status": pa.array(np.where(ok, "completed", "failed")),
        "duration_ms": pa.array(dur, mask=~ok),
        "failure_category": pa.array(np.where(ok, None, categories)),
    }, schema=SCHEMA)


# ---- the seed guide's tracker data and algorithm, as written -----------------------------------


@dataclasses.dataclass
class GuideEntry:
    """One operation as the seed keeps it: a small Python object in a list."""

    id: str
    timestamp: float
    operation_type: str
    model_name: str
    browser_id: str
    browser_type: str
    status: str
    duration_ms: float | None


def guide_entries(table: pa.Table) -> list[GuideEntry]:
    cols = {name: table.column(name).to_pylist() for name in
            ("op_id", "ts", "operation_type", "model", "browser_id", "browser_type", "status", "duration_ms")}
    # Share repeated strings the way one tracker's entries would (one object per distinct name).
    for name in ("operation_type", "model", "browser_id", "browser_type", "status"):
        cols[name] = [sys.intern(s) for s in cols[name]]
    return [GuideEntry(*row) for row in zip(*cols.values(), strict=True)]


def guide_analyze(entries: list[GuideEntry], model_name: str | None = None, browser_type: str | None = None,
                  operation_type: str | None = None, time_window_seconds: int = 3600,
                  now: float | None = None) -> dict[str, Any]:
    """The guide's analyze_performance_trends, unchanged but for ``now`` (the guide calls time.time())."""
    now = time.time() if now is None else now
    cutoff = now - time_window_seconds
    filtered_entries = [entry for entry in entries if entry.timestamp >= cutoff and
                        entry.duration_ms is not None and
                        (model_name is None or entry.model_name == model_name) and
                        (browser_type is None or entry.browser_type == browser_type) and
                        (operation_type is None or entry.operation_type == operation_type)]
    if not filtered_entries:
        return {"error": "No data available for the specified filters"}
    sorted_entries = sorted(filtered_entries, key=lambda x: x.timestamp)
    durations = [entry.duration_ms for entry in sorted_entries]
    statuses = [entry.status for entry in sorted_entries]
    if len(durations) >= 2:
        n = len(durations)
        sum_x = sum(range(n))
        sum_y = sum(durations)
        sum_xy = sum(i * y for i, y in enumerate(durations))
        sum_xx = sum(i * i for i in range(n))
        denom = n * sum_xx - sum_x * sum_x
        slope = (n * sum_xy - sum_x * sum_y) / denom if denom != 0 else 0
        trend_direction = "improving" if slope < 0 else "degrading" if slope > 0 else "stable"
        trend_magnitude = abs(slope)
    else:
        trend_direction = "stable"
        trend_magnitude = 0
    success_count = sum(1 for status in statuses if status == "completed")
    success_rate = success_count / len(statuses) if statuses else 0
    avg_duration = sum(durations) / len(durations) if durations else 0
    min_duration = min(durations) if durations else 0
    max_duration = max(durations) if durations else 0
    if len(durations) >= 10:
        avg_recent = sum(durations[-10:]) / 10
        avg_oldest = sum(durations[:10]) / 10
        improvement = (avg_oldest - avg_recent) / avg_oldest if avg_oldest > 0 else 0
    else:
        avg_recent = avg_oldest = avg_duration
        improvement = 0
    return {"entries_analyzed": len(filtered_entries), "time_window_seconds": time_window_seconds,
            "avg_duration_ms": avg_duration, "min_duration_ms": min_duration, "max_duration_ms": max_duration,
            "success_rate": success_rate, "trend_direction": trend_direction, "trend_magnitude": trend_magnitude,
            "improvement_rate": improvement, "avg_recent_duration_ms": avg_recent,
            "avg_oldest_duration_ms": avg_oldest}


# ---- measuring --------------------------------------------------------------------------------

SCENARIOS = {
    "all operations": {},
    "one model": {"model_name": "smollm2-135m"},
    "model + browser type": {"model_name": "all-minilm-l6-v2", "browser_type": "chromium/wasm"},
}
SAME_DEFINITION = ("avg_duration_ms", "min_duration_ms", "max_duration_ms", "avg_recent_duration_ms",
                   "avg_oldest_duration_ms", "improvement_rate")


def summary(samples_s: list[float]) -> dict[str, Any]:
    a = np.asarray(samples_s) * 1000
    return summary_ms(a) | {"samples_ms": a.round(3).tolist()}


def timed(fns: dict[str, Any], repeats: int) -> dict[str, tuple[list[float], Any]]:
    """Time each function ``repeats`` times, interleaved, so both sides see the same machine load."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, Any] = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            outs[k] = fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: (samples[k], outs[k]) for k in fns}


def recorded_stream(n_ops: int, seed: int = 1) -> list[Recorded]:
    """A real event sequence: 12 browsers launched with a model each, then n_ops operations."""
    rng = np.random.default_rng(seed)
    recs: list[Recorded] = []

    def add(ts: float, event) -> None:
        recs.append(Recorded(len(recs) + 1, ts, event))

    for b in range(BROWSERS):
        btype, backend = TYPES[b % 3].split("/")
        add(T0, BrowserLaunched(browser_id=f"browser-{b}", browser_type=btype, backend_caps=("wasm", backend),
                                pid=1000 + b, node_id="node-1", standby=False))
        add(T0, ModelLoaded(browser_id=f"browser-{b}", model=MODELS[b % 4], shard=None, sha256="ab" * 32,
                            backend=backend, load_ms=100.0))
    dur = rng.lognormal(np.log(40), 0.25, n_ops)
    for i in range(n_ops):
        b = i % BROWSERS
        ts = T0 + 1 + i * 0.01
        add(ts, OperationStarted(op_id=f"op-{i:08d}", model=MODELS[b % 4], browser_id=f"browser-{b}", kind="infer",
                                 input_digest="d"))
        if i % 33 == 0:
            add(ts + 0.005, OperationFailed(op_id=f"op-{i:08d}", category="crash", error="page crashed"))
        else:
            add(ts + dur[i] / 1000, OperationCompleted(op_id=f"op-{i:08d}", duration_ms=float(dur[i]), metrics={}))
    return recs


def run(n: int, repeats: int, ingest_ops: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        "benchmark": "history", "entries": n, "repeats": repeats,
        "date": utc_now(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "pyarrow": pa.__version__, "numpy": np.__version__},
    }
    table = make_table(n)
    t0 = time.perf_counter()
    tracker = PerformanceHistoryTracker.from_table(table, max_entries=n)
    results["from_table_ms"] = (time.perf_counter() - t0) * 1000
    entries = guide_entries(table)
    now = T0 + SPAN_S + 1
    scenarios = {}
    for name, filters in SCENARIOS.items():
        t = timed({"webpool": lambda f=filters: tracker.analyze_performance_trends(now=now, **f),
                   "guide": lambda f=filters: guide_analyze(entries, now=now, **f)}, repeats)
        (ours_s, ours), (guide_s, guide) = t["webpool"], t["guide"]
        agree = {k: bool(np.isclose(ours[k], guide[k], rtol=1e-9, atol=1e-12)) for k in SAME_DEFINITION}
        if not all(agree.values()):
            raise AssertionError(f"{name}: webpool and the guide disagree on {agree}: {ours} vs {guide}")
        s_ours, s_guide = summary(ours_s), summary(guide_s)
        scenarios[name] = {
            "filters": filters, "webpool": s_ours, "guide": s_guide,
            "ratio_median": s_guide["median_ms"] / s_ours["median_ms"],
            "ratio_p95": s_guide["p95_ms"] / s_ours["p95_ms"],
            "webpool_result": ours, "guide_result": guide, "same_definition_agree": agree,
        }
    results["scenarios"] = scenarios
    results["within_budget_0_5_s"] = all(s["webpool"]["p95_ms"] <= 500 for s in scenarios.values())

    stream = recorded_stream(ingest_ops)
    fresh = PerformanceHistoryTracker(max_entries=ingest_ops)
    t0 = time.perf_counter()
    added = fresh.observe_many(stream)
    _ = fresh.table                                  # include turning the buffer into Arrow
    ingest_s = time.perf_counter() - t0
    results["ingest"] = {"events": len(stream), "operations": added, "seconds": ingest_s,
                         "events_per_s": len(stream) / ingest_s}
    return results


def print_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"analyze_performance_trends, {r['entries']:,} entries, {r['repeats']} repeats "
                    f"({r['date']}, {r['machine']['cpus']} CPUs)")
    for col in ("scenario", "rows analysed", "webpool median / p95 (ms)", "guide list scan median / p95 (ms)",
                "ratio median / p95", "trend webpool / guide"):
        t.add_column(col)
    for name, s in r["scenarios"].items():
        t.add_row(name, f"{s['webpool_result']['entries_analyzed']:,}",
                  f"{s['webpool']['median_ms']:.1f} / {s['webpool']['p95_ms']:.1f}",
                  f"{s['guide']['median_ms']:.0f} / {s['guide']['p95_ms']:.0f}",
                  f"{s['ratio_median']:.0f}x / {s['ratio_p95']:.0f}x",
                  f"{s['webpool_result']['trend_direction']} / {s['guide_result']['trend_direction']}")
    Console().print(t)
    i = r["ingest"]
    print(f"observe_many: {i['events']:,} recorded events ({i['operations']:,} operations) in {i['seconds']:.2f} s "
          f"= {i['events_per_s']:,.0f} events/s; from_table({r['entries']:,} rows): {r['from_table_ms']:.0f} ms")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=plain(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k entries, 3 repeats (CI)")
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    n, repeats = (100_000, 3) if args.quick else (args.entries, args.repeats)
    r = run(n, repeats, ingest_ops=min(n, 50_000))
    out = write_results("history", args.quick, r)
    print_table(r)
    print(f"wrote {out}")
    return r


if __name__ == "__main__":
    main()
