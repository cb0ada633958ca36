"""Real faults in real browsers, hitting a request in flight; the request still returns the right answer.

Each case takes a pool at level medium with one recovery strategy (started for it, or left settled by the case
before it that asked for the same configuration: ``SharedPools``), sends a batch request long enough to be in
flight, injects a real fault (page crash, process kills, hang, dropped CDP connection, memory exhaustion, killed
actor) while it runs, and checks the answer against the numpy reference and the recovery in the event log.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import ray
from standby import warm_standby
from waiting import until

from actors import priority
from actors.decisions.recovery import FaultToleranceConfig, plan_steps
from events.errors import BrowserFailure, FailureCategory
from events.state import open_operations
from sharding.models import llama, llama_onnx, minilm
from webpool import ResourcePool

# Long enough to be in flight when the fault hits (~1 s on a quiet 2-core machine), well inside the
# request budget below even on a loaded one, so a slow answer is never mistaken for a hang.
TEXTS = [f"Sentence {i}: browsers crash, hang and disconnect, and the pool must not lose the work." * 2
         for i in range(24)]
REQUEST_TIMEOUT = 15.0
# A hang costs its request's whole budget before it is detected: the hang case's is shorter (still ~5x the
# request's own time on a quiet machine), so the suite does not wait out 15 s for it.
HANG_REQUEST_TIMEOUT = 8.0


@pytest.fixture(scope="module")
def reference():
    return minilm.reference_embed(TEXTS)


class SharedPools:
    """The pool of consecutive cases that ask for the same configuration: one start (~4 s and ~5 CPU-s here)
    instead of one per case. One pool is kept at a time (an idle pool still runs its health checks: with every
    configuration's pool kept until the module's end, its CPU time in the suite rose from 346 to 449 s), so the
    cases below are ordered to follow each other. A case gets the kept pool only if the case before left it
    settled (no operation open, no recovery under way, every browser serving or retired); otherwise a fresh one.
    Cases on a shared pool look only at what happened after they began (``seq``) and at deltas of the
    statistics, never at totals."""

    def __init__(self, folder) -> None:
        self.folder = folder
        self.started = 0
        self.kept: tuple[tuple, ray.actor.ActorHandle] | None = None

    def get(self, strategy: str, level: str, options: dict) -> ray.actor.ActorHandle:
        key = (strategy, level, tuple(sorted(options.items())))
        if self.kept is not None:
            kept_key, pool = self.kept
            if kept_key == key and _settled(ray.get(pool.get_state.remote())):
                return pool
            self.close()
        self.started += 1
        pool = ResourcePool.remote(max_connections=2, event_log=str(self.folder / f"events-{self.started}"),
                                   health_interval=0.5,
                                   fault_tolerance={"level": level, "recovery_strategy": strategy}, **options)
        self.kept = (key, pool)
        return pool

    def close(self) -> None:
        if self.kept is not None:
            _, pool = self.kept
            self.kept = None
            _shut_down(pool)      # each case checked its own operations ended (_since)


def _settled(state) -> bool:
    return (not open_operations(state) and not state.recoveries
            and all(b.status in ("launched", "connected", "retired") for b in state.browsers.values()))


def _shut_down(pool) -> None:
    ray.get(pool.shutdown.remote())
    ray.kill(pool)


@pytest.fixture(scope="module")
def pools(ray_local, tmp_path_factory):
    shared = SharedPools(tmp_path_factory.mktemp("fault-pools"))
    yield shared
    shared.close()


def _pool(pools: SharedPools, strategy: str, level: str = "medium", **options):
    """A pool of this configuration (shared with the other cases of it, see SharedPools), warm: the model is loaded
    on a browser before the fault; returns it and that browser."""
    # No spare process (actors/spare.py): each fault here meets the request sent right after the warm-up, before
    # a spare could be ready (one starts after 0.5 s without work), so a restart here is a cold one either way
    # and a spare would only burn the machine's two cores. A restart from the spare is proven by
    # tests/test_browser_actor.py and the demo's test; the chaos tests run with spares on.
    options.setdefault("spare_process", False)
    options.setdefault("request_timeout", REQUEST_TIMEOUT)
    pool = pools.get(strategy, level, options)
    first = ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": "warm up"}))
    return pool, first["browser_id"]


def _wait_in_flight(pool, timeout: float = 30.0) -> str:
    """The browser running the first operation in flight, once one is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running := open_operations(ray.get(pool.get_state.remote())):
            return running[0].browser_id
        time.sleep(0.005)
    raise AssertionError("the request never started")


