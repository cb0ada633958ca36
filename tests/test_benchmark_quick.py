"""The recovery-latency benchmark in its CI size, on real browsers, so it cannot rot.

One quick run (kill_actor and disconnect x failover x level high, 1 trial each; the two Ray baselines; overhead
at none and medium) and checks of the JSON it writes: its structure, that every answer was correct,
and that the numbers are consistent with each other. No speed is asserted: the machine is shared.
The pure event-log arithmetic is checked on its own first.
"""

from __future__ import annotations

import math

import orjson
import pytest

from benchmarks import pool_trials as pt
from benchmarks import recovery_common as rc
from benchmarks import recovery_latency as rl
from benchmarks import startup
from benchmarks import vanished_node as vn
from benchmarks.results import summary_ms
from events import schema as ev
from events.errors import InputError
from events.fold import replay


def _ev(seq: int, ts: float, action: str, **data) -> dict:
    return {"seq": seq, "timestamp": ts, "action": action, "subject": data.get("browser_id", ""), "data": data}


def test_trial_latencies_from_the_event_log():
    events = [
        _ev(9, 99.990, "RecoveryCompleted", recovery_id="old", browser_id="b1", success=True, replacement="b1",
            duration_ms=1.0),                                   # before the failure: not its recovery
        _ev(10, 100.020, "BrowserFailed", browser_id="b1", category="crash", error="x"),
        _ev(12, 100.021, "BrowserFailed", browser_id="other", category="crash", error="x"),
        _ev(13, 100.030, "RecoveryStarted", recovery_id="r1", browser_id="b1", strategy="failover", attempt=1,
            category="crash"),
        _ev(14, 100.100, "RecoveryStepFinished", recovery_id="r1", step="failover", success=True, duration_ms=70.0,
            error=None),
        _ev(15, 100.120, "RecoveryCompleted", recovery_id="r1", browser_id="b1", success=True, replacement="b2",
            duration_ms=90.0),
        _ev(16, 100.135, "OperationStarted", op_id="o2", model="m", browser_id="b2", kind="infer", input_digest="d"),
    ]
    lat = rc.trial_latencies(events, "b1", fault_ts=100.0)
    assert lat["detected"] and lat["category"] == "crash"
    assert lat["detection_ms"] == pytest.approx(20.0, abs=1e-6)
    assert lat["recovery_ms"] == pytest.approx(100.0, abs=1e-6)   # 100.020 -> 100.120, not the older recovery
    assert lat["recovery_success"] is True and lat["replacement"] == "b2" and lat["winning_step"] == "failover"
    assert lat["rerun_start_ms"] == pytest.approx(135.0, abs=1e-6)   # the work starts again on b2
    assert rc.recovery_settled(events, "b1")
    nothing = rc.trial_latencies([e for e in events if e["action"] != "BrowserFailed"], "b1", fault_ts=100.0)
    assert not nothing["detected"] and nothing["detection_ms"] is None and nothing["recovery_ms"] is None


def test_a_pool_first_answer_is_broken_down_by_the_first_of_each_event_in_its_log():
    events = [_ev(1, 100.5, "PoolConfigured"), _ev(2, 100.6, "PoolScaled"),
              _ev(3, 101.9, "BrowserLaunched", browser_id="b1"), _ev(4, 102.4, "BrowserLaunched", browser_id="b2"),
              _ev(5, 103.2, "ModelLoaded", browser_id="b1"), _ev(6, 103.9, "ModelLoaded", browser_id="b2")]
    marks = startup.first_answer_marks(events, t0_wall=100.0)
    assert marks == pytest.approx({"log_open_at_ms": 500.0, "browser_launched_at_ms": 1900.0,
                                   "model_loaded_at_ms": 3200.0})
    assert startup.first_answer_marks(events[:2], 100.0)["model_loaded_at_ms"] is None    # never loaded


def _state(*events: ev.Event):
    return replay(ev.Recorded(i + 1, 100.0 + i, e) for i, e in enumerate(events))


