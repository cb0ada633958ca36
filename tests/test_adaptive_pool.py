"""The pool uses its history, on real Ray and Chromium: a browser slowed for real (its CPU throttled
over CDP) reads "degrading" in the history of the real event stream; among peers it loses its traffic,
is drained and replaced; with adaptive_scaling a burst grows the pool and idleness shrinks it, each decision an event,
no request lost; and the pool's numbers reach Prometheus through Ray's metrics agent."""

from __future__ import annotations

import numpy as np
import pytest
import ray
from waiting import until

from actors.decisions import adaptive
from events.history import PerformanceHistoryTracker
from events.state import browsers_alive
from sharding.models import minilm
from webpool import ResourcePool
from webpool.guide_recovery import recorded_from_entry

MODEL = "all-minilm-l6-v2"
WARM_UP_REQUESTS = 24
TEXTS = [f"request {i}: browsers answer, some slower than others" for i in range(4)]


@pytest.fixture(scope="module")
def reference():
    return minilm.reference_embed(TEXTS)


def _check(embedding, reference) -> None:
    assert np.abs(embedding - reference).max() <= 1e-4


def _events(pool) -> list[dict]:
    return ray.get(pool.recent_events.remote(ray.get(pool.get_state.remote()).last_seq + 10))


def _holders(pool) -> set[str]:
    """Browsers that have loaded the model (retired ones included)."""
    return {e["subject"] for e in _events(pool) if e["action"] == "ModelLoaded"}


def _scaled(pool, direction: str) -> list[dict]:
    return [e["data"] for e in _events(pool) if e["action"] == "PoolScaled" and e["data"]["direction"] == direction]


def test_the_history_of_a_real_run_shows_a_planted_slowdown(ray_local, tmp_path, reference):
    """One browser, 12 requests, its CPU throttled 10x, 12 more: the history of the real event stream
    holds every request, and its recent half is the slower.

    Whether a real steady run reads "stable" depends on the machine's load, not on the code (a shared
    2-core machine slowed a steady run enough to read "degrading"), so that judgement is made on
    controlled noisy series in ``test_history.py``; this test checks the path from real events to the
    verdict, with a slowdown the test itself plants."""
    pool = ResourcePool.remote(max_connections=1, event_log=str(tmp_path / "events"))
    try:
        # Warm-up is not steady state: the model's first runs carry its load and WASM's tier-up to
        # optimised code. Measured here (one browser, this request): end-to-end times fall from ~80-95 ms
        # to ~55 ms over the first ~20 requests, so a run of 12 after 1 or after 4 warm-ups read,
        # correctly, "improving" (seen twice in CI). 24 warm-ups cost ~2 s.
        for _ in range(WARM_UP_REQUESTS):
            _check(ray.get(pool.infer.remote(MODEL, {"texts": TEXTS}))["embedding"], reference)
        warm_seq = ray.get(pool.get_state.remote()).last_seq
        for _ in range(12):
            _check(ray.get(pool.infer.remote(MODEL, {"texts": TEXTS}))["embedding"], reference)
        [browser] = [b.browser_id for b in browsers_alive(ray.get(pool.get_state.remote()))]
        fault_seq = ray.get(pool.get_state.remote()).last_seq
        ray.get(pool.inject_fault.remote(browser, "slow", factor=10.0))
        for _ in range(12):
            _check(ray.get(pool.infer.remote(MODEL, {"texts": TEXTS}))["embedding"], reference)
        events = _events(pool)
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)

    def trend(records: list[dict]) -> dict:
        tracker = PerformanceHistoryTracker()
        tracker.observe_many(recorded_from_entry(e) for e in records)
        return tracker.analyze_performance_trends(MODEL, now=records[-1]["timestamp"])

    steady = [e for e in events if warm_seq < e["seq"] <= fault_seq]
    assert trend(steady)["entries_analyzed"] == 12
    slowed = trend([e for e in events if e["seq"] > warm_seq])
    assert slowed["entries_analyzed"] == 24
    # The history shows the planted slowdown: its recent half is the slower. Whether that reaches the
    # 99 % significance a "degrading" verdict needs depends on the machine's noise (a loaded CI box once
    # read 'stable' with a mean of 607 ms and a minimum of 102 ms), so the verdict itself is tested on
    # controlled series in test_history.py.
    assert slowed["avg_recent_duration_ms"] > slowed["avg_oldest_duration_ms"], slowed
    assert slowed["success_rate"] == 1.0