def _finish(pool) -> dict:
    """The state and statistics of a pool of the case's own, then shut down."""
    state = ray.get(pool.get_state.remote())
    stats = ray.get(pool.get_recovery_statistics.remote())
    _shut_down(pool)
    assert open_operations(state) == [], "every started operation ends completed or failed"
    return {"state": state, "stats": stats}


def _since(pool, seq: int) -> list[dict]:
    """The pool's events after ``seq``; asserts that every operation started meanwhile has ended."""
    state = ray.get(pool.get_state.remote())
    assert open_operations(state) == [], "every started operation ends completed or failed"
    return [e for e in ray.get(pool.recent_events.remote(10_000)) if e["seq"] > seq]


def _last_seq(pool) -> int:
    return ray.get(pool.get_state.remote()).last_seq


# Each fault kind at least once and each strategy at least once, where it applies (the full matrix
# is what benchmarks/recovery_latency measures; the suite must stay well under CI's time budget).
CASES = [
    ("progressive", "crash_page"),
    ("progressive", "kill_renderer"),
    ("progressive", "kill_browser"),
    ("progressive", "kill_actor"),
    ("progressive", "hang"),
    ("restart", "crash_page"),
    ("failover", "kill_browser"),
    ("parallel", "kill_browser"),
    ("reconnect", "disconnect"),       # last: the reconnect cases after this test share its pool
]


# The category each fault must be read as (from its signal), and the steps each strategy may recover with.
CATEGORY_OF = {"crash_page": "crash", "kill_renderer": "crash", "kill_browser": "crash", "kill_actor": "crash",
               "hang": "timeout", "disconnect": "connection"}
STEPS_OF = {"progressive": {"reconnect", "restart", "failover"}, "reconnect": {"reconnect"},
            "restart": {"restart"}, "failover": {"failover"},
            "parallel": {"parallel:reconnect", "parallel:restart", "parallel:failover"}}


# The faults that act at once (a process killed, the CDP connection cut) strike the run in flight: its answer is
# a recovered one. Page.crash and a hang act only once the page's running task has ended (below).
STRIKES_IN_FLIGHT = {"kill_browser", "kill_renderer", "kill_actor", "disconnect"}


# The cases with a pool of their own come first; then those on SharedPools, ordered so that cases of one
# configuration follow each other, and the module ends (its last pool shut down) with the last of them.
def test_a_browser_that_dies_idle_is_recovered_on_its_own_signal(ray_local, tmp_path, reference):
    """SIGKILL of an idle browser, with no request and no health check due for a minute: the browser actor
    learns of the exit from the kernel (pidfd) and tells the pool, which records the failure and
    recovers at once; the next request finds a serving browser."""
    pool = ResourcePool.remote(max_connections=1, event_log=str(tmp_path / "events"), request_timeout=REQUEST_TIMEOUT,
                               health_interval=60.0, spare_process=False,      # the kill comes before one is ready
                               fault_tolerance={"level": "medium", "recovery_strategy": "restart"})
    browser_id = ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": "warm up"}))["browser_id"]
    ray.get(pool.inject_fault.remote(browser_id, "kill_browser"))
    deadline = time.monotonic() + 50           # well inside the health interval: no health pass has run
    while not [e for e in ray.get(pool.recent_events.remote(1000))
               if e["action"] == "RecoveryCompleted" and e["data"]["browser_id"] == browser_id]:
        assert time.monotonic() < deadline, "the pool never learned of the dead browser"
        time.sleep(0.05)
    events = ray.get(pool.recent_events.remote(1000))
    [failed] = [e["data"] for e in events if e["action"] == "BrowserFailed" and e["subject"] == browser_id]
    assert failed["category"] == "crash" and "exited" in failed["error"], failed
    assert not [e for e in events if e["action"] == "OperationFailed"], "no request met the dead browser"
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}))
    assert out["browser_id"] == browser_id and not out.get("recovered")      # restarted in place, before it
    assert np.abs(out["embedding"] - reference[:4]).max() <= 1e-4
    _finish(pool)


