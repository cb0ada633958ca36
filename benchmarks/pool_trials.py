"""The recovery benchmark's pool side: a pool per (strategy, level) (``PoolSession``), settled between
trials and replaced when a trial leaves it unfit; one trial of a fault hitting a request in flight
(``pool_trial``), the request right after a SIGKILL (``after_kill_trial``), and every case of a run
(``run_pool_cases``)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.recovery_common import (
    AFTER_KILL_POOL,
    ANSWER_TIMEOUT,
    FAULT_BACKENDS,
    MODEL,
    OPEN_TIMEOUT,
    OVERHEAD_TEXT,
    TOLERANCE,
    WEBGPU_BATCH,
    WEBGPU_REQUEST_TIMEOUT,
    WEBGPU_TOLERANCE,
    Config,
    Workload,
    _answer,
    event_trace,
    pool_not_ready,
    pool_unfit,
    recovery_settled,
    trial_latencies,
)
from benchmarks.results import summary_ms
from events.state import PoolState, browsers_alive

log = logging.getLogger(__name__)

STEADY_WARM, STEADY_SAMPLES = 4, 5        # a new pool's requests before / for its steady request time
AFTER_KILL_NORMAL = 5                     # requests with no fault before each kill (their median is the base)
SETTLE_TIMEOUT = 120.0              # seconds for a pool to be back to its steady shape between trials


# ----- Ray and the pool -------------------------------------------------------------------------------------
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

    def __init__(self, strategy: str, level: str, cfg: Config, event_root: Path, work: Workload,
                 backend: str = "auto") -> None:
        self.strategy, self.level, self.cfg, self.event_root, self.work = strategy, level, cfg, event_root, work
        self.requested_backend = backend
        webgpu = backend == "webgpu"
        # WebGPU kernels (SwiftShader here) agree with the float64 reference to 1e-3, wasm to 1e-4.
        self.tolerance = WEBGPU_TOLERANCE if webgpu else TOLERANCE
        self.work = Workload.of(WEBGPU_BATCH) if webgpu else work
        self.request_timeout = max(cfg.request_timeout, WEBGPU_REQUEST_TIMEOUT) if webgpu else cfg.request_timeout
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
            max_connections=1, event_log=str(self.event_root / uuid.uuid4().hex[:8]), backend=self.requested_backend,
            request_timeout=self.request_timeout, health_interval=self.cfg.health_interval,
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


def spares_not_ready(pool: Any, state: PoolState) -> list[str]:
    """Browsers of a pool that keeps spare processes (actors/spare.py) whose spare is expected and not ready
    yet. A spare is prepared after its browser's first run; a standby that has only warmed up keeps none."""
    import ray

    if not dict(state.config).get("options", {}).get("spare_process", False):
        return []
    return [b for b, rep in ray.get(pool.health.remote()).items()
            if "error" not in rep and rep["spare_expected"] and not rep["spare_ready"]]


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
            # A pool whose browsers keep spare processes is steady once every spare it expects is ready.
            waiting = spares_not_ready(pool, state)
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
    answers = [_answer(ref, reference, t0, tolerance=session.tolerance)]
    # The request in flight came back untouched (the fault landed after it, or breaks no request): the
    # client's next request, sent at once, is the one that meets it.
    if answers[0]["correct"] and not (answers[0]["recovered"] or answers[0]["hedged"]) and inject_error is None:
        answers.append(_answer(pool.infer.remote(MODEL, {"texts": work.texts}), reference, t0,
                               tolerance=session.tolerance))
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
    verify = _answer(pool.infer.remote(MODEL, {"texts": work.texts}), reference, time.perf_counter(),
                     tolerance=session.tolerance)
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


def session_groups(faults: Sequence[str], with_after_kill: bool) -> list[tuple[str, list[str]]]:
    """The pools a (strategy, level) needs, as (backend, its faults): a fault whose subject is one backend
    (``FAULT_BACKENDS``: the GPU process serves only WebGPU) gets a pool on that backend; the rest share one
    on the default backend, which the after-kill trials also use."""
    groups: dict[str, list[str]] = {"auto": []} if with_after_kill else {}
    for fault in faults:
        groups.setdefault(FAULT_BACKENDS.get(fault, "auto"), []).append(fault)
    return [(backend, fs) for backend, fs in groups.items() if fs or backend == "auto"]


def run_pool_cases(cfg: Config, work: Workload, event_root: Path, advance: Callable[[str], None],
                   cases: list[dict[str, Any]], sessions: dict[str, Any], checkpoint: Callable[[], None],
                   after_kill: dict[str, Any]) -> None:
    """Every (strategy, level) pool through every fault; appends to ``cases`` and ``sessions`` as it goes.
    The (failover, high) pool then runs the after-kill trials into ``after_kill``."""
    for strategy in cfg.strategies:
        for level in cfg.levels:
            wants_after_kill = (strategy, level) == AFTER_KILL_POOL and bool(cfg.after_kill_trials)
            for backend, faults in session_groups(cfg.faults, wants_after_kill):
                run_session_cases(PoolSession(strategy, level, cfg, event_root, work, backend), faults,
                                  wants_after_kill and backend == "auto", advance, cases, sessions, checkpoint,
                                  after_kill)


def run_session_cases(session: PoolSession, faults: list[str], with_after_kill: bool, advance: Callable[[str], None],
                      cases: list[dict[str, Any]], sessions: dict[str, Any], checkpoint: Callable[[], None],
                      after_kill: dict[str, Any]) -> None:
    """One pool through ``faults`` (and the after-kill trials): its cases appended to ``cases``."""
    strategy, level, cfg = session.strategy, session.level, session.cfg
    error: str | None = None
    try:
        session.open()
    except Exception as exc:     # a pool that cannot open spoils its cases, not the whole run
        error = str(exc)[:1500]
        log.warning("pool did not open", extra={"strategy": strategy, "level": level, "error": error})
    try:
        for fault in faults:
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
                              "summary": summarize_case([]), "note": f"not measured: {error}", "trials": []})
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
        if with_after_kill:
            if error is None:
                after_kill.update(run_after_kill(session, advance))
            else:
                for _ in range(cfg.after_kill_trials):
                    advance("one sentence right after a SIGKILL (not measured)")
                after_kill.update({"error": error})
            checkpoint()
    finally:
        name = f"{strategy}/{level}" + ("" if session.requested_backend == "auto" else f"/{session.requested_backend}")
        sessions[name] = {"pool_replacements": session.replacements,
                          "steady_request": summary_ms(session.steady_request_ms), "error": error}
        session.close()