def test_pool_shape_between_trials():
    """Steady: a serving browser and (level high) a warm standby, all holding the model; a browser left
    failed means the next trial needs a fresh pool."""
    def launched(b: str, standby: bool = False) -> ev.Event:
        return ev.BrowserLaunched(browser_id=b, browser_type="chromium", backend_caps=("wasm",), pid=1, node_id="n",
                                  standby=standby)

    def loaded(b: str) -> ev.Event:
        return ev.ModelLoaded(browser_id=b, model=rc.MODEL, shard=None, sha256="0" * 64, backend="wasm", load_ms=1.0)

    serving = [launched("b1"), loaded("b1")]
    assert rc.pool_not_ready(_state(*serving), rc.MODEL, standby_wanted=0) is None
    assert "standby" in rc.pool_not_ready(_state(*serving), rc.MODEL, standby_wanted=1)
    assert "hold no" in rc.pool_not_ready(_state(*serving, launched("s1", standby=True)), rc.MODEL, 1)
    cold = _state(*serving, launched("s1", standby=True), loaded("s1"))
    assert "warmed up" in rc.pool_not_ready(cold, rc.MODEL, 1)
    warm = _state(*serving, launched("s1", standby=True), loaded("s1"),
                  ev.ModelWarmedUp(browser_id="s1", model=rc.MODEL, shard=None, rounds=5, first_ms=900.0,
                                   last_ms=250.0))
    assert rc.pool_not_ready(warm, rc.MODEL, 1) is None and rc.pool_unfit(warm, 1) is None
    failed = _state(*serving, launched("b2"), loaded("b2"),
                    ev.BrowserFailed(browser_id="b1", category="crash", error="gone"))
    assert rc.pool_not_ready(failed, rc.MODEL, 0) is None       # b2 serves...
    assert "b1" in rc.pool_unfit(failed, 0)                     # ...but b1 was left failed, its actor alive
    # Recovered in place three times (reconnect): one more failure would open its circuit breaker.
    worn = _state(*serving, *[e for _ in range(rc.CIRCUIT_FAILURES) for e in (
        ev.BrowserFailed(browser_id="b1", category="timeout", error="hang"), ev.BrowserConnected(browser_id="b1"))])
    assert rc.pool_not_ready(worn, rc.MODEL, 0) is None and "circuit" in rc.pool_unfit(worn, 0)


def test_summary_and_config_checks():
    assert summary_ms([]) is None          # no samples is not a zero
    s = summary_ms([1.0, 2.0, 3.0, 100.0])
    assert s["median_ms"] == 2.5 and s["min_ms"] == 1.0 and s["max_ms"] == 100.0 and s["p95_ms"] > 50
    with pytest.raises(InputError) as err:
        rc.Config(faults=("kill_everything",))
    assert err.value.field == "faults"
    with pytest.raises(InputError):
        rc.Config(trials=0)


def _check_summary(s: dict | None) -> None:
    if s is None:
        return
    assert s["n"] >= 1
    assert all(math.isfinite(s[k]) for k in ("median_ms", "p95_ms", "min_ms", "max_ms"))
    assert s["min_ms"] <= s["median_ms"] <= s["p95_ms"] <= s["max_ms"]


def test_a_fault_of_one_backend_gets_a_pool_on_that_backend():
    """kill_gpu ends only WebGPU's device: it is measured on a webgpu pool, never reported from a wasm one;
    the other faults share the default pool, which the after-kill trials use too."""
    assert pt.session_groups(["kill_browser", "kill_gpu", "hang"], True) == [
        ("auto", ["kill_browser", "hang"]), ("webgpu", ["kill_gpu"])]
    assert pt.session_groups(["kill_gpu"], False) == [("webgpu", ["kill_gpu"])]
    assert pt.session_groups(["kill_gpu"], True) == [("auto", []), ("webgpu", ["kill_gpu"])]
    assert pt.session_groups(["kill_actor"], False) == [("auto", ["kill_actor"])]


