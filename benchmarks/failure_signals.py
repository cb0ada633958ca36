"""Failure signals: from a real fault in a browser to the failure's category, on real Chromium.

One ``BrowserCore`` with MiniLM loaded (no Ray, no pool: this is the browser actor's own detection).
For each fault (``kill_browser``, ``kill_renderer``, ``crash_page``, ``disconnect``) on an idle page and
on a page running a 24-sentence request, it measures the time from the fault (the moment
``inject_fault`` returns; the kill or cut is its last act) to ``BrowserCore.signal.failure`` being set, the
category decided, and what the request in flight ended in (its category, or "answered" when the fault
only took effect after it). After each ``disconnect`` it times the ``reconnect`` recovery step and its
phases. Every trial is counted; none is dropped.

Prints a table and writes ``results/failure_signals.json``.
Run: ``python -m benchmarks.failure_signals [--trials N] [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from typing import Any

import numpy as np

from benchmarks.results import ended, machine, summary_ms, utc_now, write_results
from events.errors import BrowserFailure
from webpool.helptext import plain

FAULTS = ("kill_browser", "kill_renderer", "crash_page", "disconnect")
SENTENCES = [f"Sentence {i}: browsers crash, hang and disconnect, and the pool must not lose the work."
             for i in range(24)]
TARGETS = {"detect_crash_p50_ms": 50.0, "reconnect_p50_ms": 80.0}
SIGNAL_POLL_S = 0.001       # how often the benchmark reads ``core.signal.failure`` (its own resolution)
GIVE_UP_S = 10.0            # a trial whose failure never shows is counted as such, not dropped


async def _trial(core: Any, art: Any, data: np.ndarray, fault: str, busy: bool) -> dict[str, Any]:
    from actors.faults import inject_fault
    from sharding.models import minilm

    if art.key not in (await core.health())["models"]:
        await core.load_model(art.key, data, art.sha256, "wasm")
    request = None
    if busy:
        request = asyncio.ensure_future(core.run(art.key, minilm.tokenize(SENTENCES), fetch=["embedding"]))
        await asyncio.sleep(0.15)            # the run is under way in the page (it takes ~0.5-1 s here)
    await inject_fault(core, fault)
    t_fault = time.perf_counter()
    while core.signal.failure is None and time.perf_counter() - t_fault < GIVE_UP_S:
        await asyncio.sleep(SIGNAL_POLL_S)
    trial: dict[str, Any] = {
        "detect_ms": (time.perf_counter() - t_fault) * 1000 if core.signal.failure is not None else None,
        "category": core.signal.failure[0].value if core.signal.failure is not None else None,
    }
    if request is not None:
        try:
            out = await request
            err = np.abs(out["outputs"]["embedding"] - minilm.reference_embed(SENTENCES)).max()
            trial["request"] = "answered" if err <= 1e-4 else f"wrong answer (max error {err:.2e})"
        except BrowserFailure as exc:
            trial["request"] = exc.category.value
        trial["request_ended_ms"] = (time.perf_counter() - t_fault) * 1000
    if fault == "disconnect" and trial["category"] == "connection":
        t0 = time.perf_counter()
        result = await core.reconnect()
        trial["reconnect_ms"] = (time.perf_counter() - t0) * 1000
        trial["reconnect_phases_ms"] = result.get("phases_ms", {})
        trial["reconnect_kept_model"] = art.key in result["models"]
    else:
        await core.restart()
    return trial


def _summarise(trials: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "trials": len(trials),
        "detect": summary_ms([t["detect_ms"] for t in trials if t["detect_ms"] is not None]),
        "never_detected": sum(t["detect_ms"] is None for t in trials),
        "categories": dict(sorted(Counter(str(t["category"]) for t in trials).items())),
    }
    if any("request" in t for t in trials):
        out["request_outcomes"] = dict(sorted(Counter(t["request"] for t in trials if "request" in t).items()))
    if any("reconnect_ms" in t for t in trials):
        out["reconnect"] = summary_ms([t["reconnect_ms"] for t in trials if "reconnect_ms" in t])
        phases = sorted({p for t in trials for p in t.get("reconnect_phases_ms", {})})
        out["reconnect_phases_median_ms"] = {
            p: float(np.median([t["reconnect_phases_ms"][p] for t in trials if p in t.get("reconnect_phases_ms", {})]))
            for p in phases}
        out["reconnect_kept_model"] = sum(t.get("reconnect_kept_model", False) for t in trials)
    return out


async def run(trials: int) -> dict[str, Any]:
    from actors.browser import BrowserCore
    from sharding.models.registry import artifacts

    [art] = artifacts("all-minilm-l6-v2")
    data = np.fromfile(art.path, np.uint8)
    core = BrowserCore("signals-bench")
    started_on = machine()
    cells: list[dict[str, Any]] = []
    await core.start()
    try:
        for fault in FAULTS:
            for busy in (False, True):
                rows = [await _trial(core, art, data, fault, busy) for _ in range(trials)]
                cell = {"fault": fault, "load": "request in flight" if busy else "idle",
                        "summary": _summarise(rows), "trials": rows}
                cells.append(cell)
                print(_row(cell), flush=True)
    finally:
        await core.close()
    crash_p50 = [c["summary"]["detect"]["median_ms"] for c in cells
                 if c["fault"] in ("kill_browser", "kill_renderer") and c["summary"]["detect"]]
    reconnect = [c["summary"]["reconnect"]["median_ms"] for c in cells if c["summary"].get("reconnect")]
    return {
        "benchmark": "failure_signals",
        "when": utc_now(),
        "machine": ended(started_on),
        "trials_per_cell": trials,
        "poll_resolution_ms": SIGNAL_POLL_S * 1000,
        "cells": cells,
        "targets": TARGETS,
        "targets_met": {
            "detect_crash_p50_ms": bool(crash_p50) and max(crash_p50) <= TARGETS["detect_crash_p50_ms"],
            "reconnect_p50_ms": bool(reconnect) and max(reconnect) <= TARGETS["reconnect_p50_ms"],
        },
    }


def _row(cell: dict[str, Any]) -> str:
    s = cell["summary"]
    d = s["detect"]
    text = (f"{cell['fault']:<14} {cell['load']:<18} detect p50 {d['median_ms']:7.1f} ms  p95 {d['p95_ms']:7.1f} ms"
            if d else f"{cell['fault']:<14} {cell['load']:<18} never detected")
    text += f"  categories {s['categories']}"
    if "request_outcomes" in s:
        text += f"  request {s['request_outcomes']}"
    if s.get("reconnect"):
        text += (f"  reconnect p50 {s['reconnect']['median_ms']:.0f} ms p95 {s['reconnect']['p95_ms']:.0f} ms "
                 f"{ {k: round(v, 1) for k, v in s['reconnect_phases_median_ms'].items()} }")
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=plain(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="trials per fault and load (default 10)")
    parser.add_argument("--quick", action="store_true", help="2 trials per cell (CI size)")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    r = asyncio.run(run(2 if args.quick else args.trials))
    out = write_results("failure_signals", args.quick, r)
    print("targets met:", r["targets_met"])
    print(f"wrote {out}")
    return r


if __name__ == "__main__":
    main()