def test_a_browser_that_fails_more_often_than_max_recovery_attempts_is_failed_over_not_revived(
        ray_local, tmp_path, reference):
    """README: recovery is bounded by ``max_recovery_attempts``; a browser that failed more often than that
    (consecutive failures: an answered request resets them) is failed over, not revived. Two real SIGKILLs of
    the same idle browser with ``max_recovery_attempts=1``: the first is restarted in place, the second
    moves the model to another browser and retires this one."""
    pool = ResourcePool.remote(max_connections=2, event_log=str(tmp_path / "events"), request_timeout=REQUEST_TIMEOUT,
                               spare_process=False,
                               fault_tolerance={"level": "medium", "recovery_strategy": "restart",
                                                "max_recovery_attempts": 1})
    browser_id = ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": "warm up"}))["browser_id"]

    def recoveries_done() -> list[dict]:
        events = ray.get(pool.recent_events.remote(1000))
        return [e["subject"] for e in events if e["action"] == "RecoveryCompleted"
                and e["data"]["browser_id"] == browser_id]

    for kill in (1, 2):
        ray.get(pool.inject_fault.remote(browser_id, "kill_browser"))    # idle: the browser reports its death
        deadline = time.monotonic() + 60
        while len(recoveries_done()) < kill:
            assert time.monotonic() < deadline, f"recovery {kill} never completed"
            time.sleep(0.05)
    events = ray.get(pool.recent_events.remote(1000))
    first, second = recoveries_done()
    steps = {r: [(e["data"]["step"], e["data"]["success"]) for e in events
                 if e["action"] == "RecoveryStepFinished" and e["subject"] == r] for r in (first, second)}
    assert steps[first] == [("restart", True)], steps
    assert steps[second] == [("failover", True)], steps
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}), timeout=120)
    assert out["browser_id"] != browser_id and np.abs(out["embedding"] - reference[:4]).max() <= 1e-4
    done = _finish(pool)
    assert done["state"].browsers[browser_id].status == "retired", done["state"].browsers[browser_id]


