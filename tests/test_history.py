"""Performance history over recorded operation events: trends, filters, cap, recommendations.

Pure logic: inputs are real ``Recorded`` event sequences built here (no Ray, no browser). Durations
come from seeded random generators so every run sees the same data.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from events.history import PerformanceHistoryTracker
from events.performance import SCHEMA, HistoryInputError, fault_tolerance_advice
from events.schema import (
    BrowserLaunched,
    ModelLoaded,
    OperationCompleted,
    OperationFailed,
    OperationStarted,
    PoolConfigured,
    Recorded,
    SnapshotWritten,
)
from events.trends import linear_trend, mann_kendall_z, t_critical_99

T0 = 1_700_000_000.0
GUIDE_KEYS = {"entries_analyzed", "time_window_seconds", "avg_duration_ms", "min_duration_ms", "max_duration_ms",
              "success_rate", "trend_direction", "trend_magnitude", "improvement_rate", "avg_recent_duration_ms",
              "avg_oldest_duration_ms", "p50_duration_ms", "p95_duration_ms"}


class Log:
    """Builds a recorded event sequence the way the store would: seq contiguous from 1, ts given."""

    def __init__(self) -> None:
        self.records: list[Recorded] = []
        self.ops = 0

    def add(self, ts: float, event) -> None:
        self.records.append(Recorded(len(self.records) + 1, ts, event))

    def browser(self, ts: float, browser_id: str, backend: str, model: str, browser_type: str = "chromium") -> None:
        self.add(ts, BrowserLaunched(browser_id=browser_id, browser_type=browser_type, backend_caps=("wasm", backend),
                                     pid=1000 + len(self.records), node_id="node-1", standby=False))
        self.add(ts, ModelLoaded(browser_id=browser_id, model=model, shard=None, sha256="ab" * 32, backend=backend,
                                 load_ms=120.0))

    def op(self, ts: float, browser_id: str, model: str, duration_ms: float | None, kind: str = "infer",
           category: str = "crash") -> str:
        """One operation started at ``ts``; it completes after ``duration_ms`` or fails (None) 10 ms later."""
        self.ops += 1
        op_id = f"op-{self.ops:07d}"
        self.add(ts, OperationStarted(op_id=op_id, model=model, browser_id=browser_id, kind=kind, input_digest="d"))
        if duration_ms is None:
            self.add(ts + 0.01, OperationFailed(op_id=op_id, category=category, error="page crashed"))
        else:
            self.add(ts + duration_ms / 1000, OperationCompleted(op_id=op_id, duration_ms=duration_ms, metrics={}))
        return op_id


def run_series(durations, *, model: str = "minilm", backend: str = "wasm", step_s: float = 2.0,
               start: float = T0) -> tuple[PerformanceHistoryTracker, float]:
    log = Log()
    log.browser(start, "b1", backend, model)
    for i, d in enumerate(durations):
        log.op(start + 1 + i * step_s, "b1", model, None if d is None else float(d))
    tracker = PerformanceHistoryTracker()
    tracker.observe_many(log.records)
    return tracker, log.records[-1].ts + 1


def test_planted_slowdown_reads_degrading():
    rng = np.random.default_rng(1)
    # 150 ops at ~40 ms, then the browser slows down: the last 150 ops at ~64 ms (a 60 % step).
    d = np.r_[rng.normal(40, 4, 150), rng.normal(64, 6, 150)]
    tracker, now = run_series(d)
    r = tracker.analyze_performance_trends(now=now)
    assert set(r) == GUIDE_KEYS
    assert r["trend_direction"] == "degrading"
    assert r["trend_magnitude"] > 0.3
    assert r["improvement_rate"] < -0.3 and r["avg_recent_duration_ms"] > r["avg_oldest_duration_ms"]


def test_speed_up_reads_improving():
    rng = np.random.default_rng(2)
    d = np.linspace(90, 45, 200) * rng.lognormal(0, 0.1, 200)    # warming up: twice as fast by the end
    tracker, now = run_series(d)
    r = tracker.analyze_performance_trends(now=now)
    assert r["trend_direction"] == "improving"
    assert r["improvement_rate"] > 0.25


@pytest.mark.parametrize("seed", range(40))
def test_steady_noisy_runs_read_stable(seed):
    # Heavy, skewed noise (30 % lognormal plus rare 5x stalls) around a constant 50 ms: no trend.
    rng = np.random.default_rng(100 + seed)
    d = 50 * rng.lognormal(0, 0.3, 300)
    d[rng.random(300) < 0.02] *= 5
    tracker, now = run_series(d)
    r = tracker.analyze_performance_trends(now=now)
    assert r["trend_direction"] == "stable", r


def test_mann_kendall_statistic_matches_the_closed_form():
    # Strictly increasing n = 10: S = 45 pairs, sd = sqrt(10 * 9 * 25 / 18); continuity-corrected.
    assert mann_kendall_z(np.arange(10.0)) == pytest.approx(44 / math.sqrt(125))
    assert mann_kendall_z(np.arange(10.0)[::-1]) == pytest.approx(-44 / math.sqrt(125))
    assert mann_kendall_z(np.array([5.0, 5.0, 5.0])) == 0.0


def test_a_burst_of_stalls_at_the_end_of_a_short_steady_run_is_not_a_trend():
    """12 steady requests, the last 3 stalled by background load: least squares alone reads 'degrading'
    (t = 3.6); the rank test does not agree (z = 1.8), so it is 'stable'. A real step (half the run slow)
    is still 'degrading'."""
    ts = T0 + np.arange(12) * 0.1
    d = np.array([55, 57, 54, 56, 55, 58, 54, 56, 55, 88, 95, 90], float)
    trend = linear_trend(ts, d)
    assert trend.t_stat > t_critical_99(10) and trend.direction == "stable"
    stepped = np.r_[d[:9], d[:3] * 5, d[:9] * 5]
    assert linear_trend(T0 + np.arange(21) * 0.1, stepped).direction == "degrading"


def test_small_real_change_below_relevance_threshold_is_stable():
    # A 4 % drift over the span with tiny noise is statistically clear but not worth acting on.
    d = np.linspace(50, 52, 2000) + np.random.default_rng(3).normal(0, 0.2, 2000)
    tracker, now = run_series(d, step_s=0.5)
    assert tracker.analyze_performance_trends(now=now)["trend_direction"] == "stable"
    # The same rows with a 1 % relevance threshold: now it is a degradation.
    strict = PerformanceHistoryTracker.from_table(tracker.table, min_relative_change=0.01)
    assert strict.analyze_performance_trends(now=now)["trend_direction"] == "degrading"


def test_success_rate_counts_failures_and_durations_use_completed_only():
    rng = np.random.default_rng(4)
    d = list(rng.normal(30, 3, 30))
    fails = [None] * 10
    series = [x for pair in zip(d[:10], fails, strict=True) for x in pair] + d[10:]
    tracker, now = run_series(series)
    r = tracker.analyze_performance_trends(now=now)
    assert r["entries_analyzed"] == 40
    assert r["success_rate"] == pytest.approx(30 / 40)
    assert r["avg_duration_ms"] == pytest.approx(np.mean(d), rel=1e-12)
    assert r["min_duration_ms"] == pytest.approx(min(d)) and r["max_duration_ms"] == pytest.approx(max(d))
    assert r["p50_duration_ms"] == pytest.approx(np.percentile(d, 50))
    assert r["p95_duration_ms"] == pytest.approx(np.percentile(d, 95))
    assert r["avg_recent_duration_ms"] == pytest.approx(np.mean(d[-10:]))
    assert r["avg_oldest_duration_ms"] == pytest.approx(np.mean(d[:10]))


def test_all_failed_gives_zero_success_and_no_durations():
    tracker, now = run_series([None] * 5)
    r = tracker.analyze_performance_trends(now=now)
    assert r["entries_analyzed"] == 5 and r["success_rate"] == 0.0
    assert r["avg_duration_ms"] is None and r["p95_duration_ms"] is None and r["trend_direction"] == "stable"


def test_time_window_filtering():
    log = Log()
    log.browser(T0, "b1", "wasm", "m")
    old = [log.op(T0 + i, "b1", "m", 100.0) for i in range(20)]          # T0 .. T0+19: slow, old
    recent = [log.op(T0 + 5000 + i, "b1", "m", 10.0) for i in range(30)]  # T0+5000 .. T0+5029
    later = log.op(T0 + 9000, "b1", "m", 500.0)                          # after `now`
    tracker = PerformanceHistoryTracker()
    tracker.observe_many(log.records)
    now = T0 + 5100
    r = tracker.analyze_performance_trends(time_window_seconds=3600, now=now)
    assert r["entries_analyzed"] == len(recent) and r["avg_duration_ms"] == pytest.approx(10.0)
    r = tracker.analyze_performance_trends(time_window_seconds=None, now=now)
    assert r["entries_analyzed"] == len(old) + len(recent)
    r = tracker.analyze_performance_trends(time_window_seconds=60, now=T0 + 9001)
    assert r["entries_analyzed"] == 1 and r["max_duration_ms"] == 500.0
    assert "error" in tracker.analyze_performance_trends(time_window_seconds=10, now=T0 + 4000)
    assert tracker.table.column("op_id").to_pylist() == [*old, *recent, later]


def test_default_now_is_the_clock():
    tracker, _ = run_series([20.0] * 12, start=time.time() - 100, step_s=1.0)
    assert tracker.analyze_performance_trends()["entries_analyzed"] == 12


def test_filters_by_model_browser_type_operation_type_and_browser():
    log = Log()
    log.browser(T0, "b1", "wasm", "minilm")
    log.add(T0, ModelLoaded(browser_id="b1", model="smollm2", shard="0-10", sha256="cd" * 32, backend="wasm",
                            load_ms=900.0))
    log.browser(T0, "b2", "webgpu", "minilm")
    for i in range(10):
        log.op(T0 + 10 * i + 1, "b1", "minilm", 20.0)
        log.op(T0 + 10 * i + 2, "b2", "minilm", 30.0)
        log.op(T0 + 10 * i + 3, "b1", "smollm2", 300.0, kind="generate")
        log.op(T0 + 10 * i + 4, "b1", "smollm2", 40.0, kind="infer")
    tracker = PerformanceHistoryTracker()
    tracker.observe_many(log.records)
    now = T0 + 200

    def avg(**kw) -> tuple[int, float]:
        r = tracker.analyze_performance_trends(now=now, **kw)
        return r["entries_analyzed"], r["avg_duration_ms"]

    assert avg(model_name="minilm") == (20, pytest.approx(25.0))
    assert avg(browser_type="chromium/wasm") == (30, pytest.approx((20 + 300 + 40) / 3))
    assert avg(browser_type="chromium/webgpu") == (10, 30.0)
    assert avg(operation_type="generate") == (10, 300.0)
    assert avg(model_name="smollm2", operation_type="infer") == (10, 40.0)
    assert avg(model_name="minilm", browser_type="chromium/wasm") == (10, 20.0)
    assert avg(browser_id="b2") == (10, 30.0)
    assert "error" in tracker.analyze_performance_trends(model_name="minilm", operation_type="generate", now=now)
    assert "error" in tracker.analyze_performance_trends(browser_type="chrome", now=now)


def test_empty_tracker_returns_error_dict():
    tracker = PerformanceHistoryTracker()
    assert tracker.analyze_performance_trends() == {"error": "No data available for the specified filters"}
    assert tracker.recommend_browser_type("m")["browser_type"] is None
    assert tracker.get_performance_recommendations() == {"recommendations": {}}


def test_max_entries_cap_keeps_newest_with_unique_ids():
    log = Log()
    log.browser(T0, "b1", "wasm", "m")
    ids = [log.op(T0 + i, "b1", "m", float(i + 1)) for i in range(120)]
    tracker = PerformanceHistoryTracker(max_entries=50)
    split = 2 + 2 * 70                                           # browser records + the first 70 ops
    assert tracker.observe_many(log.records[:split]) == 70
    assert len(tracker) == 50
    assert tracker.observe_many(log.records[split:]) == 50
    table = tracker.table
    assert table.num_rows == 50 == len(tracker)
    assert table.column("op_id").to_pylist() == ids[-50:]
    r = tracker.analyze_performance_trends(time_window_seconds=None, now=T0 + 500)
    assert r["entries_analyzed"] == 50 and r["min_duration_ms"] == 71.0


def test_replayed_and_anomalous_records_are_not_double_counted():
    log = Log()
    log.browser(T0, "b1", "wasm", "m")
    op = log.op(T0 + 1, "b1", "m", 10.0)
    log.add(T0 + 2, SnapshotWritten(snapshot_seq=4, path="snap"))                    # ignored kind
    log.add(T0 + 3, OperationCompleted(op_id="op-ghost", duration_ms=5.0, metrics={}))  # no start
    log.add(T0 + 4, OperationStarted(op_id=op, model="m", browser_id="b1", kind="infer", input_digest="d"))
    log.add(T0 + 5, OperationStarted(op_id="op-x", model="m", browser_id="b9", kind="infer", input_digest="d"))
    log.add(T0 + 6, OperationFailed(op_id="op-x", category="timeout", error="no answer"))
    tracker = PerformanceHistoryTracker()
    assert tracker.observe_many(log.records) == 2
    assert tracker.observe_many(log.records) == 0                # the same range again: nothing new
    assert tracker.table.column("op_id").to_pylist() == [op, "op-x"]
    assert tracker.table.column("browser_type").to_pylist() == ["chromium/wasm", "unknown/unknown"]
    assert tracker.anomalies == {"finish_without_start": 1, "duplicate_start": 1, "unknown_browser": 1}
    assert tracker.pending == 0


def test_relaunch_under_same_id_takes_new_type_and_forgets_backends():
    log = Log()
    log.browser(T0, "b1", "webgpu", "m")
    log.op(T0 + 1, "b1", "m", 10.0)
    log.add(T0 + 2, BrowserLaunched(browser_id="b1", browser_type="edge", backend_caps=("wasm",), pid=7,
                                    node_id="n", standby=False))
    log.op(T0 + 3, "b1", "m", 10.0)       # before any ModelLoaded on the new process
    log.add(T0 + 4, ModelLoaded(browser_id="b1", model="m", shard=None, sha256="ab" * 32, backend="wasm",
                                load_ms=1.0))
    log.op(T0 + 5, "b1", "m", 10.0)
    tracker = PerformanceHistoryTracker()
    tracker.observe_many(log.records)
    assert tracker.table.column("browser_type").to_pylist() == ["chromium/webgpu", "edge/unknown", "edge/wasm"]


def two_browser_log(seed: int = 5) -> tuple[Log, float]:
    """minilm on a fast chromium/wasm browser (b1) and a slow chromium/webgpu one (b2, software adapter);
    smollm2 on b3, which slows down over time; some crashes on b2."""
    rng = np.random.default_rng(seed)
    log = Log()
    log.browser(T0, "b1", "wasm", "minilm")
    log.browser(T0, "b2", "webgpu", "minilm")
    log.browser(T0, "b3", "wasm", "smollm2")
    t = T0 + 1
    for i in range(200):
        log.op(t, "b1", "minilm", float(rng.normal(25, 2)))
        log.op(t + 0.2, "b2", "minilm", None if i % 20 == 7 else float(rng.normal(60, 5)))
        log.op(t + 0.4, "b3", "smollm2", float(rng.normal(400 + 2 * i, 20)), kind="generate")  # 400 -> 800 ms
        t += 5
    return log, t


def test_recommend_browser_type_picks_faster_and_more_reliable():
    log, now = two_browser_log()
    tracker = PerformanceHistoryTracker()
    tracker.observe_many(log.records)
    rec = tracker.recommend_browser_type("minilm", now=now)
    assert rec["browser_type"] == "chromium/wasm"
    assert set(rec["candidates"]) == {"chromium/wasm", "chromium/webgpu"}
    assert rec["candidates"]["chromium/webgpu"]["success_rate"] < 1.0
    assert "chromium/wasm" in rec["reason"]
    assert tracker.recommend_browser_type("smollm2", now=now)["browser_type"] == "chromium/wasm"
    none = tracker.recommend_browser_type("bert", now=now)
    assert none["browser_type"] is None and none["candidates"] == {}


def test_recommend_weighs_success_against_latency():
    # A fast browser that fails half the time loses to a slightly slower reliable one.
    log = Log()
    log.browser(T0, "b1", "wasm", "m")
    log.browser(T0, "b2", "webgpu", "m")
    for i in range(40):
        log.op(T0 + 2 * i, "b1", "m", 40.0)
        log.op(T0 + 2 * i + 1, "b2", "m", None if i % 2 else 30.0, category="device_lost")
    tracker = PerformanceHistoryTracker()
    tracker.observe_many(log.records)
    assert tracker.recommend_browser_type("m", now=T0 + 100)["browser_type"] == "chromium/wasm"


def test_performance_recommendations_name_better_browser_and_degrading_model():
    log, now = two_browser_log()
    tracker = PerformanceHistoryTracker()
    tracker.observe_many(log.records)
    recs = tracker.get_performance_recommendations(fault_tolerance_level="high", now=now)["recommendations"]
    for rec in recs.values():
        assert set(rec) == {"description", "recommendation"}
    assert "chromium/wasm" in recs["browser_type:minilm"]["recommendation"]
    assert "degrading_model:smollm2" in recs
    assert "b3" in recs["degrading_model:smollm2"]["recommendation"]
    assert "degrading_model:minilm" not in recs
    assert recs["failure_pattern:crash"]["description"].startswith("10 crash failures")
    assert "fault_tolerance_level" not in recs                  # already at high


def test_crashes_at_low_level_suggest_higher_fault_tolerance():
    log, now = two_browser_log()
    tracker = PerformanceHistoryTracker()
    tracker.observe_many(log.records)
    for level in ("none", "low", None):
        rec = tracker.get_performance_recommendations(fault_tolerance_level=level, now=now)["recommendations"]
        assert "level to medium" in rec["fault_tolerance_level"]["recommendation"]   # 10 of 600 ops: 1.7 %
    # At >= 5 % of operations the advice is warm standbys (high).
    assert fault_tolerance_advice("low", 100, {"crash": 6})[0] == "high"
    assert fault_tolerance_advice("medium", 100, {"memory": 3, "device_lost": 3})[0] == "high"
    assert fault_tolerance_advice("none", 1000, {"connection": 5})[0] == "low"
    assert fault_tolerance_advice("low", 1000, {"connection": 50}) is None
    assert fault_tolerance_advice("none", 1000, {"crash": 2}) is None


def test_the_level_the_log_recorded_is_the_default_for_the_advice():
    log, now = two_browser_log()
    tracker = PerformanceHistoryTracker()
    tracker.observe_many(log.records)
    assert tracker.fault_tolerance_level is None
    assert "level is unknown" in tracker.get_performance_recommendations(now=now)["recommendations"][
        "fault_tolerance_level"]["description"]
    for level, advised in (("low", True), ("medium", False)):
        log.add(log.records[-1].ts, PoolConfigured(level=level, recovery_strategy="progressive", options={}))
        tracker.observe_many(log.records)
        assert tracker.fault_tolerance_level == level
        recs = tracker.get_performance_recommendations(now=now)["recommendations"]
        assert ("fault_tolerance_level" in recs) is advised, recs.get("fault_tolerance_level")
        if advised:
            assert "level is low" in recs["fault_tolerance_level"]["description"]
    # A level given by the caller still wins over the log's.
    assert "fault_tolerance_level" in tracker.get_performance_recommendations(
        fault_tolerance_level="none", now=now)["recommendations"]


def test_bad_input_raises_typed_errors():
    tracker = PerformanceHistoryTracker()
    with pytest.raises(HistoryInputError, match="time_window_seconds"):
        tracker.analyze_performance_trends(time_window_seconds=0)
    with pytest.raises(HistoryInputError, match="model_name"):
        tracker.analyze_performance_trends(model_name=3)
    with pytest.raises(HistoryInputError, match="fault_tolerance_level"):
        tracker.get_performance_recommendations(fault_tolerance_level="extreme")
    with pytest.raises(HistoryInputError, match="Recorded"):
        tracker.observe(OperationCompleted(op_id="x", duration_ms=1.0, metrics={}))
    with pytest.raises(HistoryInputError, match="max_entries"):
        PerformanceHistoryTracker(max_entries=0)
    with pytest.raises(HistoryInputError, match="duplicates"):
        PerformanceHistoryTracker.from_table(pa.concat_tables([_table(3), _table(3)]))
    broken = _table(4).set_column(9, "duration_ms", pa.array([1.0, None, 2.0, 3.0]))
    with pytest.raises(HistoryInputError, match="duration_ms is missing"):
        PerformanceHistoryTracker.from_table(broken.set_column(8, "status", pa.array(["completed"] * 4)))


def test_t_critical_matches_published_values():
    # Two-sided 99 % Student t quantiles from standard tables (df 31, 40, 60, 120, 1000).
    for df, value in ((1, 63.657), (10, 3.169), (31, 2.744), (40, 2.704), (60, 2.660), (120, 2.617),
                      (1000, 2.581)):
        assert t_critical_99(df) == pytest.approx(value, abs=2e-3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.1, 1e4), min_size=3, max_size=60), st.integers(0, 2**32 - 1))
def test_trend_slope_matches_polyfit(durations, seed):
    ts = T0 + np.sort(np.random.default_rng(seed).uniform(0, 3600, len(durations)))
    d = np.array(durations)
    trend = linear_trend(ts, d)
    if np.ptp(ts) > 0:
        ref = np.polyfit(ts - T0, d, 1)[0]
        assert trend.slope_ms_per_s == pytest.approx(ref, rel=1e-6, abs=1e-9 * max(1.0, float(d.max())))


def _table(n: int, seed: int = 0) -> pa.Table:
    """n operations as a history table built directly (for bulk tests), half a second apart."""
    rng = np.random.default_rng(seed)
    ts = T0 + np.arange(n) * 0.5
    ok = rng.random(n) > 0.03
    dur = rng.lognormal(np.log(40), 0.25, n)
    models = np.array(["minilm", "smollm2", "bert", "t5"])[rng.integers(0, 4, n)]
    types = np.array(["chromium/wasm", "chromium/webgpu", "edge/wasm"])[rng.integers(0, 3, n)]
    return pa.table({
        "op_id": pa.compute.cast(pa.array(np.arange(n)), pa.string()),
        "seq": pa.array(np.arange(n) * 2 + 2), "ts": ts, "started_ts": ts - dur / 1000,
        "model": models, "browser_id": pa.array(np.char.add("b", rng.integers(0, 8, n).astype(str))),
        "browser_type": types, "operation_type": pa.array(["infer"] * n),
        "status": np.where(ok, "completed", "failed"),
        "duration_ms": pa.array(dur, mask=~ok), "failure_category": pa.array(np.where(ok, None, "crash")),
    }, schema=SCHEMA)


def test_one_million_entries_analysed():
    """Correctness at scale; the speed (target: 1M entries in 0.5 s) is measured by benchmarks/history.py."""
    n = 1_000_000
    tracker = PerformanceHistoryTracker.from_table(_table(n))
    now = T0 + n * 0.5 + 1
    for kw in ({}, {"model_name": "minilm", "browser_type": "chromium/wasm"}):
        r = tracker.analyze_performance_trends(time_window_seconds=None, now=now, **kw)
        assert r["trend_direction"] == "stable"
    r = tracker.analyze_performance_trends(time_window_seconds=None, now=now)
    assert r["entries_analyzed"] == n
    assert r["success_rate"] == pytest.approx(0.97, abs=0.002)
