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
  to result can then come before the detection. Faults that break no request (a memory ceiling crossed;
  the GPU process on wasm) have no time to result: their detection and recovery are still measured.

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
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import platform
import secrets
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks.results import results_dir, summary_ms, write_json
from events.errors import InputError
from events.state import PoolState, browsers_alive
from webpool.helptext import plain

log = logging.getLogger(__name__)

MODEL = "all-minilm-l6-v2"
TOLERANCE = 1e-4                    # max abs error of an embedding vs the float64 numpy reference
FAULTS = ("crash_page", "kill_renderer", "kill_browser", "kill_actor", "disconnect", "hang", "exhaust_memory",
          "kill_gpu")
STRATEGIES = ("reconnect", "restart", "failover", "progressive", "parallel")
LEVELS = ("medium", "high")
OVERHEAD_LEVELS = ("none", "medium", "high", "critical")
NOT_MEASURED: dict[str, str] = {}
# The vanished node is measured on a real multi-node cluster on this machine, by the cluster tests' own
# scenario script (a process of its own: one process joins one Ray cluster).
CLUSTER_SCENARIOS = Path(__file__).resolve().parent.parent / "tests" / "cluster_scenarios.py"
OVERHEAD_TEXT = "A man is eating food."
STEADY_WARM, STEADY_SAMPLES = 4, 5        # a new pool's requests before / for its steady request time
AFTER_KILL_POOL = ("failover", "high")    # the pool the after-kill trials run on
AFTER_KILL_NORMAL = 5                     # requests with no fault before each kill (their median is the base)
ANSWER_TIMEOUT = 120.0              # seconds a single request may take before the trial counts as failed
WATCHFUL_WAIT_S = 60.0              # the careful Ray actor's restart and re-run: ~5 s here; more is "never"
OPEN_TIMEOUT = 300.0                # a new pool's first request: launch + model load (the pool allows 180 s to load)
SETTLE_TIMEOUT = 120.0              # seconds for a pool to be back to its steady shape between trials
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


def baseline_verdict(answered: bool, errors: int, kind: str, waited_s: float) -> str:
    """The baseline's outcome in words, for faults where it may never answer.

    Answered at the first call with no error: the fault did not break it (no memory ceiling; the GPU
    process on wasm), which is no recovery and gets no ratio.
    """
    if answered:
        return "unaffected (answered at once, no error)" if errors == 0 else "answered"
    return f"never ({kind}; waited {waited_s:g} s)"


VANISHED_NODE_SETUP = ("ray.cluster_utils.Cluster of a head and four workers on this machine, Ray's default settings; "
                       "pool at level high (progressive, 1 standby) pinned to the head; the node of a serving browser "
                       "removed without notice, its processes frozen (calls to it hang, as across a lost network), "
                       "with 24 requests in flight (12 answered before)")


def vanished_node_trial(observed: dict[str, Any]) -> dict[str, Any]:
    """One node-loss run, from the cluster scenario's observations: every answer's correctness, the time to
    result of the requests in flight when the node went (sent before, answered after its removal), when the
    lost browsers were failed and by what (the pool's probes, or Ray's verdict on the node), and when Ray
    declared the node dead."""
    removed = observed.get("node_removed_ts")
    answers = observed.get("node_loss_answers") or []
    met = [a for a in answers if removed is not None and a.get("sent_ts", removed) < removed < a.get("done_ts", 0)]
    victims = set(observed.get("node_loss_victim_browsers") or [])
    failed = [f for f in observed.get("node_loss_failed") or [] if f["browser_id"] in victims]
    return {
        "requests": len(answers), "all_correct": bool(answers) and all(a["correct"] for a in answers),
        "in_flight_ms": [(a["done_ts"] - removed) * 1000 for a in met if a["correct"]],
        "failed_after_s": min((f["after_s"] for f in failed), default=None),
        "found_by": sorted({"probe" if "no probe" in f["error"] else "node verdict" if "left the cluster" in f["error"]
                            else "a call" for f in failed}),
        "ray_declared_dead_s": observed.get("node_declared_dead_s"),
        "error": (observed.get("errors") or {}).get("node_loss") or (observed.get("errors") or {}).get("placement"),
    }