def test_at_level_low_an_idle_browsers_dropped_connection_is_revived_at_once_and_a_dead_one_is_not(
        ray_local, tmp_path, reference):
    """README: recovery starts at once on the browser's own signal at levels low and up; at ``low`` it is a
    reconnect, which revives a dropped connection but not a dead process. No request and no health check
    due (a minute apart) between the faults and the recoveries."""
    pool = ResourcePool.remote(max_connections=2, event_log=str(tmp_path / "events"), request_timeout=REQUEST_TIMEOUT,
                               health_interval=60.0, spare_process=False, fault_tolerance={"level": "low"})
    browser_id = ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": "warm up"}))["browser_id"]

    def recovery_after(seq: int) -> tuple[dict, list[tuple[str, bool]]]:
        deadline = time.monotonic() + 50
        while True:
            events = ray.get(pool.recent_events.remote(1000))
            done = [e for e in events if e["action"] == "RecoveryCompleted" and e["seq"] > seq
                    and e["data"]["browser_id"] == browser_id]
            if done:
                steps = [(e["data"]["step"], e["data"]["success"]) for e in events
                         if e["action"] == "RecoveryStepFinished" and e["subject"] == done[0]["subject"]]
                return done[0]["data"], steps
            assert time.monotonic() < deadline, "no recovery followed the fault"
            time.sleep(0.05)

    seq = ray.get(pool.get_state.remote()).last_seq
    ray.get(pool.inject_fault.remote(browser_id, "disconnect"))
    completed, steps = recovery_after(seq)
    assert completed["success"] and steps == [("reconnect", True)], (completed, steps)
    assert not [e for e in ray.get(pool.recent_events.remote(1000))
                if e["seq"] > seq and e["action"] in ("OperationStarted", "ModelLoaded")], "it was the signal's"
    seq = ray.get(pool.get_state.remote()).last_seq
    ray.get(pool.inject_fault.remote(browser_id, "kill_browser"))
    completed, steps = recovery_after(seq)
    assert not completed["success"] and steps == [("reconnect", False)], (completed, steps)
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}), timeout=120)
    assert out["browser_id"] != browser_id and np.abs(out["embedding"] - reference[:4]).max() <= 1e-4
    done = _finish(pool)
    assert done["state"].browsers[browser_id].status in ("failed", "retired")


def test_critical_level_outvotes_a_corrupted_browser(ray_local, tmp_path, reference):
    pool = ResourcePool.remote(max_connections=3, event_log=str(tmp_path / "events"),
                               spare_process=False,      # the dissenter is quarantined, nothing is restarted
                               fault_tolerance={"level": "critical", "standby_browsers": 0})
    first = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:2]}))
    assert len(first["votes"]["agreeing"]) == 3
    bad = first["votes"]["agreeing"][1]
    ray.get(pool.inject_fault.remote(bad, "corrupt_output"))
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:2]}))
    assert np.abs(out["embedding"] - reference[:2]).max() <= 1e-4
    assert out["votes"]["dissenting"] == [bad]
    state = ray.get(pool.get_state.remote())
    assert state.browsers[bad].status == "quarantined"
    # A generation is voted the same way (tiny-llama: the vote is under test): three voters, one of them the
    # pool launches in the quarantined one's place; the one that then returns wrong logits is outvoted by its
    # tokens, quarantined, and the answer is the CPU reference's.
    model = llama.tiny_llama(seed=0)
    whole = llama_onnx.build_shards(model, [(0, model.config.n_layers)])
    agreed = ray.get(pool.generate.remote("tiny-llama", "hello votes", max_new_tokens=8))
    expected = llama_onnx.ort_greedy_generate(whole, agreed["prompt_token_ids"], 8)
    assert agreed["token_ids"] == expected and len(agreed["votes"]["agreeing"]) == 3, agreed["votes"]
    liar = agreed["votes"]["agreeing"][0]
    ray.get(pool.inject_fault.remote(liar, "corrupt_output"))
    out = ray.get(pool.generate.remote("tiny-llama", "hello votes", max_new_tokens=8))
    assert out["token_ids"] == expected and out["votes"]["dissenting"] == [liar], out["votes"]
    assert ray.get(pool.get_state.remote()).browsers[liar].status == "quarantined"
    _finish(pool)