def test_quick_run_writes_sane_results(ray_local, tmp_path):
    rl.main(["--quick", "--out-dir", str(tmp_path)])
    r = orjson.loads((tmp_path / "recovery_latency-quick.json").read_bytes())
    assert (tmp_path / "recovery_latency-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    cfg = rc.QUICK
    assert r["benchmark"] == "recovery_latency" and r["quick"] is True and r["complete"] is True
    assert not (tmp_path / "recovery_latency-quick.partial.json").exists()
    assert r["config"]["trials"] == cfg.trials == 1
    assert "multi-node" in r["not_measured"]["vanished_node"]
    assert r["machine"]["cpus"] >= 1
    assert all(p["error"] is None for p in r["pools"].values()), r["pools"]
    assert r["baseline"]["errors"] == []

    # One case per (fault, strategy, level), each with its trials, every answer correct.
    assert {(c["fault"], c["strategy"], c["level"]) for c in r["cases"]} == {
        (f, s, lv) for f in cfg.faults for s in cfg.strategies for lv in cfg.levels}
    for case in r["cases"]:
        summ = case["summary"]
        assert summ["trials"] == len(case["trials"]) == cfg.trials, case["note"]
        assert summ["all_answers_correct"], case
        for key in ("detection", "recovery", "time_to_result", "steady_request", "rerun_start"):
            _check_summary(summ[key])
        for t in case["trials"]:
            assert t["outcome"] in ("recovered_in_flight", "recovered_next_request", "hedged_in_flight",
                                    "hedged_next_request"), t
            assert t["detected"] and t["recovery_success"] is True, t
            # The fault's time is taken when the inject call returns: detection may precede it by the
            # reply's trip back, a few ms, never by more.
            assert -50 < t["detection_ms"] < 60_000
            assert 0 <= t["recovery_ms"] < 120_000
            if t["outcome"].startswith("recovered"):
                # The answer comes after the recovery it waited for (two clocks: allow 50 ms); a hedge's
                # answer need not wait for it.
                assert t["time_to_result_ms"] + 50 >= t["detection_ms"] + t["recovery_ms"], t
            assert t["trace"] and any("BrowserFailed" in line for line in t["trace"])

    # A one-sentence request right after a SIGKILL of the serving browser: answered correctly, and timed.
    after = r["after_kill"]
    assert len(after["trials"]) == cfg.after_kill_trials == 1 and after["all_correct"], after
    _check_summary(after["after_kill"])
    _check_summary(after["normal"])
    assert after["ratio_median"] > 0 and "right after a SIGKILL" in rl.markdown(r)

    # The baseline: an actor kill is answered after Ray restarts it; a dropped CDP connection is a zombie.
    base = r["baseline"]["faults"]
    kill = base["kill_actor"]
    assert kill["answered"] == len(kill["trials"]) >= 1 and kill["trials"][0]["restarted_pid_differs"]
    _check_summary(kill["time_to_result"])
    zombie = base["disconnect"]
    assert zombie["answered"] == 0 and zombie["time_to_result"] is None
    assert zombie["verdict"].startswith("never (zombie")
    assert zombie["trials"][0]["waited_s"] >= cfg.zombie_wait_s - 0.1 and zombie["trials"][0]["errors"]

    # The careful baseline restarts itself on its browser's signal: it answers both faults, correctly, each
    # from a new actor process.
    careful = r["careful_baseline"]
    assert careful["errors"] == [], careful
    for fault in cfg.faults:
        f = careful["faults"][fault]
        assert f["answered"] == len(f["trials"]) == cfg.baseline_kill_trials, f
        assert all(t["restarted"] for t in f["trials"]), f
        _check_summary(f["time_to_result"])

    # Ratios: against the careful baseline; against the plain one where it answered, its verdict where not.
    by_fault = {c["fault"]: c for c in r["cases"]}
    for fault in cfg.faults:
        vs = by_fault[fault]["vs_baseline"]
        assert vs["ratio_median"] == pytest.approx(by_fault[fault]["summary"]["time_to_result"]["median_ms"]
                                                   / careful["faults"][fault]["time_to_result"]["median_ms"])
    vs = by_fault["kill_actor"]["vs_plain_baseline"]
    assert vs["ratio_median"] == pytest.approx(
        by_fault["kill_actor"]["summary"]["time_to_result"]["median_ms"] / kill["time_to_result"]["median_ms"])
    assert by_fault["disconnect"]["vs_plain_baseline"] == {"baseline": zombie["verdict"], "ratio_median": None}
    assert "careful Ray actor" in rl.markdown(r)

    # Overhead: every answer right, ratios against level none.
    levels = r["overhead"]["levels"]
    assert set(levels) == set(cfg.overhead_levels)
    for x in levels.values():
        assert x["wrong_answers"] == 0
        for mode in ("sequential", "concurrent"):
            assert x[mode]["requests_per_s"] > 0
            _check_summary(x[mode]["latency"])
    assert levels["none"]["vs_none"]["sequential"]["throughput"] == 1.0
    assert levels["medium"]["vs_none"]["concurrent"]["throughput"] == pytest.approx(
        levels["medium"]["concurrent"]["requests_per_s"] / levels["none"]["concurrent"]["requests_per_s"])


def test_vanished_node_time_to_result_counts_only_requests_in_flight_at_the_loss():
    answers = [{"correct": True, "sent_ts": 99.0, "done_ts": 99.5},       # done before the node went
               {"correct": True, "sent_ts": 99.8, "done_ts": 101.2},      # in flight: 1.2 s after the loss
               {"correct": True, "sent_ts": 99.9, "done_ts": 100.4},      # in flight: 0.4 s
               {"correct": True, "sent_ts": 101.3, "done_ts": 101.4}]     # sent after
    seen = {"node_removed_ts": 100.0, "node_loss_answers": answers, "errors": {}, "node_declared_dead_s": 14.0,
            "node_loss_victim_browsers": ["b1"],
            "node_loss_failed": [{"browser_id": "b1", "after_s": 1.5, "error": "its actor answered no probe in time"},
                                 {"browser_id": "b9", "after_s": 0.1, "error": "another browser's failure"}]}
    trial = vn.vanished_node_trial(seen)
    assert trial["in_flight_ms"] == pytest.approx([1200.0, 400.0]) and trial["all_correct"] and trial["error"] is None
    assert trial["failed_after_s"] == 1.5 and trial["found_by"] == ["probe"] and trial["ray_declared_dead_s"] == 14.0
    late = vn.vanished_node_trial(seen | {"node_loss_failed": [{"browser_id": "b1", "after_s": 14.1,
                                                                 "error": "its node 1a03 left the cluster"}]})
    assert late["found_by"] == ["node verdict"]
    wrong = vn.vanished_node_trial(seen | {"node_loss_answers": [{**answers[1], "correct": False}]})
    assert not wrong["all_correct"] and wrong["in_flight_ms"] == []     # a wrong answer has no time
    failed = {**trial, "error": "the cluster scenarios wrote nothing"}
    v = vn.vanished_node_result([trial, late, failed])
    assert v["trials"] == 3 and v["trials_failed"] == 1 and v["errors"] == ["the cluster scenarios wrote nothing"]
    assert v["in_flight_at_loss"] == 4 and v["requests"] == 8 and v["all_correct"]
    assert v["time_to_result"]["n"] == 4 and v["last_answer"]["median_ms"] == pytest.approx(1200.0)
    assert v["found_by"] == {"probe": 1, "node verdict": 1, "a call": 0}
    assert "found by the probes in 1 of 2 trials" in vn.vanished_node_line(v)


def test_sharded_generation_tables_count_every_run_and_show_the_slow_tail():
    """Pure: the README's sharded-generation tables from a results dict. Every run is counted by how it was
    recovered and by whether its pool's spares were ready (a level-none pool keeps none); decode speed shows
    the slowest run beside the median."""
    from benchmarks import sharded_generation as sg

    def s(median: float, low: float) -> dict:
        return {"n": 2, "median": median, "p95": median, "mean": median, "min": low, "max": median}

    def section(how: str, ready: list[bool]) -> dict:
        return {"recovered_by": {how: len(ready)}, "runs": [{"spares_ready": r} for r in ready],
                "clean_decode_tokens_per_s": s(10.0, 9.0), "clean_total_ms": s(3000.0, 2900.0),
                "faulted_total_ms": s(4000.0, 3900.0), "extra_latency_ms": s(1000.0, 900.0),
                "extra_latency_vs_baseline": {"median": 0.25}, "tokens_identical": True}

    r = {"native_onnxruntime_1_thread": {"decode_tokens_per_s": s(20.0, 19.0), "prefill_ms": s(50.0, 49.0)},
         "decode": {"1": {"decode_tokens_per_s": s(12.0, 11.5), "prefill_ms": s(100.0, 99.0),
                          "tokens_identical": True},
                    "3": {"decode_tokens_per_s": s(10.0, 8.0), "prefill_ms": s(120.0, 119.0),
                          "tokens_identical": False}}}
    for key, _options, _browsers in sg.FAULT_CONFIGS:
        r[key] = section("replay", [True, False])
    r[sg.BASELINE] = section("restart and rerun", [True, True]) | {"extra_latency_vs_baseline": None}
    lines = sg.markdown(r).splitlines()
    assert "| webpool, 1 shard | 12.0 (11.5) | 100 | 0.60x | yes |" in lines
    assert "| webpool, 3 shards | 10.0 (8.0) | 120 | 0.50x | NO |" in lines
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    assert "replay 2; 1/2" in rows[sg.FAULT_LABELS["fault_shadow"]]
    assert "restart and rerun 2; none kept" in rows[sg.FAULT_LABELS[sg.BASELINE]]
    assert rows[sg.FAULT_LABELS[sg.BASELINE]].endswith("| 1000 / 1000 | 1.00x | yes |")


def test_a_tables_title_says_the_load_the_run_recorded():
    from benchmarks.results import load_text

    assert load_text({"cpus": 2, "load_before": 1.5, "load_after": 2.254}) == ", load 1.50→2.25"
    assert load_text({"cpus": 2, "load_before": 1.5}) == ", load 1.50"
    assert load_text({"cpus": 2}) == ""          # an older run's JSON: nothing made up