def vanished_node_result(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The node-loss trials together; none dropped (a trial that failed is counted and its error kept)."""
    ok = [t for t in trials if not t["error"]]
    return {
        "setup": VANISHED_NODE_SETUP, "trials": len(trials), "trials_failed": len(trials) - len(ok),
        "errors": [t["error"][-300:] for t in trials if t["error"]],
        "requests": sum(t["requests"] for t in ok), "all_correct": bool(ok) and all(t["all_correct"] for t in ok),
        "in_flight_at_loss": sum(len(t["in_flight_ms"]) for t in ok),
        "time_to_result": summary_ms([ms for t in ok for ms in t["in_flight_ms"]]),
        "last_answer": summary_ms([max(t["in_flight_ms"]) for t in ok if t["in_flight_ms"]]),
        "failed_after": summary_ms([t["failed_after_s"] * 1000 for t in ok if t["failed_after_s"] is not None]),
        "found_by": {k: sum(k in t["found_by"] for t in ok) for k in ("probe", "node verdict", "a call")},
        "ray_declared_dead": summary_ms([t["ray_declared_dead_s"] * 1000 for t in ok
                                         if t["ray_declared_dead_s"] is not None]),
        "per_trial": trials,
    }


def vanished_node_line(v: dict[str, Any]) -> str:
    return (f"A node vanishing under load ({v['setup']}; {v['trials']} trials, {v['trials_failed']} failed): "
            f"{v['requests']} requests, all correct: {'yes' if v['all_correct'] else 'NO'}; the lost browser was "
            f"failed {_fmt(v['failed_after'])} ms (p50 / p95) after the removal (found by the probes in "
            f"{v['found_by']['probe']} of {v['trials'] - v['trials_failed']} trials), while Ray declared the node "
            f"dead after {_fmt(v['ray_declared_dead'])} ms; the {v['in_flight_at_loss']} requests in flight were "
            f"answered {_fmt(v['time_to_result'])} ms after the removal, the last of each trial "
            f"{_fmt(v['last_answer'])} ms.")


def run_vanished_node(temp: Path, trials: int = 1) -> dict[str, Any]:
    """``trials`` runs of the cluster scenarios' node loss, each on a fresh cluster."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    results = []
    for i in range(trials):
        out = temp / f"cluster-{i}.json"
        done = subprocess.run([sys.executable, str(CLUSTER_SCENARIOS), str(out), "placement", "node_loss"],
                              capture_output=True, text=True, timeout=1500, env=env)
        if not out.exists():
            error = f"the cluster scenarios wrote nothing (rc {done.returncode}): {done.stderr[-500:]}"
            results.append({"requests": 0, "all_correct": False, "in_flight_ms": [], "failed_after_s": None,
                            "found_by": [], "ray_declared_dead_s": None, "error": error})
        else:
            results.append(vanished_node_trial(orjson.loads(out.read_bytes())))
    return vanished_node_result(results)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ----- Ray and the pool -------------------------------------------------------------------------------------
def _start_ray(temp: Path) -> bool:
    """Start an embedded Ray unless one is running (tests share theirs). Returns True if we started it."""
    # Ray reads its auth settings when first imported: decide them before that import.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    import ray

    if ray.is_initialized():
        return False
    ray.init(include_dashboard=False, _temp_dir=str(temp / "ray"), log_to_driver=False)
    return True


def _max_err(out: np.ndarray, reference: np.ndarray) -> float:
    out = np.asarray(out, dtype=np.float32)
    if out.shape != reference.shape:
        return math.inf
    return float(np.abs(out - reference).max())


def _events_since(pool: Any, seq: int) -> list[dict[str, Any]]:
    import ray

    n = 200
    while True:
        evs = ray.get(pool.recent_events.remote(n))
        if not evs or len(evs) < n or min(e["seq"] for e in evs) <= seq + 1:
            return sorted((e for e in evs if e["seq"] > seq), key=lambda e: e["seq"])
        n *= 4


def _last_seq(pool: Any) -> int:
    import ray

    evs = ray.get(pool.recent_events.remote(1))
    return evs[-1]["seq"] if evs else 0


class PoolSession:
    """One pool for a (strategy, level), replaced when a trial leaves it unfit; counts replacements."""

    def __init__(self, strategy: str, level: str, cfg: Config, event_root: Path, work: Workload) -> None:
        self.strategy, self.level, self.cfg, self.event_root, self.work = strategy, level, cfg, event_root, work
        self.standby_wanted = 1 if level == "high" else 0
        # A parallel recovery launches a fresh browser in the background that the log shows only once
        # it is up: give it time to appear before calling the pool settled.
        self.quiet_s = 3.0 if strategy == "parallel" else 0.5
        self.pool: Any = None
        self.replacements: list[str] = []
        self.backend: str | None = None
        self.steady_request_ms: list[float] = []     # the trial's batch with no fault, for reading TTRs
        self.broken: str | None = None                # why the last trial left the pool unusable

    def open(self) -> None:
        import ray

        from webpool import ResourcePool

        ft = {"level": self.level, "recovery_strategy": self.strategy}
        if self.level == "high":
            ft["standby_browsers"] = self.standby_wanted
        self.pool = ResourcePool.remote(
            max_connections=1, event_log=str(self.event_root / uuid.uuid4().hex[:8]),
            request_timeout=self.cfg.request_timeout, health_interval=self.cfg.health_interval,
            memory_limit_mb=self.cfg.memory_limit_mb, fault_tolerance=ft)
        try:
            first = ray.get(self.pool.infer.remote(MODEL, {"texts": self.work.texts}), timeout=OPEN_TIMEOUT)
            settle(self.pool, self.standby_wanted, self.quiet_s)
        except Exception as exc:
            # Say where it got stuck (the pool's own log), then give the pool up.
            try:
                trace = event_trace(_events_since(self.pool, 0)[-10:], time.time())
            except Exception:
                trace = ["(event log unreadable)"]
            self.close()
            raise RuntimeError(f"pool {self.strategy}/{self.level} did not open: {type(exc).__name__}: "
                               f"{str(exc)[:200]}; last events: {trace}") from exc
        self.backend = first["backend"]
        # The serving browser's first runs are on V8's baseline code: the steady time is taken after
        # STEADY_WARM requests, as the median of STEADY_SAMPLES.
        for _ in range(STEADY_WARM):
            ray.get(self.pool.infer.remote(MODEL, {"texts": self.work.texts}), timeout=ANSWER_TIMEOUT)
        for _ in range(STEADY_SAMPLES):
            t0 = time.perf_counter()
            ray.get(self.pool.infer.remote(MODEL, {"texts": self.work.texts}), timeout=ANSWER_TIMEOUT)
            self.steady_request_ms.append((time.perf_counter() - t0) * 1000)

    def close(self) -> None:
        if self.pool is not None:
            close_pool(self.pool)
            self.pool = None

    def replace(self, reason: str) -> None:
        log.info("replacing pool", extra={"strategy": self.strategy, "level": self.level, "reason": reason})
        self.replacements.append(reason)
        self.close()
        self.open()

    def ready_for_next(self) -> None:
        """Before a trial: settle (at level high: the standby replenished); replace the pool if the last
        trial left it broken or unfit, or it cannot settle."""
        import ray

        if self.broken is not None:
            reason, self.broken = self.broken, None
            self.replace(reason)
            return
        try:
            state = settle(self.pool, self.standby_wanted, self.quiet_s)
        except TimeoutError as exc:
            self.replace(str(exc))
            return
        why = pool_unfit(state, self.standby_wanted)
        if why is None:
            # The log can look steady while a browser keeps failing its health check (e.g. still over its
            # memory ceiling after a reconnect): ask every browser now.
            sick = {b: rep["error"] for b, rep in ray.get(self.pool.health.remote()).items() if "error" in rep}
            if sick:
                why = f"browser(s) failing their health check: {sick}"
        if why is not None:
            self.replace(why[:500])


def settle(pool: Any, standby_wanted: int, quiet_s: float) -> PoolState:
    """Wait until the pool is in its steady shape and no event has arrived for ``quiet_s`` seconds."""
    import ray

    deadline = time.monotonic() + SETTLE_TIMEOUT
    last_seq, changed = -1, time.monotonic()
    while True:
        state = ray.get(pool.get_state.remote())
        now = time.monotonic()
        if state.last_seq != last_seq:
            last_seq, changed = state.last_seq, now
        why = pool_not_ready(state, MODEL, standby_wanted)
        if why is None and now - changed >= quiet_s:
            # A pool whose browsers keep a spare process (actors/spare.py) is steady once every spare is ready
            # (each is prepared after its browser's first run, and the pool has served one by now).
            keeps_spares = dict(state.config).get("options", {}).get("spare_process", False)
            waiting = [] if not keeps_spares else [
                b for b, rep in ray.get(pool.health.remote()).items() if "error" not in rep and not rep["spare_ready"]]
            if not waiting:
                return state
            why = f"spare process of {waiting} not ready"
        if now > deadline:
            raise TimeoutError(f"pool did not settle within {SETTLE_TIMEOUT:.0f} s: {why or 'events still coming'}")
        time.sleep(0.05)


def close_pool(pool: Any) -> None:
    import ray

    try:
        ray.get(pool.shutdown.remote(), timeout=60)
    except Exception as exc:     # a broken pool is killed below either way
        log.warning("pool shutdown failed", extra={"error": str(exc)})
    ray.kill(pool)


def _answer(ref: Any, reference: np.ndarray, t0: float, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
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
    return {"ms": ms, "correct": err <= TOLERANCE, "max_abs_err": err, "recovered": bool(out.get("recovered")),
            "hedged": bool(out.get("hedge", {}).get("won")), "browser_id": out["browser_id"], "error": None}


def _wait_in_flight(pool: Any, ref: Any, timeout: float = 30.0) -> str:
    """The browser running the request ``ref``, once the pool has recorded it as started."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ops = ray.get(pool.get_state.remote()).operations
        if ops:
            return next(iter(ops.values())).browser_id
        if ray.wait([ref], timeout=0)[0]:
            raise RuntimeError("the request finished before it was seen in flight (make the batch larger)")
        time.sleep(0.002)
    raise TimeoutError("the request never started")


def _fault_options(session: PoolSession, fault: str, browser_id: str) -> dict[str, Any]:
    """exhaust_memory: enough ballast to cross the browser's ceiling from where it is now."""
    import ray

    if fault != "exhaust_memory":
        return {}
    report = ray.get(session.pool.health.remote())[browser_id]
    if "memory_bytes" not in report:
        raise RuntimeError(f"browser {browser_id} fails its health check before the fault: {report}")
    used_mb = report["memory_bytes"] >> 20
    return {"mb": max(256, session.cfg.memory_limit_mb - used_mb + 256)}


def pool_trial(session: PoolSession, fault: str) -> dict[str, Any]:
    """One fault hitting a request in flight; see the module docstring for what is measured."""
    import ray

    pool, work = session.pool, session.work
    reference = work.reference
    seq0 = _last_seq(pool)
    state = ray.get(pool.get_state.remote())
    serving = [b.browser_id for b in browsers_alive(state) if not b.standby]
    options = _fault_options(session, fault, serving[0]) if serving else {}
    ref = pool.infer.remote(MODEL, {"texts": work.texts})
    browser_id = _wait_in_flight(pool, ref)
    t_call = time.perf_counter()
    inject_error = None
    try:
        ray.get(pool.inject_fault.remote(browser_id, fault, **options), timeout=60)
    except Exception as exc:
        inject_error = f"{type(exc).__name__}: {str(exc)[:300]}"
    # The fault's time is when the inject call returns: a kill is the last thing the call does (after a
    # PID lookup over CDP that takes 100+ ms on a loaded machine), Page.crash and the hang start then.
    # The reply's trip back (~1-5 ms) can make a detection latency slightly negative.
    fault_ts = time.time()
    t0 = time.perf_counter()
    inject_ms = (t0 - t_call) * 1000
    answers = [_answer(ref, reference, t0)]
    # The request in flight came back untouched (the fault landed after it, or breaks no request): the
    # client's next request, sent at once, is the one that meets it.
    if answers[0]["correct"] and not (answers[0]["recovered"] or answers[0]["hedged"]) and inject_error is None:
        answers.append(_answer(pool.infer.remote(MODEL, {"texts": work.texts}), reference, t0))
    # The request that met the fault: recovered and run again, or (level high) answered by its hedge.
    met = next((a for a in answers if a["recovered"] or a["hedged"]), None)

    # Faults that broke no request are found by health checks: give them time to show in the log.
    observe_until = time.monotonic() + max(3 * session.cfg.health_interval, 2.0)
    settle_until = time.monotonic() + SETTLE_TIMEOUT
    while True:
        events = _events_since(pool, seq0)
        lat = trial_latencies(events, browser_id, fault_ts)
        now = time.monotonic()
        if recovery_settled(events, browser_id) or (not lat["detected"] and now > observe_until) or now > settle_until:
            break
        time.sleep(0.05)

    # After the pool is done with the fault, it must answer correctly again (not timed).
    verify = _answer(pool.infer.remote(MODEL, {"texts": work.texts}), reference, time.perf_counter())
    if inject_error is not None:
        outcome = "not_injected"
    elif not all(a["correct"] for a in answers):
        outcome = "failed"
    elif met is not None:
        outcome = ("hedged" if met["hedged"] else "recovered") + (
            "_in_flight" if met is answers[0] else "_next_request")
    else:
        outcome = "requests_unaffected"
    return {
        "browser_id": browser_id, "fault_options": options, "inject_ms": inject_ms, "inject_error": inject_error,
        "outcome": outcome, "time_to_result_ms": met["ms"] if met is not None and met["correct"] else None,
        "in_flight": answers[0], "next_request": answers[1] if len(answers) > 1 else None,
        "verify_after": {k: verify[k] for k in ("correct", "error")},
        **lat,
        "trace": event_trace(_events_since(pool, seq0), fault_ts),
    }


def after_kill_trial(session: PoolSession, text_reference: np.ndarray) -> dict[str, Any]:
    """A one-sentence request sent as soon as ``kill_browser`` returns (SIGKILL of the serving browser), timed
    to its correct answer, against the median of ``AFTER_KILL_NORMAL`` of the same request just before."""
    import ray

    pool = session.pool
    normal = [_answer(pool.infer.remote(MODEL, {"texts": [OVERHEAD_TEXT]}), text_reference, time.perf_counter())
              for _ in range(AFTER_KILL_NORMAL)]
    if not all(a["correct"] for a in normal):
        raise RuntimeError(f"a request with no fault was answered wrongly: {normal}")
    state = ray.get(pool.get_state.remote())
    serving = [b.browser_id for b in browsers_alive(state) if not b.standby]
    spares = [b.browser_id for b in browsers_alive(state) if b.standby]
    seq0 = _last_seq(pool)
    ray.get(pool.inject_fault.remote(serving[0], "kill_browser"), timeout=60)
    fault_ts = time.time()
    answer = _answer(pool.infer.remote(MODEL, {"texts": [OVERHEAD_TEXT]}), text_reference, time.perf_counter())
    normal_ms = float(np.median([a["ms"] for a in normal]))
    return {"killed": serving[0], "standby": spares[0] if spares else None, "answered_by": answer.get("browser_id"),
            "correct": answer["correct"], "error": answer["error"], "normal_ms": normal_ms,
            "after_kill_ms": answer["ms"], "ratio": answer["ms"] / normal_ms,
            "trace": event_trace(_events_since(pool, seq0), fault_ts)}


def run_after_kill(session: PoolSession, advance: Callable[[str], None]) -> dict[str, Any]:
    """``after_kill_trials`` of ``after_kill_trial`` on a (failover, high) pool, each on a settled pool."""
    from sharding.models import minilm

    text_reference = minilm.reference_embed([OVERHEAD_TEXT])
    n = session.cfg.after_kill_trials
    trials: list[dict[str, Any]] = []
    for i in range(n):
        advance(f"one sentence right after a SIGKILL ({i + 1}/{n})")
        session.ready_for_next()
        try:
            trials.append(after_kill_trial(session, text_reference))
        except Exception as exc:     # counted, not dropped; the next trial gets a fresh pool
            log.warning("after-kill trial failed", extra={"error": str(exc)})
            trials.append({"correct": False, "error": f"{type(exc).__name__}: {exc}"[:500]})
            session.broken = f"after-kill trial failed: {str(exc)[:200]}"
    timed = [t for t in trials if t["correct"]]
    return {
        "trials": trials,
        "all_correct": len(timed) == len(trials),
        "answered_by_standby": sum(1 for t in timed if t["answered_by"] == t["standby"]),
        "normal": summary_ms([t["normal_ms"] for t in timed]),
        "after_kill": summary_ms([t["after_kill_ms"] for t in timed]),
        "ratio_median": float(np.median([t["ratio"] for t in timed])) if timed else None,
        "ratio_p95": float(np.percentile([t["ratio"] for t in timed], 95)) if timed else None,
    }


def summarize_case(trials: list[dict[str, Any]]) -> dict[str, Any]:
    outcomes: dict[str, int] = {}
    for t in trials:
        outcomes[t["outcome"]] = outcomes.get(t["outcome"], 0) + 1
    recovered = [t for t in trials if t["recovery_success"] is not None]
    return {
        "trials": len(trials),
        "outcomes": outcomes,
        "detection": summary_ms([t["detection_ms"] for t in trials if t["detection_ms"] is not None]),
        "recovery": summary_ms([t["recovery_ms"] for t in recovered if t["recovery_success"]]),
        "rerun_start": summary_ms([t["rerun_start_ms"] for t in trials if t.get("rerun_start_ms") is not None]),
        "time_to_result": summary_ms([t["time_to_result_ms"] for t in trials if t["time_to_result_ms"] is not None]),
        "recovery_successes": sum(1 for t in recovered if t["recovery_success"]),
        "recovery_failures": sum(1 for t in recovered if not t["recovery_success"]),
        "categories": sorted({t["category"] for t in trials if t["category"]}),
        "winning_steps": sorted({t["winning_step"] for t in trials if t["winning_step"]}),
        "all_answers_correct": all(t["in_flight"]["correct"] and (t["next_request"] or {"correct": True})["correct"]
                                   and t["verify_after"]["correct"] for t in trials) if trials else None,
    }


def case_note(fault: str, trials: list[dict[str, Any]], backend: str | None) -> str | None:
    if trials and trials[0]["outcome"] == "not_injected":
        return f"fault could not be injected: {trials[0]['inject_error']}"
    if trials and all(t["outcome"] == "requests_unaffected" and not t["detected"] for t in trials):
        if fault == "kill_gpu":
            return f"no effect on {backend}: requests answered correctly and no failure was recorded"
        return "no effect: requests answered correctly and no failure was recorded"
    if any(t["outcome"] == "requests_unaffected" for t in trials):
        return "requests kept answering correctly; the failure was found by a health check (no time to result)"
    return None


def _failed_trial(exc: Exception) -> dict[str, Any]:
    return {"outcome": "failed", "error": f"{type(exc).__name__}: {exc}"[:500], "time_to_result_ms": None,
            "detection_ms": None, "recovery_ms": None, "recovery_success": None, "detected": False,
            "category": None, "winning_step": None, "in_flight": {"correct": False}, "next_request": None,
            "verify_after": {"correct": False}}


def run_fault(session: PoolSession, fault: str, advance: Callable[[str], None]) -> list[dict[str, Any]]:
    """N trials of one fault on one (strategy, level) pool."""
    n = session.cfg.trials
    name = f"{fault} / {session.strategy} / {session.level}"
    trials: list[dict[str, Any]] = []
    for i in range(n):
        advance(f"{name} ({i + 1}/{n})")
        session.ready_for_next()
        try:
            trial = pool_trial(session, fault)
        except Exception as exc:     # one broken trial is recorded, the run goes on on a fresh pool
            log.warning("trial failed", extra={"fault": fault, "error": str(exc)})
            trial = _failed_trial(exc)
            session.broken = f"trial failed: {trial['error'][:200]}"
        trials.append(trial)
        # A fault that did nothing once will do nothing again: do not repeat it N times.
        if trial["outcome"] == "not_injected" or (trial["outcome"] == "requests_unaffected"
                                                  and not trial["detected"]):
            for _ in range(n - i - 1):
                advance(f"{name} (no effect: not repeated)")
            break
    return trials


def run_pool_cases(cfg: Config, work: Workload, event_root: Path, advance: Callable[[str], None],
                   cases: list[dict[str, Any]], sessions: dict[str, Any], checkpoint: Callable[[], None],
                   after_kill: dict[str, Any]) -> None:
    """Every (strategy, level) pool through every fault; appends to ``cases`` and ``sessions`` as it goes.
    The (failover, high) pool then runs the after-kill trials into ``after_kill``."""
    for strategy in cfg.strategies:
        for level in cfg.levels:
            session = PoolSession(strategy, level, cfg, event_root, work)
            error: str | None = None
            try:
                session.open()
            except Exception as exc:     # a pool that cannot open spoils its cases, not the whole run
                error = str(exc)[:1500]
                log.warning("pool did not open", extra={"strategy": strategy, "level": level, "error": error})
            try:
                for fault in cfg.faults:
                    trials: list[dict[str, Any]] = []
                    if error is None:
                        try:
                            trials = run_fault(session, fault, advance)
                        except Exception as exc:     # a replacement pool that cannot open
                            error = f"{type(exc).__name__}: {str(exc)[:1500]}"
                    if error is not None and not trials:
                        for _ in range(cfg.trials):
                            advance(f"{fault} / {strategy} / {level} (not measured)")
                        cases.append({"fault": fault, "strategy": strategy, "level": level, "backend": None,
                                      "summary": summarize_case([]), "note": f"not measured: {error}",
                                      "trials": []})
                        continue
                    case_summary = summarize_case(trials)
                    steady = summary_ms(session.steady_request_ms)
                    ttr = case_summary["time_to_result"]
                    # What a fault costs beyond running the request once (the in-flight batch runs again).
                    case_summary["steady_request"] = steady
                    case_summary["beyond_request_median_ms"] = (ttr["median_ms"] - steady["median_ms"]
                                                                if ttr and steady else None)
                    cases.append({"fault": fault, "strategy": strategy, "level": level, "backend": session.backend,
                                  "summary": case_summary, "note": case_note(fault, trials, session.backend),
                                  "trials": trials})
                    checkpoint()
                if (strategy, level) == AFTER_KILL_POOL and cfg.after_kill_trials:
                    if error is None:
                        after_kill.update(run_after_kill(session, advance))
                    else:
                        for _ in range(cfg.after_kill_trials):
                            advance("one sentence right after a SIGKILL (not measured)")
                        after_kill.update({"error": error})
                    checkpoint()
            finally:
                sessions[f"{strategy}/{level}"] = {"pool_replacements": session.replacements,
                                                   "steady_request": summary_ms(session.steady_request_ms),
                                                   "error": error}
                session.close()


# ----- the baseline: a plain Ray actor, what a Ray user writes today ---------------------------------------
class PlainBrowserActor:
    """One BrowserCore with MiniLM loaded in ``__init__``; Ray's restart options are its only fault tolerance.

    Ray runs ``__init__`` synchronously (inside a running loop of its own), so the actor drives the async
    BrowserCore on an event loop in a thread it owns; Playwright objects stay bound to that loop.
    """

    def __init__(self) -> None:
        from actors.browser import BrowserCore
        from sharding.models.registry import artifacts

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="browser-loop", daemon=True).start()
        [self.art] = artifacts(MODEL)
        self.core = BrowserCore(f"baseline-{os.getpid()}")
        self._call(self._start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _start(self) -> None:
        await self.core.start()
        await self.core.load_model(self.art.key, np.fromfile(self.art.path, np.uint8), self.art.sha256, "wasm")

    def embed(self, texts: list[str]) -> dict[str, Any]:
        from sharding.models import minilm

        out = self._call(self.core.run(self.art.key, minilm.tokenize(texts), fetch=["embedding"]))
        return {"embedding": out["outputs"]["embedding"], "browser_id": self.core.browser_id}

    def pid(self) -> int:
        return os.getpid()

    def inject(self, kind: str, mb: int = 256) -> dict[str, Any]:
        from actors.faults import inject_fault

        return self._call(inject_fault(self.core, kind, mb))

    def close(self) -> None:
        self._call(self.core.close())


class WatchfulBrowserActor(PlainBrowserActor):
    """What a careful Ray user writes: the plain actor, but it watches its browser and, on any sign that the
    browser is gone or stuck, ends its own process so that Ray restarts it (``max_restarts``, which re-runs
    ``__init__``: a new browser, the model loaded again) and runs the call again (``max_task_retries``).

    The signs are BrowserCore's own failure signals (the browser process's exit, the page's crash event, a
    lost CDP connection) and a deadline on every call (the pool's request budget). The process ends with
    ``os._exit``: ``ray.actor.exit_actor()`` is an intended exit, after which Ray does not restart the actor.
    """

    def __init__(self, deadline_s: float) -> None:
        super().__init__()
        self.deadline_s = deadline_s
        asyncio.run_coroutine_threadsafe(self._watch(), self.loop)

    async def _watch(self) -> None:
        while not await self.core.signal.wait(3600.0):
            pass
        os._exit(1)

    def embed(self, texts: list[str]) -> dict[str, Any]:
        from events.errors import BrowserFailure
        from sharding.models import minilm

        try:
            out = self._call(self.core.run(self.art.key, minilm.tokenize(texts), fetch=["embedding"],
                                           timeout=self.deadline_s))
        except BrowserFailure:
            os._exit(1)
        return {"embedding": out["outputs"]["embedding"], "browser_id": self.core.browser_id}


def _baseline_kill(actor: Any, work: Workload) -> dict[str, Any]:
    import ray

    pid = ray.get(actor.pid.remote())
    t0 = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    answer = _answer(actor.embed.remote(work.texts), work.reference, t0)
    new_pid = ray.get(actor.pid.remote()) if answer["correct"] else None
    return {"fault": "kill_actor", "answered": answer["correct"], "time_to_result_ms": answer["ms"] if answer["correct"]
            else None, "error": answer["error"], "restarted_pid_differs": new_pid is not None and new_pid != pid}


def _baseline_other(actor: Any, fault: str, cfg: Config, work: Workload) -> dict[str, Any]:
    """A browser-level fault: keep calling (as a client would, every 0.1 s after an error) until a correct
    answer or ``zombie_wait_s``."""
    import ray

    mb = cfg.memory_limit_mb // 2 + 256     # the baseline has no ceiling: this much ballast, as a leak would
    t0 = time.perf_counter()
    inject_error = None
    try:
        ray.get(actor.inject.remote(fault, mb), timeout=60)
    except Exception as exc:
        inject_error = f"{type(exc).__name__}: {str(exc)[:300]}"
    deadline = t0 + cfg.zombie_wait_s
    errors: dict[str, int] = {}
    ttr = None
    pending = None
    while time.perf_counter() < deadline and inject_error is None:
        pending = pending or actor.embed.remote(work.texts)
        try:
            out = ray.get(pending, timeout=max(0.0, deadline - time.perf_counter()))
        except ray.exceptions.GetTimeoutError:
            errors["no answer (call still running)"] = errors.get("no answer (call still running)", 0) + 1
            break
        except Exception as exc:
            cause = getattr(exc, "cause", None) or exc
            key = f"{type(cause).__name__}: {str(cause)[:120]}"
            errors[key] = errors.get(key, 0) + 1
            pending = None
            time.sleep(0.1)
            continue
        pending = None
        if _max_err(out["embedding"], work.reference) <= TOLERANCE:
            ttr = (time.perf_counter() - t0) * 1000
            break
        errors["wrong answer"] = errors.get("wrong answer", 0) + 1
    waited = (time.perf_counter() - t0)
    kind = "hang" if fault == "hang" else "zombie"
    return {"fault": fault, "answered": ttr is not None, "time_to_result_ms": ttr, "inject_error": inject_error,
            "waited_s": round(waited, 2), "errors": errors,
            "verdict": baseline_verdict(ttr is not None, sum(errors.values()), kind, cfg.zombie_wait_s)
            if inject_error is None
            else f"fault could not be injected: {inject_error}"}


def run_baseline(cfg: Config, work: Workload, advance: Callable[[str], None]) -> dict[str, Any]:
    """Kill trials each need a fresh actor (max_restarts=1 is spent by one kill); the restarted actor then
    serves one browser-level fault trial (Ray's restart budget plays no part in those)."""
    import ray

    Plain = ray.remote(max_restarts=1, max_task_retries=1, num_cpus=0)(PlainBrowserActor)
    kills = cfg.baseline_kill_trials if "kill_actor" in cfg.faults else 0
    others = [f for f in cfg.faults if f != "kill_actor" for _ in range(cfg.baseline_other_trials)]
    cold, kill_trials = [], []
    other_trials: dict[str, list[dict[str, Any]]] = {}
    errors: list[str] = []
    while (kills > 0 or others) and len(errors) < 3:
        t0 = time.perf_counter()
        actor = Plain.remote()
        try:
            ray.get(actor.pid.remote(), timeout=OPEN_TIMEOUT)
            cold.append((time.perf_counter() - t0) * 1000)
            warm = _answer(actor.embed.remote(work.texts), work.reference, time.perf_counter())
            if not warm["correct"]:
                raise RuntimeError(f"baseline actor answered wrongly before any fault: {warm}")
            healthy = True
            if kills > 0:
                advance(f"baseline kill_actor ({len(kill_trials) + 1}/{cfg.baseline_kill_trials})")
                kill_trials.append(_baseline_kill(actor, work))
                healthy = kill_trials[-1]["answered"]
                kills -= 1
            if others and healthy:
                fault = others.pop(0)
                advance(f"baseline {fault}")
                other_trials.setdefault(fault, []).append(_baseline_other(actor, fault, cfg, work))
        except Exception as exc:     # an actor that would not start: try another, at most 3 times in all
            errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            log.warning("baseline actor failed", extra={"error": errors[-1]})
        finally:
            ray.kill(actor, no_restart=True)
    faults: dict[str, Any] = {}
    if kill_trials:
        faults["kill_actor"] = {
            "measure": "SIGKILL of the actor process from the driver, then a call issued right after: time to "
                       "its correct answer (Ray restarts the actor and re-runs __init__)",
            "answered": sum(t["answered"] for t in kill_trials), "trials": kill_trials,
            "time_to_result": summary_ms([t["time_to_result_ms"] for t in kill_trials if t["answered"]]),
            "verdict": "answered" if all(t["answered"] for t in kill_trials) else "not always answered",
        }
    for fault, trials in other_trials.items():
        answered = [t for t in trials if t["answered"]]
        faults[fault] = {
            "measure": f"fault injected, then calls until a correct answer or {cfg.zombie_wait_s:g} s",
            "answered": len(answered), "trials": trials,
            "time_to_result": summary_ms([t["time_to_result_ms"] for t in answered]),
            "verdict": trials[0]["verdict"] if len({t["verdict"] for t in trials}) == 1 else "mixed",
        }
    return {"actor": "plain Ray actor owning BrowserCore + MiniLM (loaded in __init__), max_restarts=1, "
                     "max_task_retries=1, num_cpus=0",
            "cold_start": summary_ms(cold), "faults": faults, "errors": errors}


def _watchful_trial(actor: Any, fault: str, cfg: Config, work: Workload) -> dict[str, Any]:
    """The fault, then a call timed to its correct answer (Ray restarts the actor and re-runs the call)."""
    import ray

    pid = ray.get(actor.pid.remote(), timeout=OPEN_TIMEOUT)
    t0 = time.perf_counter()
    inject_error = None
    if fault == "kill_actor":
        os.kill(pid, signal.SIGKILL)
    else:
        try:     # not retried: run again on the restarted actor, it would break the new browser too
            ray.get(actor.inject.options(max_task_retries=0).remote(fault, cfg.memory_limit_mb // 2 + 256),
                    timeout=60)
        except ray.exceptions.RayActorError:
            pass     # the actor ended itself on the fault's signal while the injection returned
        except Exception as exc:
            inject_error = f"{type(exc).__name__}: {str(exc)[:300]}"
    answer = _answer(actor.embed.remote(work.texts), work.reference, t0, timeout=WATCHFUL_WAIT_S)
    new_pid = ray.get(actor.pid.remote(), timeout=OPEN_TIMEOUT) if answer["correct"] else None
    return {"fault": fault, "answered": answer["correct"],
            "time_to_result_ms": answer["ms"] if answer["correct"] else None, "error": answer["error"],
            "inject_error": inject_error, "restarted": new_pid is not None and new_pid != pid}


def run_watchful_baseline(cfg: Config, work: Workload, advance: Callable[[str], None]) -> dict[str, Any]:
    """The careful Ray actor (``WatchfulBrowserActor``) through every fault, ``baseline_kill_trials`` times
    each, one actor for all of them (it restarts as often as it must)."""
    import ray

    Watchful = ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)(WatchfulBrowserActor)
    faults: dict[str, Any] = {}
    errors: list[str] = []
    cold: list[float] = []
    t0 = time.perf_counter()
    actor = Watchful.remote(cfg.request_timeout)
    try:
        ray.get(actor.pid.remote(), timeout=OPEN_TIMEOUT)
        cold.append((time.perf_counter() - t0) * 1000)
        for fault in cfg.faults:
            trials = []
            for i in range(cfg.baseline_kill_trials):
                advance(f"careful Ray actor {fault} ({i + 1}/{cfg.baseline_kill_trials})")
                warm = _answer(actor.embed.remote(work.texts), work.reference, time.perf_counter(),
                               timeout=WATCHFUL_WAIT_S)
                if not warm["correct"]:
                    raise RuntimeError(f"the careful Ray actor answered wrongly before {fault}: {warm}")
                trials.append(_watchful_trial(actor, fault, cfg, work))
            answered = [t for t in trials if t["answered"]]
            faults[fault] = {
                "measure": f"fault injected, then a call timed to its correct answer (at most {WATCHFUL_WAIT_S:g} s)",
                "answered": len(answered), "trials": trials,
                "time_to_result": summary_ms([t["time_to_result_ms"] for t in answered]),
                "verdict": "answered" if len(answered) == len(trials) else
                           f"never (no correct answer within {WATCHFUL_WAIT_S:g} s)" if not answered else
                           "not always answered",
            }
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        log.warning("careful baseline actor failed", extra={"error": errors[-1]})
    finally:
        ray.kill(actor, no_restart=True)
    return {"actor": "careful Ray actor: the plain one, plus it ends its process on its browser's failure signals "
                     f"or a {cfg.request_timeout:g} s call deadline, so Ray restarts it (max_restarts=-1, "
                     "max_task_retries=-1, model reloaded in __init__)",
            "cold_start": summary_ms(cold), "faults": faults, "errors": errors}


def _baseline_ratios(cases: list[dict[str, Any]], baseline: dict[str, Any],
                     key: str = "vs_baseline") -> None:
    for case in cases:
        base = baseline["faults"].get(case["fault"])
        ttr = case["summary"]["time_to_result"]
        if base is None:
            case[key] = None
        elif base["verdict"] != "answered" or base["answered"] < len(base["trials"]):
            # Never answered (zombie, hang), or was never broken: no ratio, the verdict instead.
            case[key] = {"baseline": base["verdict"], "ratio_median": None}
        elif ttr is None:
            case[key] = {"baseline": "answered", "ratio_median": None}
        else:
            case[key] = {
                "baseline": "answered",
                "ratio_median": ratio(ttr["median_ms"], base["time_to_result"]["median_ms"]),
                "ratio_p95": ratio(ttr["p95_ms"], base["time_to_result"]["p95_ms"]),
                "times_faster_median": ratio(base["time_to_result"]["median_ms"], ttr["median_ms"]),
            }


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
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1m_before": round(os.getloadavg()[0], 2)},
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
    r["machine"]["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    r["duration_s"] = round(time.perf_counter() - t_run, 1)
    r["complete"] = True
    return r


# ----- output ---------------------------------------------------------------------------------------------------
def _fmt(s: dict[str, float] | None) -> str:
    return "—" if s is None else f"{s['median_ms']:.0f} / {s['p95_ms']:.0f}"


def print_tables(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:     # a log file or CI: do not squeeze the tables into 80 columns
        console = Console(width=200)
    m = r["machine"]
    t = Table(title=f"Recovery latency, median / p95 ms ({r['date']}, {m['cpus']} CPUs, load "
                    f"{m['load_average_1m_before']}→{m['load_average_1m_after']}{', quick' if r['quick'] else ''})")
    for col in ("fault", "strategy", "level", "n", "detect", "recover", "time to result", "TTR - request",
                "rerun starts", "vs careful Ray actor", "outcomes / note"):
        t.add_column(col)
    for c in r["cases"]:
        s = c["summary"]
        vs = c.get("vs_baseline")
        if vs is None:
            vs_text = ""
        elif vs["ratio_median"] is not None:
            rm = vs["ratio_median"]
            vs_text = f"{rm:.3f}x ({1 / rm:.1f}x faster)" if rm < 1 else f"{rm:.2f}x ({rm:.1f}x slower)"
        else:
            vs_text = f"baseline {vs['baseline']}"
        note = c["note"] or ", ".join(f"{k}:{v}" for k, v in s["outcomes"].items())
        beyond = s.get("beyond_request_median_ms")
        t.add_row(c["fault"], c["strategy"], c["level"], str(s["trials"]), _fmt(s["detection"]), _fmt(s["recovery"]),
                  _fmt(s["time_to_result"]), "—" if beyond is None else f"{beyond:.0f}", _fmt(s.get("rerun_start")),
                  vs_text, note)
    console.print(t)
    console.print(after_kill_line(r))

    for key in ("careful_baseline", "baseline"):
        base = r.get(key)
        if not base:
            continue
        b = Table(title=f"Ray baseline: {base['actor']}; cold start {_fmt(base['cold_start'])} ms")
        for col in ("fault", "trials", "time to result (median / p95 ms)", "verdict"):
            b.add_column(col)
        for fault, f in base["faults"].items():
            b.add_row(fault, str(len(f["trials"])), _fmt(f["time_to_result"]), f["verdict"])
        console.print(b)

    o = Table(title="Fault-tolerance overhead (single sentence; ratio vs level none)")
    for col in ("level", "browsers", "seq req/s", "seq median / p95 ms",
                f"{r['config']['concurrency']} in flight req/s", "conc median / p95 ms",
                "throughput vs none (seq / conc)"):
        o.add_column(col)
    for level, x in r["overhead"]["levels"].items():
        if "error" in x:
            o.add_row(level, "", "", x["error"][:80], "", "", "")
            continue
        vs = x["vs_none"]
        ratios = "" if vs is None else f"{vs['sequential']['throughput']:.2f} / {vs['concurrent']['throughput']:.2f}"
        o.add_row(level, str(x["browsers"]), f"{x['sequential']['requests_per_s']:.1f}",
                  _fmt(x["sequential"]["latency"]), f"{x['concurrent']['requests_per_s']:.1f}",
                  _fmt(x["concurrent"]["latency"]), ratios)
    console.print(o)
    for what, why in r["not_measured"].items():
        console.print(f"{what}: {why}")


def write_chart(r: dict[str, Any], path: Path) -> None:
    """Time to result per fault (groups) and strategy/level (bars), log scale; the two Ray baselines last in
    each group (the careful actor grey, the plain one black, where they answered; a hatched bar marked "never"
    where one gave no correct answer)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend to set, renders with Agg

    faults = list(dict.fromkeys(c["fault"] for c in r["cases"]))
    series = list(dict.fromkeys((c["strategy"], c["level"]) for c in r["cases"]))
    by = {(c["fault"], c["strategy"], c["level"]): c for c in r["cases"]}
    baselines = [(r[key], label, color) for key, label, color in (
        ("careful_baseline", "careful Ray actor (restarts itself)", "dimgray"),
        ("baseline", "plain Ray actor (max_restarts=1)", "black")) if r.get(key)]
    slots = len(series) + len(baselines)
    width = 0.8 / slots

    def x_of(group: int, slot: int) -> float:
        return group + (slot - (slots - 1) / 2) * width

    fig = Figure(figsize=(max(8.0, 0.35 * len(faults) * slots + 3), 5.5))
    ax = fig.subplots()
    ymax = 10.0
    for i, (strategy, level) in enumerate(series):
        xs, ys, hi = [], [], []
        for j, fault in enumerate(faults):
            s = by.get((fault, strategy, level), {}).get("summary", {}).get("time_to_result")
            if s:
                xs.append(x_of(j, i))
                ys.append(s["median_ms"])
                hi.append(s["p95_ms"] - s["median_ms"])
                ymax = max(ymax, s["p95_ms"])
        ax.bar(xs, ys, width, yerr=[[0.0] * len(hi), hi], capsize=2, label=f"{strategy} / {level}")
    never = []
    for k, (base, label, color) in enumerate(baselines):
        labelled = False
        for j, fault in enumerate(faults):
            x = x_of(j, len(series) + k)
            f = base["faults"].get(fault)
            if f is not None and f["verdict"] == "answered" and f["time_to_result"] is not None:
                ax.bar([x], [f["time_to_result"]["median_ms"]], width, color=color,
                       label=None if labelled else label)
                labelled = True
                ymax = max(ymax, f["time_to_result"]["median_ms"])
            elif f is not None:
                never.append((x, f["verdict"]))
    for j, fault in enumerate(faults):
        notes = [by[(fault, s, lv)]["note"] for s, lv in series if (fault, s, lv) in by]
        if notes and all(n and n.startswith("no effect") for n in notes):
            ax.text(j, 1.3, notes[0].split(":")[0], rotation=90, fontsize=7, va="bottom", ha="center")
    top = ymax * 3
    # A baseline that gave no correct answer is a hatched bar to the top of the chart, marked "never":
    # as visible as a bar, and not mistaken for a time.
    for k, (x, verdict) in enumerate(never):
        ax.bar([x], [top], width, facecolor="none", edgecolor="dimgray", hatch="///", linewidth=0.6,
               label="Ray baseline: no correct answer" if k == 0 else None)
        box = {"facecolor": "white", "edgecolor": "none", "pad": 1.0}
        ax.text(x, top / 1.3, "never", fontsize=8, va="top", ha="center", weight="bold", bbox=box)
        ax.text(x, 1.3, verdict[:40], rotation=90, fontsize=6, va="bottom", ha="center", bbox=box)
    ax.set_yscale("log")
    ax.set_ylim(1.0, top)
    ax.set_xlim(-0.5, len(faults) - 0.5)
    ax.set_xticks(range(len(faults)), faults, rotation=20)
    ax.set_ylabel("time to result, ms (median; whisker to p95)")
    m = r["machine"]
    ax.set_title(f"webpool: fault -> correct answer ({r['date'][:16]}, {m['cpus']} CPUs, load "
                 f"{m['load_average_1m_before']}{', quick' if r['quick'] else ''})", fontsize=10)
    # Below the axes: inside, it covered the first groups' "never" marks.
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def after_kill_line(r: dict[str, Any]) -> str:
    a = r.get("after_kill") or {}
    if not a:
        return "A request right after a SIGKILL: not measured in this run."
    if a.get("error") or a["after_kill"] is None:
        return f"A request right after a SIGKILL: not measured ({(a.get('error') or 'no correct answer')[:200]})."
    return (f"A one-sentence request sent right after a SIGKILL of the serving browser (level high, failover): "
            f"{_fmt(a['after_kill'])} ms (p50 / p95) against {_fmt(a['normal'])} ms with no fault; ratio "
            f"{a['ratio_median']:.2f}x p50, {a['ratio_p95']:.2f}x p95; {len(a['trials'])} trials, all correct: "
            f"{'yes' if a['all_correct'] else 'NO'}, {a['answered_by_standby']} answered by the standby.")


def markdown(r: dict[str, Any]) -> str:
    """The results as the README shows them: time to result per (fault, strategy, level), medians and p95,
    the Ray baseline, and the overhead ratios; with the date, the machine and its load."""
    m = r["machine"]
    lines = [f"Recovery latency, {r['date'][:16]} UTC, {m['cpus']} CPUs ({m['platform']}), load "
             f"{m['load_average_1m_before']}→{m['load_average_1m_after']}, {r['config']['trials']} trial(s) per case"
             f"{', quick' if r['quick'] else ''}; all answers checked against the numpy reference "
             f"(max abs error ≤ {r['config']['tolerance']:g}).", "",
             "| fault | strategy | level | time to result p50 / p95 ms | beyond the request p50 ms "
             "| rerun starts p50 / p95 ms | detect p50 ms | recover p50 ms | vs careful Ray actor | correct |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["cases"]:
        s = c["summary"]
        vs = c.get("vs_baseline")
        if vs is None:
            vs_text = ""
        elif vs.get("ratio_median") is not None:
            vs_text = f"{1 / vs['ratio_median']:.1f}x faster" if vs["ratio_median"] < 1 else \
                f"{vs['ratio_median']:.1f}x slower"
        else:
            vs_text = f"baseline {vs['baseline']}"
        detect = s["detection"]["median_ms"] if s["detection"] else None
        recover = s["recovery"]["median_ms"] if s["recovery"] else None
        ttr = _fmt(s["time_to_result"]) if s["time_to_result"] else (c["note"] or "—")
        beyond = s.get("beyond_request_median_ms")
        lines.append(f"| {c['fault']} | {c['strategy']} | {c['level']} | {ttr} | "
                     f"{'—' if beyond is None else f'{beyond:.0f}'} | {_fmt(s.get('rerun_start'))} | "
                     f"{'—' if detect is None else f'{detect:.0f}'} | {'—' if recover is None else f'{recover:.0f}'} | "
                     f"{vs_text} | {'yes' if s['all_answers_correct'] else 'NO'} |")
    lines += ["", after_kill_line(r)]
    v = r.get("vanished_node")
    if v and v.get("time_to_result"):
        lines += ["", vanished_node_line(v)]
    elif v:
        why = "; ".join(v.get("errors") or ["no trial"])
        lines += ["", f"A node vanishing under load: not measured ({why[:200]})."]
    for key in ("careful_baseline", "baseline"):
        b = r.get(key)
        if not b:
            continue
        lines += ["", f"Ray baseline ({b['actor']}):", ""]
        lines += [f"- {fault}: {_fmt(f['time_to_result'])} ms, {f['verdict']}" if f["time_to_result"]
                  else f"- {fault}: {f['verdict']}" for fault, f in b["faults"].items()]
    levels = r["overhead"]["levels"]
    if levels:
        lines += ["", "| level | req/s sequential | req/s 4 in flight | vs none (seq / conc) | hedges sent / won |",
                  "|---|---|---|---|---|"]
        for level, x in levels.items():
            if "error" in x:
                lines.append(f"| {level} | {x['error'][:60]} | | | |")
                continue
            vs = x.get("vs_none")
            seq, conc = x["sequential"], x["concurrent"]
            ratios = "" if vs is None else \
                f"{vs['sequential']['throughput']:.2f} / {vs['concurrent']['throughput']:.2f}"
            hedges = x.get("hedges") or {}
            lines.append(f"| {level} | {seq['requests_per_s']:.1f} | {conc['requests_per_s']:.1f} | {ratios} | "
                         f"{hedges.get('sent', 0)} / {hedges.get('won', 0)} |")
    return "\n".join(lines)


def rechart(json_path: Path) -> Path:
    """Draw the chart again from a saved JSON (no browsers needed)."""
    r = orjson.loads(json_path.read_bytes())
    out = json_path.with_suffix(".png")
    write_chart(r, out)
    return out


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