def test_high_level_fails_over_to_a_warm_standby(ray_local, tmp_path, reference):
    pool = ResourcePool.remote(max_connections=1, event_log=str(tmp_path / "events"),
                               request_timeout=REQUEST_TIMEOUT,
                               fault_tolerance={"level": "high", "recovery_strategy": "failover",
                                                "standby_browsers": 1})
    first = ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": "warm"}))
    standby = warm_standby(pool)
    [warm_up] = [e for e in ray.get(pool.recent_events.remote(500))
                 if e["action"] == "ModelWarmedUp" and e["subject"] == standby]
    assert warm_up["data"]["rounds"] >= 1, warm_up
    # The standby was built in the background (actors/priority.py) for at most its bound, and serves at the
    # normal priority. The bound runs from the start's beginning (some time before BrowserLaunched), so the
    # standby's report says when it ends. On a loaded machine its start, load and warm-up can outlast it: then
    # it is back at the normal priority already. Close to the bound either may be read.
    standby_pid = ray.get(pool.get_state.remote()).browsers[standby].pid
    bound_ends = ray.get(pool.health.remote())[standby]["background_until"]
    if not priority.can_restore():
        assert bound_ends is None and priority.policies_of(standby_pid) == {os.SCHED_OTHER}
    elif bound_ends is not None and time.time() < bound_ends - 1.0:
        assert priority.policies_of(standby_pid) == {os.SCHED_IDLE}, bound_ends - time.time()
    ray.get(pool.inject_fault.remote(first["browser_id"], "kill_browser"))
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}))
    assert out["browser_id"] == standby and np.abs(out["embedding"] - reference[:4]).max() <= 1e-4
    until(lambda: priority.policies_of(standby_pid) == {os.SCHED_OTHER}, "the promoted standby's normal priority",
          30, 0.02)
    events = ray.get(pool.recent_events.remote(500))
    loads_on_standby = [e for e in events if e["action"] == "ModelLoaded" and e["subject"] == standby]
    assert len(loads_on_standby) == 1          # loaded while standby; the failover itself loaded nothing
    # ... so the whole recovery is one append: started, standby promoted, failed browser retired, step, completed
    # (consecutive, with the one timestamp an append gets), not a round trip to the log each.
    start = next(i for i, e in enumerate(events) if e["action"] == "RecoveryStarted"
                 and e["data"]["browser_id"] == first["browser_id"])
    recovery = events[start:start + 5]
    assert [e["action"] for e in recovery] == ["RecoveryStarted", "BrowserRoleChanged", "BrowserRetired",
                                               "RecoveryStepFinished", "RecoveryCompleted"], recovery
    assert len({e["timestamp"] for e in recovery}) == 1, recovery
    _finish(pool)


def test_webgpu_device_loss_is_detected_and_recovered(ray_local, tmp_path, reference):
    """Killing the GPU process makes WebGPU report device.lost: classified DEVICE_LOST, recovered
    by a restart (onnxruntime-web cannot move a session to a new device in place), answer still correct."""
    pool = ResourcePool.remote(max_connections=1, event_log=str(tmp_path / "events"), request_timeout=60.0,
                               backend="webgpu", health_interval=30.0, spare_process=False,   # as _pool's
                               fault_tolerance={"level": "medium", "recovery_strategy": "progressive"})
    # Loaded, not run: a first run on SwiftShader compiles its pipelines for ~5 s (~10 CPU-s), and the device is
    # live once the session's weights are on it. (A run's agreement with wasm: tests/test_browser_actor.py.)
    first = ray.get(pool.place.remote("all-minilm-l6-v2"))
    assert first["backend"] == "webgpu"
    ray.get(pool.inject_fault.remote(first["browser_id"], "kill_gpu"))
    # At once: a run that fails on the dying device is classified DEVICE_LOST (the page waits for the report).
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:2]}), timeout=300)
    assert np.abs(out["embedding"] - reference[:2]).max() <= 1e-3
    done = _finish(pool)
    assert done["state"].metrics.get("browser_failures.device_lost", 0) >= 1, dict(done["state"].metrics)
    assert done["stats"]["recovery_successes"] >= 1