def test_a_slowed_browser_loses_its_traffic_and_is_drained_and_replaced(ray_local, tmp_path, reference):
    """Two browsers, pairs of requests, one browser slowed 10x: it is judged degraded after exactly the slow
    operations its upper median needs (half of ``MIN_SAMPLES``), drained, retired and replaced.

    Batching off: with it on, a pair that reaches the pool together is one page run on the faster browser,
    the slowed one gets nothing to be judged by, and it keeps its slot, idle (seen under load; a browser
    that serves nothing costs no request anything, and is judged on the work it next gets)."""
    pool = ResourcePool.remote(max_connections=2, event_log=str(tmp_path / "events"),
                               fault_tolerance={"level": "medium"}, max_batch_size=1,
                               spare_process=False)      # a drained browser is replaced, never restarted
    try:
        # Two browsers holding the model: concurrent requests make the pool grow to max_connections (in the
        # background: the busy browser answers meanwhile).
        for out in ray.get([pool.infer.remote(MODEL, {"texts": TEXTS}) for _ in range(6)]):
            _check(out["embedding"], reference)
        until(lambda: len(_holders(pool)) == 2, "the pool to grow to two browsers holding the model", 120)
        browsers = [b.browser_id for b in browsers_alive(ray.get(pool.get_state.remote()))]
        assert len(browsers) == 2
        for _ in range(adaptive.MIN_SAMPLES + 1):      # a steady history on both
            for out in ray.get([pool.infer.remote(MODEL, {"texts": TEXTS}) for _ in range(2)]):
                _check(out["embedding"], reference)
        slowed = browsers[0]
        seq_slowed = ray.get(pool.get_state.remote()).last_seq
        ray.get(pool.inject_fault.remote(slowed, "slow", factor=10.0))
        for _ in range(40):
            outs = ray.get([pool.infer.remote(MODEL, {"texts": TEXTS}) for _ in range(2)])
            for out in outs:
                _check(out["embedding"], reference)
            state = ray.get(pool.get_state.remote())
            if slowed not in state.browsers or state.browsers[slowed].status == "retired":
                break
        # Replaced: a new browser holds the model, and serves.
        try:
            until(lambda: any(e["action"] == "ModelLoaded" and e["subject"] not in browsers for e in _events(pool)),
                  "a replacement browser with the model", 120)
        except AssertionError as exc:      # say what the pool did instead
            trail = [(e["action"], e["subject"], str(e["data"])[:80]) for e in _events(pool)[-30:]]
            raise AssertionError(f"{exc}; slowed {slowed}; last events: {trail}") from None
        for out in ray.get([pool.infer.remote(MODEL, {"texts": TEXTS}) for _ in range(4)]):
            _check(out["embedding"], reference)
        events = _events(pool)
        draining = [e for e in events if e["action"] == "BrowserDraining"]
        assert [e["subject"] for e in draining] == [slowed], draining
        assert "slower than its peers" in draining[0]["data"]["reason"]
        # Judged as soon as half its window was slow: the pairs kept giving it work until then.
        slow_runs = [e for e in events if e["action"] == "OperationStarted" and e["data"]["browser_id"] == slowed
                     and seq_slowed < e["seq"] < draining[0]["seq"]]
        assert adaptive.MIN_SAMPLES // 2 <= len(slow_runs) <= adaptive.MIN_SAMPLES // 2 + 1, len(slow_runs)
        retired = [e for e in events if e["action"] == "BrowserRetired" and e["subject"] == slowed]
        assert retired and "drained" in retired[0]["data"]["reason"]
        # Traffic moved: from the drain on, the slowed browser started nothing new.
        late = [e for e in events if e["action"] == "OperationStarted" and e["seq"] > draining[0]["seq"]]
        assert len(late) >= 4 and all(e["data"]["browser_id"] != slowed for e in late)
        # README: max_batch_size=1 runs every request alone, concurrent ones included (a shared run's operations
        # carry batch_requests in their metrics; tests/test_batching.py shows they do when batching is on).
        completed = [e for e in events if e["action"] == "OperationCompleted"]
        assert completed and not [e for e in completed if "batch_requests" in e["data"]["metrics"]]

    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)


def test_adaptive_scaling_grows_under_a_burst_and_shrinks_when_idle(ray_local, tmp_path, reference):
    pool = ResourcePool.remote(max_connections=3, event_log=str(tmp_path / "events"), adaptive_scaling=True,
                               scale_down_idle_s=4.0)
    try:
        outs = ray.get([pool.infer.remote(MODEL, {"texts": TEXTS}) for _ in range(12)])
        for out in outs:
            _check(out["embedding"], reference)
        # Each growth (in the background) ends with a browser holding the model; then idleness shrinks the pool.
        until(lambda: len(_holders(pool)) >= len(_scaled(pool, "up")), "the browsers the burst asked for", 120)
        until(lambda: len(browsers_alive(ray.get(pool.get_state.remote()))) == 1, "the pool to shrink to one", 60)
        # Counted from the log, not from a snapshot after the burst: the scale-down loop runs meanwhile,
        # and a browser idle early in a long burst may already have been retired.
        events = _events(pool)
        up, down = _scaled(pool, "up"), _scaled(pool, "down")
        assert len(up) >= 2, "a burst of 12 requests grew the pool"
        assert "in flight" in up[-1]["reason"]
        assert len(down) == len(up) - 1 and all("idle" in d["reason"] for d in down)
        started = {e["data"]["op_id"] for e in events if e["action"] == "OperationStarted"}
        completed = {e["data"]["op_id"] for e in events if e["action"] == "OperationCompleted"}
        assert len(started) == 12 and completed == started          # nothing lost
        _check(ray.get(pool.infer.remote(MODEL, {"texts": TEXTS}))["embedding"], reference)    # the one left
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)
