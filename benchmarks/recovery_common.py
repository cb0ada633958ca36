"""What the recovery-latency benchmark's modules share: its constants, ``Config`` (and ``QUICK``), the trial
``Workload``, the pure helpers (event-log arithmetic, the pool's shape between trials, ratios, formatting)
and ``_answer``, which waits for one request and checks it against the numpy reference.

The benchmark itself is ``benchmarks.recovery_latency``; see its docstring for what is measured.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from events.errors import InputError
from events.state import PoolState, browsers_alive

MODEL = "all-minilm-l6-v2"
TOLERANCE = 1e-4                    # max abs error of an embedding vs the float64 numpy reference
WEBGPU_TOLERANCE = 1e-3             # the same on WebGPU (float32 kernels; SwiftShader here)
# Faults whose subject is one backend: killing the GPU process loses WebGPU's device and nothing else.
FAULT_BACKENDS = {"kill_gpu": "webgpu"}
# WebGPU on SwiftShader (no GPU here) runs MiniLM far slower than wasm: its pools get a smaller request in
# flight and a longer budget (a 24-sentence batch ran past the 5 s budget there).
WEBGPU_BATCH = 4
WEBGPU_REQUEST_TIMEOUT = 60.0
FAULTS = ("crash_page", "kill_renderer", "kill_browser", "kill_actor", "disconnect", "hang", "exhaust_memory",
          "kill_gpu")
STRATEGIES = ("reconnect", "restart", "failover", "progressive", "parallel")
LEVELS = ("medium", "high")
OVERHEAD_LEVELS = ("none", "medium", "high", "critical")
OVERHEAD_TEXT = "A man is eating food."
AFTER_KILL_POOL = ("failover", "high")    # the pool the after-kill trials run on
ANSWER_TIMEOUT = 120.0              # seconds a single request may take before the trial counts as failed
OPEN_TIMEOUT = 300.0                # a new pool's first request: launch + model load (the pool allows 180 s to load)
# The pool's default max_recovery_attempts: a browser that failed this often fails over on its next
# failure whatever the strategy (circuit breaker), so it cannot serve another trial of that strategy.
CIRCUIT_FAILURES = 3


def trial_texts(batch: int) -> list[str]:
    """The request put in flight: ``batch`` sentences of ~25 tokens."""
    return [f"Sentence {i}: browsers crash, hang and disconnect, and the pool must not lose the work."
            for i in range(batch)]


@dataclasses.dataclass(frozen=True)
class Config:
    faults: tuple[str, ...] = FAULTS
    strategies: tuple[str, ...] = STRATEGIES
    levels: tuple[str, ...] = LEVELS
    trials: int = 20
    # Sentences in the request put in flight: long enough (24: several hundred ms in wasm) to be still
    # running when the fault lands; injecting a kill first looks the PIDs up over CDP (~100-300 ms loaded).
    batch: int = 24
    # Plain baseline kills (a fresh actor each: max_restarts=1 is spent by one kill); the careful baseline's
    # trials per fault.
    baseline_kill_trials: int = 20
    baseline_other_trials: int = 2     # browser-level faults: the outcome is categorical (zombie / unaffected)
    zombie_wait_s: float = 10.0        # how long the baseline is given to answer after a browser-level fault
    # The pool's per-run budget: what a hang costs before it is detected. A fresh page's first run of the
    # batch took 2.3 s on the loaded 2-core machine: a 2 s budget turned that into a cascade of failovers.
    request_timeout: float = 5.0
    health_interval: float = 0.5       # the pool's health checks (they detect the memory ceiling)
    memory_limit_mb: int = 1536        # per browser; exhaust_memory pushes the browser over it
    overhead_levels: tuple[str, ...] = OVERHEAD_LEVELS
    overhead_requests: int = 200       # per level, sequential; the same number again with 4 in flight
    concurrency: int = 4
    vanished_node: bool = True         # the multi-node scenario (~3 min): a node removed under load
    # A one-sentence request right after a SIGKILL of the serving browser, vs the same with no fault (level
    # high, failover: what a client notices of a failover to the warm standby).
    after_kill_trials: int = 10
    quick: bool = False

    def __post_init__(self) -> None:
        for name, values, allowed in (("faults", self.faults, FAULTS), ("strategies", self.strategies, STRATEGIES),
                                      ("levels", self.levels, LEVELS),
                                      ("overhead_levels", self.overhead_levels, OVERHEAD_LEVELS)):
            bad = [v for v in values if v not in allowed]
            if bad:
                raise InputError(name, f"unknown {bad}; choose from {list(allowed)}")
        for name in ("trials", "batch", "baseline_kill_trials", "overhead_requests", "concurrency"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(name, f"must be an int >= 1, got {value!r}")
        if not isinstance(self.after_kill_trials, int) or self.after_kill_trials < 0:
            raise InputError("after_kill_trials", f"must be an int >= 0, got {self.after_kill_trials!r}")
        if not isinstance(self.baseline_other_trials, int) or self.baseline_other_trials < 0:
            raise InputError("baseline_other_trials", f"must be an int >= 0, got {self.baseline_other_trials!r}")
        for name in ("zombie_wait_s", "request_timeout", "health_interval"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise InputError(name, f"must be a positive number of seconds, got {value!r}")
        if not isinstance(self.memory_limit_mb, int) or self.memory_limit_mb < 256:
            raise InputError("memory_limit_mb", f"must be an int >= 256, got {self.memory_limit_mb!r}")


QUICK = Config(faults=("kill_actor", "disconnect"), strategies=("failover",), levels=("high",),
               trials=1, batch=16, baseline_kill_trials=1, baseline_other_trials=1, zombie_wait_s=3.0,
               overhead_levels=("none", "medium"), overhead_requests=10, vanished_node=False, after_kill_trials=1,
               quick=True)


@dataclasses.dataclass(frozen=True)
class Workload:
    """The trial request and its float64 numpy reference (every answer is checked against it)."""

    texts: list[str]
    reference: np.ndarray

    @classmethod
    def of(cls, batch: int) -> Workload:
        from sharding.models import minilm

        texts = trial_texts(batch)
        return cls(texts, minilm.reference_embed(texts))


# ----- pure helpers: statistics, event-log arithmetic, pool shape --------------------------------------------
def trial_latencies(events: Sequence[dict[str, Any]], browser_id: str, fault_ts: float) -> dict[str, Any]:
    """Detection and recovery latency of one fault from the event log (the pool's ``recent_events`` shape).

    ``events`` are the records after the fault; ``fault_ts`` is the wall-clock time (``time.time``) the
    fault was injected. Detection: fault -> the browser's first BrowserFailed. Recovery: that BrowserFailed
    -> the first RecoveryCompleted for the browser after it (successful or not: ``recovery_success`` says).
    Rerun start: fault -> the first OperationStarted after that recovery (the work starting again: what
    the fault cost before the request runs anew, without the rerun's own time).
    """
    evs = sorted(events, key=lambda e: e["seq"])
    failed = [e for e in evs if e["action"] == "BrowserFailed" and e["data"]["browser_id"] == browser_id]
    out: dict[str, Any] = {"detected": bool(failed), "detection_ms": None, "category": None,
                           "recovery_ms": None, "recovery_success": None, "recovery_steps": [], "winning_step": None,
                           "replacement": None, "failures_recorded": len(failed), "rerun_start_ms": None}
    if not failed:
        return out
    first = failed[0]
    out["detection_ms"] = (first["timestamp"] - fault_ts) * 1000
    out["category"] = first["data"]["category"]
    completed = [e for e in evs if e["action"] == "RecoveryCompleted" and e["data"]["browser_id"] == browser_id
                 and e["seq"] > first["seq"]]
    if not completed:
        return out
    done = completed[0]
    recovery_id = done["data"]["recovery_id"]
    steps = [e["data"] for e in evs
             if e["action"] == "RecoveryStepFinished" and e["data"]["recovery_id"] == recovery_id]
    out.update(recovery_ms=(done["timestamp"] - first["timestamp"]) * 1000, recovery_success=done["data"]["success"],
               replacement=done["data"]["replacement"],
               recovery_steps=[{"step": s["step"], "success": s["success"], "ms": s["duration_ms"]} for s in steps],
               winning_step=next((s["step"] for s in steps if s["success"]), None))
    rerun = next((e for e in evs if e["action"] == "OperationStarted" and e["seq"] > done["seq"]), None)
    if rerun is not None:
        out["rerun_start_ms"] = (rerun["timestamp"] - fault_ts) * 1000
    return out


def event_trace(events: Sequence[dict[str, Any]], fault_ts: float) -> list[str]:
    """The trial's events in one line each, timed from the fault: what the pool did, for reading later."""
    keys = ("category", "strategy", "step", "success", "replacement", "standby", "model", "reason")
    lines = []
    for e in sorted(events, key=lambda e: e["seq"]):
        data = e["data"]
        detail = " ".join(f"{k}={data[k]}" for k in keys if data.get(k) is not None)
        who = data.get("browser_id") or e["subject"]
        lines.append(f"{(e['timestamp'] - fault_ts) * 1000:+.0f}ms {e['action']} {who} {detail}".rstrip())
    return lines


def recovery_settled(events: Sequence[dict[str, Any]], browser_id: str) -> bool:
    """The browser's first failure after the fault has a RecoveryCompleted (the pool finished with it)."""
    lat = trial_latencies(events, browser_id, 0.0)
    return lat["detected"] and lat["recovery_success"] is not None


def pool_not_ready(state: PoolState, model: str, standby_wanted: int) -> str | None:
    """Why the pool is not (yet) in its steady shape for a trial, or None when it is.

    Steady: nothing recovering or running, at least one serving browser, every live browser holding the
    model (none half-launched), and at level high ``standby_wanted`` spares that have warmed the model up.
    """
    if state.recoveries:
        return f"{len(state.recoveries)} recovery(ies) running"
    if state.operations:
        return f"{len(state.operations)} operation(s) running"
    alive = browsers_alive(state)
    holding = {k[0] for k in state.models if k[1] == model}
    empty = [b.browser_id for b in alive if b.browser_id not in holding]
    if empty:
        return f"browser(s) {empty} hold no {model} yet"
    if not any(not b.standby for b in alive):
        return "no serving browser"
    warm = {k[0] for k, m in state.models.items() if k[1] == model and m.warmed_up}
    spares = sum(1 for b in alive if b.standby and b.browser_id in warm)
    if spares < standby_wanted:
        return f"{spares} of {standby_wanted} standby browser(s) warmed up"
    return None


def pool_unfit(state: PoolState, standby_wanted: int) -> str | None:
    """Why the pool should be replaced before the next trial (a trial left it in a state that would
    bias the next one or leak processes), or None.

    A browser left in status ``failed`` (recovery did not revive it, and nothing retired it) may keep its
    actor process; a browser with ``CIRCUIT_FAILURES`` failures would be failed over on its next one
    whatever the strategy; more than one extra live browser means trials keep adding browsers.
    """
    failed = [b.browser_id for b in state.browsers.values() if b.status == "failed"]
    if failed:
        return f"browser(s) {failed} left failed (not recovered, not retired)"
    alive = browsers_alive(state)
    worn = [b.browser_id for b in alive if b.failures >= CIRCUIT_FAILURES]
    if worn:
        return f"browser(s) {worn} failed {CIRCUIT_FAILURES}+ times: the next failure opens the circuit breaker"
    if len(alive) > 2 + standby_wanted:
        return f"{len(alive)} live browsers (expected <= {2 + standby_wanted})"
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _max_err(out: np.ndarray, reference: np.ndarray) -> float:
    out = np.asarray(out, dtype=np.float32)
    if out.shape != reference.shape:
        return math.inf
    return float(np.abs(out - reference).max())


def _fmt(s: dict[str, float] | None) -> str:
    return "—" if s is None else f"{s['median_ms']:.0f} / {s['p95_ms']:.0f}"


def _answer(ref: Any, reference: np.ndarray, t0: float, timeout: float = ANSWER_TIMEOUT,
            tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Wait for a request (at most ``timeout``); its return time (ms after ``t0``), correctness and how it was
    served."""
    import ray

    try:
        out = ray.get(ref, timeout=timeout)
    except Exception as exc:
        return {"ms": (time.perf_counter() - t0) * 1000, "correct": False, "recovered": False,
                "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    ms = (time.perf_counter() - t0) * 1000
    err = _max_err(out["embedding"], reference)
    return {"ms": ms, "correct": err <= tolerance, "max_abs_err": err, "recovered": bool(out.get("recovered")),
            "hedged": bool(out.get("hedge", {}).get("won")), "browser_id": out["browser_id"], "error": None}