@pytest.mark.parametrize(("strategy", "fault"), CASES)
def test_request_in_flight_survives_fault(pools, reference, strategy, fault):
    pool, _ = _pool(pools, strategy, request_timeout=HANG_REQUEST_TIMEOUT if fault == "hang" else REQUEST_TIMEOUT)
    seq, stats_before = _last_seq(pool), ray.get(pool.get_recovery_statistics.remote())
    ref = pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS})
    browser_id = _wait_in_flight(pool)          # the fault strikes the browser running the request
    ray.get(pool.inject_fault.remote(browser_id, fault))
    out = ray.get(ref, timeout=120)
    assert np.abs(out["embedding"] - reference).max() <= 1e-4
    if fault in STRIKES_IN_FLIGHT:
        assert out.get("recovered") is True and out["original_error"], {k: v for k, v in out.items()
                                                                         if k != "embedding"}
    # A renderer busy in wasm handles Page.crash (or a queued hang) only after the run: the request in
    # flight may finish first, correctly; then the next request, or the health check before it, meets
    # the fault and recovers (the log must show it).
    after = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}), timeout=120)
    assert np.abs(after["embedding"] - reference[:4]).max() <= 1e-4
    # A request can be answered before the recovery its fault started has ended: a hang that a health check's
    # budget cut short leaves the page free, and the request queued behind the hang runs there while the
    # recovery's resume step is still checking that page.
    until(lambda: not ray.get(pool.get_state.remote()).recoveries, "the recoveries to end", 60.0, 0.05)
    events = _since(pool, seq)
    stats = ray.get(pool.get_recovery_statistics.remote())
    recovery_records = [(e["action"], e["subject"], e["data"]) for e in events
                        if e["action"].startswith(("Browser", "Recovery")) and e["action"] != "BrowserHealthReported"]
    assert stats["recovery_attempts"] > stats_before["recovery_attempts"], recovery_records
    assert stats["recovery_successes"] > stats_before["recovery_successes"], recovery_records
    # The first failure of the faulted browser is read as the fault's category, from its signal...
    failed = [e["data"] for e in events if e["action"] == "BrowserFailed" and e["subject"] == browser_id]
    assert failed and failed[0]["category"] == CATEGORY_OF[fault], failed
    # ... and its recovery runs the configured strategy and succeeds with one of that strategy's steps.
    started = next(e for e in events if e["action"] == "RecoveryStarted" and e["data"]["browser_id"] == browser_id)
    recovery = started["subject"]
    assert started["data"]["strategy"] == strategy and started["data"]["category"] == CATEGORY_OF[fault]
    steps = [e["data"] for e in events if e["action"] == "RecoveryStepFinished" and e["subject"] == recovery]
    won = [s["step"] for s in steps if s["success"]]
    # A hang ended by its budget leaves the page usable: it is resumed in place, whatever the strategy.
    assert len(won) == 1 and won[0] in ({"resume"} if fault == "hang" else STEPS_OF[strategy]), steps
    if strategy != "parallel":       # (parallel's steps run at once; they are named parallel:<step>)
        # The steps were tried in the strategy's order (actors/decisions/recovery.py, plan_steps): progressive
        # reconnects only after a lost connection or a hang, restarts before it fails over (no standby at
        # medium), or only fails over once the browser has failed too often (the circuit is open).
        tried = [s["step"] for s in steps]
        config = FaultToleranceConfig.from_options({"level": "medium", "recovery_strategy": strategy})
        category = FailureCategory(CATEGORY_OF[fault])
        plans = [plan_steps(config, category, circuit_open) for circuit_open in (False, True)]
        assert any(tried == plan[:len(tried)] for plan in plans), (tried, plans)
    if won[0] == "failover":       # the failed browser is retired, its work moved to another
        retired = ray.get(pool.get_state.remote()).browsers[browser_id]
        assert retired.status == "retired", retired


def test_reconnect_keeps_page_state_and_models(pools, reference):
    """After a dropped CDP connection, reconnect finds the same page with the model still loaded."""
    pool, browser_id = _pool(pools, "reconnect")
    seq = _last_seq(pool)
    ray.get(pool.inject_fault.remote(browser_id, "disconnect"))
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}))
    assert out["browser_id"] == browser_id and np.abs(out["embedding"] - reference[:4]).max() <= 1e-4
    events = _since(pool, seq)
    assert [e for e in events if e["action"] == "BrowserFailed"], "the fault was seen"
    assert not [e for e in events if e["action"] == "ModelLoaded"], "nothing was loaded again"


def test_reconnect_cannot_revive_a_killed_browser_and_says_so(pools, reference):
    """Reconnect has nothing to attach to: the recovery fails (recorded), the browser stays failed,
    and new requests are served by a newly placed browser."""
    pool, browser_id = _pool(pools, "reconnect")
    failures = ray.get(pool.get_recovery_statistics.remote())["recovery_failures"]
    ray.get(pool.inject_fault.remote(browser_id, "kill_browser"))
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}))
    assert out["browser_id"] != browser_id and np.abs(out["embedding"] - reference[:4]).max() <= 1e-4
    _since(pool, 0)
    assert ray.get(pool.get_recovery_statistics.remote())["recovery_failures"] > failures
    assert ray.get(pool.get_state.remote()).browsers[browser_id].status in ("failed", "retired")


def test_an_explicit_reconnect_that_fails_leaves_the_browser_for_the_callers_restart(pools, reference):
    """The guide's progressive strategy escalates by itself (reconnect, then restart): a failed explicit
    reconnect leaves the browser failed, not retired, so the restart that follows revives it in place.
    (Level none: the pool recovers nothing by itself, not even on the browser's own report of its death, so
    the caller's escalation is the only one; at level low the pool's own reconnect races it.)"""
    pool, browser_id = _pool(pools, "reconnect", level="none")
    ray.get(pool.inject_fault.remote(browser_id, "kill_browser"))
    first = ray.get(pool.recover_browser.remote(browser_id, "connection", "test", strategy="reconnect"))
    assert not first["success"] and first["steps"] == ["reconnect"]
    assert ray.get(pool.get_state.remote()).browsers[browser_id].status == "failed"
    second = ray.get(pool.recover_browser.remote(browser_id, "crash", "test", strategy="restart"))
    assert second["success"] and second["steps"] == ["restart"] and second["recovery_browser"] == browser_id
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}))
    assert out["browser_id"] == browser_id and np.abs(out["embedding"] - reference[:4]).max() <= 1e-4
    _since(pool, 0)


def test_a_request_during_a_recovery_waits_for_it_instead_of_loading_the_model_elsewhere(pools, reference):
    """The health loop finds a killed browser and restarts it (~1.5 s with the model reload); a request
    arriving meanwhile is served by the restarted browser, not by a second one launched for it."""
    pool, browser_id = _pool(pools, "restart")
    seq, successes = _last_seq(pool), ray.get(pool.get_recovery_statistics.remote())["recovery_successes"]
    ray.get(pool.inject_fault.remote(browser_id, "kill_browser"))
    deadline = time.monotonic() + 30
    while not ray.get(pool.get_state.remote()).recoveries:
        assert time.monotonic() < deadline, "the health loop never started a recovery"
        time.sleep(0.005)
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}), timeout=120)
    assert out["browser_id"] == browser_id and np.abs(out["embedding"] - reference[:4]).max() <= 1e-4
    # spare_process=False overrides the default (on where a restart is the likely step, as here): no spare.
    assert ray.get(pool.health.remote())[browser_id]["spare_expected"] is False
    launched = {e["subject"] for e in _since(pool, seq) if e["action"] == "BrowserLaunched"}
    assert launched == {browser_id}, "restarted in place; no second browser was launched"
    assert ray.get(pool.get_recovery_statistics.remote())["recovery_successes"] > successes


def test_level_none_reports_the_error(pools):
    pool, browser_id = _pool(pools, "progressive", level="none", spare_process=True)
    # spare_process=True overrides the default (off at level none): the browser that served keeps a spare.
    assert ray.get(pool.health.remote())[browser_id]["spare_expected"] is True
    ray.get(pool.inject_fault.remote(browser_id, "crash_page"))
    time.sleep(0.3)
    with pytest.raises(BrowserFailure) as err:
        ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": "x"}))
    assert err.value.category.value == "crash"
    _since(pool, 0)


def test_memory_ceiling_is_detected_and_recovered(pools, reference):
    pool, browser_id = _pool(pools, "progressive", memory_limit_mb=1500)
    seq = _last_seq(pool)
    ray.get(pool.inject_fault.remote(browser_id, "exhaust_memory", mb=1200))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        events = [e for e in ray.get(pool.recent_events.remote(1000)) if e["seq"] > seq]
        failed = [e for e in events if e["action"] == "BrowserFailed" and e["data"]["category"] == "memory"]
        if failed and [e for e in events if e["action"] == "RecoveryCompleted" and e["data"]["success"]]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"memory failure not recovered: {[(e['action'], e['data']) for e in events]}")
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}))
    assert np.abs(out["embedding"] - reference[:4]).max() <= 1e-4
    _since(pool, seq)


def test_parallel_wins_when_reconnect_fails_fast(pools, reference):
    """A crashed page: reconnect fails at once, a fresh or existing browser wins; nothing is cancelled."""
    pool, browser_id = _pool(pools, "parallel")
    seq = _last_seq(pool)
    ray.get(pool.inject_fault.remote(browser_id, "crash_page"))
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}))
    assert np.abs(out["embedding"] - reference[:4]).max() <= 1e-4
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:     # the request or the health check triggered the recovery
        events = [e for e in ray.get(pool.recent_events.remote(300)) if e["seq"] > seq]
        steps = [e["data"] for e in events if e["action"] == "RecoveryStepFinished"]
        if any(s["success"] for s in steps):
            break
        time.sleep(0.2)
    winning = [s for s in steps if s["success"]]
    assert winning and winning[0]["step"] in ("parallel:restart", "parallel:failover"), steps
    _since(pool, seq)


def test_parallel_keeps_a_losing_fresh_browser_as_the_standby(pools, reference):
    """Level high, parallel, a browser SIGKILLed: reconnect fails, the warm standby (the failover attempt) wins,
    and the fresh browser launched beside it, ready later, is not thrown away: it becomes the pool's standby in
    place of the one that took over (README: "a losing fresh browser stays as a spare"), so no other browser
    is launched for that role, and none is retired as not needed."""
    pool, browser_id = _pool(pools, "parallel", level="high")      # one standby, as by default
    standby = warm_standby(pool)
    seq = ray.get(pool.get_state.remote()).last_seq
    ray.get(pool.inject_fault.remote(browser_id, "kill_browser"))
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}), timeout=120)
    assert out["browser_id"] == standby and np.abs(out["embedding"] - reference[:4]).max() <= 1e-4
    # The same failure reported late (as a request that met the dead browser a moment after the others would):
    # it was recovered already, so nothing is recovered again (the browser waits for parallel's losers to end).
    late = ray.get(pool.recover_browser.remote(browser_id, "crash", "late report"))
    assert late["success"] and late["steps"] == [] and late["recovery_browser"] in (standby, None), late
    fresh = warm_standby(pool)          # the pool has its standby again, model loaded and warmed up
    events = [e for e in ray.get(pool.recent_events.remote(1000)) if e["seq"] > seq]
    steps = [e["data"] for e in events if e["action"] == "RecoveryStepFinished"]
    trace = [(e["action"], e["subject"], {k: v for k, v in e["data"].items() if k not in ("metrics",)})
             for e in events if e["action"] not in ("OperationStarted", "OperationCompleted", "BrowserHealthReported")]
    assert [s["step"] for s in steps if s["success"]] == ["parallel:failover"], trace
    launched = [e["subject"] for e in events if e["action"] == "BrowserLaunched"]
    assert launched == [fresh], (launched, fresh, trace)         # the fresh browser, and no other
    retired = {e["subject"]: e["data"]["reason"] for e in events if e["action"] == "BrowserRetired"}
    assert fresh not in retired and browser_id in retired, retired
    _since(pool, seq)
