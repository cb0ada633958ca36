"""Hedged requests (level high): the rules, then a real hang answered by the hedge long before its budget.

The rules are pure (actors/decisions/hedging.py). The real case: a pool at level high with one serving
browser and a warmed-up standby; the serving page is hung (a real infinite loop in its renderer), then three
requests of distinct texts arrive. Each must be answered correctly, with its own rows, by a copy on the
standby after the hedge delay (at least the first), not by the recovery after the request's time budget;
the hung runs still end in the log (TIMEOUT) and the browser is recovered.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
from prometheus import total, wait_until
from standby import warm_standby

from actors.constants import (
    HEDGE_BUDGET_BURST,
    HEDGE_BUDGET_PER_S,
    HEDGE_BUDGET_RATIO,
    HEDGE_MAX_MS,
    HEDGE_MIN_MS,
    HEDGE_TRANSPORT_MS,
)
from actors.decisions import hedging
from actors.decisions.recovery import FaultToleranceConfig
from events.errors import InputError
from events.state import open_operations
from sharding.models import llama, llama_onnx, minilm
from webpool import ResourcePool


def test_delay_is_the_p95_of_the_rows_plus_transport_within_floor_and_cap():
    assert hedging.delay_ms([], 1) == HEDGE_MAX_MS                       # no history: the cap
    assert hedging.delay_ms([10.0] * 4, 1) == HEDGE_MAX_MS               # too little history
    row_ms = [10.0] * 19 + [20.0]                                         # p95 of 20 samples: the 19th, 10 ms
    assert hedging.delay_ms(row_ms, 24) == pytest.approx(10.0 * 24 + HEDGE_TRANSPORT_MS)
    assert hedging.delay_ms([10.0] * 18 + [20.0, 20.0], 24) == pytest.approx(20.0 * 24 + HEDGE_TRANSPORT_MS)
    assert hedging.delay_ms([0.1] * 20, 1) == HEDGE_MIN_MS               # floor
    assert hedging.delay_ms([500.0] * 20, 64) == HEDGE_MAX_MS            # cap


def test_a_request_is_hedged_once_the_page_run_it_waits_for_is_slow():
    row_ms = [10.0] * 20                                   # 10 ms a row: a run of r rows is slow after 10r + 30 ms
    slow_after = [hedging.delay_ms(row_ms, r) / 1000 for r in range(9)]
    run = hedging.PageRun
    # Its own run, once its page has taken it up: from then, for that run's rows (a batch's, not its own).
    mine = run("b1", 8, 100.0)
    assert hedging.hedge_at(99.0, 1, mine, [mine], row_ms) == pytest.approx(100.0 + slow_after[8])
    # Sent, but its page is busy with the run ahead: that run decides (a hung one ahead hedges it).
    queued, ahead, elsewhere = run("b1", 1, None), run("b1", 4, 100.5), run("b2", 2, 100.1)
    assert hedging.hedge_at(99.0, 1, queued, [elsewhere, ahead, queued], row_ms) == pytest.approx(
        100.5 + slow_after[4])
    # Still in the pool's queue: the oldest run of its model anywhere.
    assert hedging.hedge_at(99.0, 1, None, [ahead, elsewhere, queued], row_ms) == pytest.approx(
        100.1 + slow_after[2])
    # Nothing runs (its browser is being placed or launched): its own delay from when it was sent.
    assert hedging.hedge_at(99.0, 3, None, [], row_ms) == pytest.approx(99.0 + slow_after[3])
    assert hedging.hedge_at(99.0, 3, queued, [queued], row_ms) == pytest.approx(99.0 + slow_after[3])


def test_a_page_takes_up_the_runs_sent_to_it_one_at_a_time_in_order():
    runs = hedging.PageRuns()
    a = runs.begin("m", "b1", 4, now=1.0)
    b = runs.begin("m", "b1", 2, now=1.1)         # behind a in b1's page
    c = runs.begin("m", "b2", 1, now=1.2)         # another page: taken up at once
    d = runs.begin("m", "b1", 3, now=1.3)
    other = runs.begin("n", "b1", 1, now=1.4)     # another model's runs are counted apart
    assert [(r.started) for r in (a, b, c, d, other)] == [1.0, None, 1.2, None, 1.4]
    runs.end("m", a, now=2.0)
    assert (b.started, d.started) == (2.0, None) and list(runs.of("m")) == [b, c, d]
    runs.end("m", c, now=2.5)
    assert d.started is None
    runs.end("m", b, now=3.0)
    assert d.started == 3.0 and list(runs.of("m")) == [d] and list(runs.of("x")) == []


def test_the_target_is_an_idle_browser_holding_the_model():
    c = hedging.Candidate
    assert hedging.pick_target([]) is None
    assert hedging.pick_target([c("busy", True, 1, False), c("empty", False, 0, False)]) is None
    assert hedging.pick_target([c("busy", True, 1, False), c("spare", True, 0, True)]) == "spare"
    # Fastest expected first; on a tie (or unknown cost) a serving browser before the standby.
    assert hedging.pick_target([c("slow", True, 0, False, 90.0), c("fast", True, 0, True, 30.0)]) == "fast"
    assert hedging.pick_target([c("spare", True, 0, True), c("serving", True, 0, False)]) == "serving"


def test_the_budget_allows_a_burst_then_its_ratio_and_its_time_refill():
    budget = hedging.Budget(now=0.0)
    burst = int(HEDGE_BUDGET_BURST)
    assert [budget.try_spend(0.0) for _ in range(burst + 1)] == [True] * burst + [False]
    for _ in range(round(1 / HEDGE_BUDGET_RATIO) - 1):
        budget.on_request(0.0)
    assert not budget.try_spend(0.0)                   # 19 requests: not yet a whole token
    budget.on_request(0.0)
    assert budget.try_spend(0.0) and not budget.try_spend(0.0)
    # A quiet pool: one token every 1 / HEDGE_BUDGET_PER_S seconds, with no request at all.
    assert not budget.try_spend(0.5 / HEDGE_BUDGET_PER_S)
    assert budget.try_spend(1.0 / HEDGE_BUDGET_PER_S) and not budget.try_spend(1.0 / HEDGE_BUDGET_PER_S)
    assert not budget.try_spend(0.0)                   # a clock read earlier adds nothing
    for _ in range(1000):
        budget.on_request(1.0 / HEDGE_BUDGET_PER_S)
    budget.try_spend(10_000.0)
    assert budget.tokens == HEDGE_BUDGET_BURST - 1     # saving up stops at the burst


def test_hedging_is_on_at_high_only_and_can_be_turned_off():
    assert FaultToleranceConfig.from_options({"level": "high"}).hedges
    assert not FaultToleranceConfig.from_options({"level": "high", "hedge": False}).hedges
    assert not FaultToleranceConfig.from_options({"level": "medium"}).hedges
    assert not FaultToleranceConfig.from_options({"level": "critical"}).hedges     # it votes instead
    with pytest.raises(InputError) as err:
        FaultToleranceConfig.from_options({"level": "high", "hedge": "yes"})
    assert err.value.field == "fault_tolerance.hedge"
    assert FaultToleranceConfig.from_options({"level": "high"}).hedge_budget == HEDGE_BUDGET_RATIO
    for bad in (0, 1.5, "5%", True):
        with pytest.raises(InputError) as err:
            FaultToleranceConfig.from_options({"level": "high", "hedge_budget": bad})
        assert err.value.field == "fault_tolerance.hedge_budget"


TEXTS = [f"Sentence {i}: a hung page must not cost the caller its whole time budget." for i in range(24)]
REQUEST_TIMEOUT = 10.0


def test_a_request_to_a_hung_browser_is_answered_by_the_hedge(ray_local, tmp_path):
    reference = minilm.reference_embed(TEXTS)
    # health_interval long: the request path, not a health check, meets the hang. The budget allows a hedge for
    # every request: slow warm-up requests (the machine is shared) must not spend the one the hang needs.
    pool = ResourcePool.remote(max_connections=1, event_log=str(tmp_path / "events"), request_timeout=REQUEST_TIMEOUT,
                               health_interval=60.0, name="hedge-pool",
                               spare_process=False,       # the hedge answers; no restart is under test here
                               fault_tolerance={"level": "high", "standby_browsers": 1, "hedge_budget": 1.0})
    try:
        serving = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}))["browser_id"]
        spare = warm_standby(pool)
        # History: the hedge delay comes from these requests' page times. 25 of them, after the standby's
        # warm-up (which shares the CPUs), so the first, cold runs (V8 not yet optimised: ~6x slower) have
        # left the 20-run window the p95 is taken over.
        for _ in range(25):
            ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}))

        before_hang = ray.get(pool.get_state.remote()).last_seq
        ray.get(pool.inject_fault.remote(serving, "hang"))
        # Three requests of distinct texts meet the hung page at once. Each is hedged on its own while the standby
        # is idle (a copy that finds it busy with another waits for the recovery instead), and each caller gets
        # its own rows, whichever run answered.
        parts = [TEXTS[:8], TEXTS[8:16], TEXTS[16:]]
        outs = ray.get([pool.infer.remote("all-minilm-l6-v2", {"texts": part}) for part in parts], timeout=120)
        for i, out in enumerate(outs):
            assert np.abs(out["embedding"] - reference[8 * i:8 * (i + 1)]).max() <= 1e-4, i
        # A string (pytest cuts any other message short): what the pool did from the hang on.
        hedged = [out for out in outs if "hedge" in out]
        assert hedged, "\n".join(
            [f"serving {serving}, standby {spare}; answers "
             f"{[{k: v for k, v in out.items() if k != 'embedding'} for out in outs]}"]
            + [f"{e['seq']} {e['action']} {e['subject']} {e['data']}"
               for e in ray.get(pool.recent_events.remote(10_000)) if e["seq"] > before_hang])
        hedges = [out["hedge"] for out in hedged]
        assert len({h["hedge_id"] for h in hedges}) == len(hedged), hedges
        for hedge, out in zip(hedges, hedged, strict=True):
            assert hedge["won"] and hedge["browser_id"] == spare == out["browser_id"], out
            # Never before the floor. No upper bound on the clock: the delay's cap is a pure rule (tested above),
            # and from submission the hedge also waits for its run to start and for the loop's timer (a suite run
            # read 2,004.7 ms with the delay at the 2,000 ms cap). That the budget did not answer it: below.
            assert hedge["after_ms"] >= HEDGE_MIN_MS, (hedge, ray.get(pool.get_state.remote()).perf)

        events = ray.get(pool.recent_events.remote(10_000))
        for hedge in hedges:
            [sent] = [e for e in events if e["action"] == "HedgeSent" and e["subject"] == hedge["hedge_id"]]
            [won] = [e for e in events if e["action"] == "HedgeWon" and e["subject"] == hedge["hedge_id"]]
            assert sent["data"]["browser_id"] == spare and sent["data"]["rows"] == 8
            # Answered before the hung run's budget ran out (no failure of the serving browser yet).
            assert not [e for e in events if e["action"] == "BrowserFailed" and e["seq"] < won["seq"]]
        # The hung run goes on until its budget ends it: a TIMEOUT, recovered like any other.
        deadline = time.monotonic() + 120
        while not [e for e in ray.get(pool.recent_events.remote(10_000))
                   if e["action"] == "RecoveryCompleted" and e["data"]["browser_id"] == serving]:
            assert time.monotonic() < deadline, "the hung browser was never recovered"
            time.sleep(0.2)
        events = ray.get(pool.recent_events.remote(10_000))
        failed = [e["data"] for e in events if e["action"] == "BrowserFailed" and e["subject"] == serving]
        assert failed and failed[0]["category"] == "timeout", failed
        state = ray.get(pool.get_state.remote())
        assert open_operations(state) == [], "both runs of every hedged request ended in the log"
        assert state.metrics["hedges_won"] >= len(hedged)
        stats = ray.get(pool.get_recovery_statistics.remote())        # the README: the statistics count them
        assert (stats["hedges_sent"], stats["hedges_won"]) == (state.metrics["hedges_sent"],
                                                               state.metrics["hedges_won"])
        # The hedges reach Prometheus as the log counts them.
        counts = {"sent": state.metrics["hedges_sent"], "won": state.metrics["hedges_won"]}
        wait_until(lambda samples: [
            f"{event}: {got} != {want}" for event, want in counts.items()
            if (got := total(samples, "ray_webpool_hedges_total", pool="hedge-pool", model="all-minilm-l6-v2",
                             event=event)) != want])
        after = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}), timeout=120)
        assert np.abs(after["embedding"] - reference[:4]).max() <= 1e-4
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)


# Longer than the hedge delay's cap (a request with too little history waits the cap before it is hedged),
# short enough that the hung runs below do not hold the suite long.
NO_HEDGE_TIMEOUT = 6.0


def _events_until_failed(pool, since_seq: int, browser_id: str) -> list[dict]:
    """The pool's events after ``since_seq`` up to the first BrowserFailed of ``browser_id``."""
    events = [e for e in ray.get(pool.recent_events.remote(10_000)) if e["seq"] > since_seq]
    failed = next(i for i, e in enumerate(events) if e["action"] == "BrowserFailed" and e["subject"] == browser_id)
    return events[:failed + 1]


def test_a_hedge_never_loads_a_model_or_starts_a_browser(ray_local, tmp_path):
    """README: a hedge goes only to an idle browser that already holds the model. Here the other browser is
    idle but holds another model, and the pool may still grow (max_connections=2 with a slot free): the
    request to the hung browser is not hedged; it is answered after its budget, by the recovery."""
    reference = minilm.reference_embed(TEXTS)
    pool = ResourcePool.remote(max_connections=2, event_log=str(tmp_path / "events"),
                               request_timeout=NO_HEDGE_TIMEOUT, health_interval=60.0, spare_process=False,
                               fault_tolerance={"level": "high", "standby_browsers": 0, "hedge_budget": 1.0})
    try:
        serving = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS[:4]}))["browser_id"]
        other = ray.get(pool.generate.remote("tiny-llama", "hello", max_new_tokens=2))["browser_id"]
        assert other != serving                 # the generation took a browser of its own
        state = ray.get(pool.get_state.remote())
        assert {k[0] for k in state.models if k[1] == "all-minilm-l6-v2"} == {serving}
        mark = state.last_seq
        ray.get(pool.inject_fault.remote(serving, "hang"))
        out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"texts": TEXTS}), timeout=120)
        assert np.abs(out["embedding"] - reference).max() <= 1e-4
        assert "hedge" not in out
        until_failed = _events_until_failed(pool, mark, serving)
        assert [e["data"]["category"] for e in until_failed if e["action"] == "BrowserFailed"] == ["timeout"]
        # Until the hung browser's budget ran out: no hedge, no model loaded, no browser started.
        acted = [e["action"] for e in until_failed
                 if e["action"] in ("HedgeSent", "ModelLoaded", "PoolScaled", "BrowserLaunched")]
        assert acted == [], acted
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)


def test_generation_is_not_hedged_even_with_a_warm_standby_holding_its_model(ray_local, tmp_path):
    """README: generation is not hedged (a session's steps carry state: replay, not a copy, recovers them).
    The warm standby holds tiny-llama and is idle, so a hedge could go there; a generation whose browser is
    hung still sends none, and its tokens stay those of CPU onnxruntime."""
    model = llama.tiny_llama(seed=0)
    pool = ResourcePool.remote(max_connections=1, event_log=str(tmp_path / "events"),
                               request_timeout=NO_HEDGE_TIMEOUT, health_interval=60.0, spare_process=False,
                               fault_tolerance={"level": "high", "standby_browsers": 1, "hedge_budget": 1.0})
    try:
        first = ray.get(pool.generate.remote("tiny-llama", "hello", max_new_tokens=4))
        serving = first["browser_id"]
        standby = warm_standby(pool)
        state = ray.get(pool.get_state.remote())
        assert (standby, "tiny-llama") in {k[:2] for k in state.models}, "the standby holds the model"
        mark = state.last_seq
        ray.get(pool.inject_fault.remote(serving, "hang"))
        out = ray.get(pool.generate.remote("tiny-llama", "hello again", max_new_tokens=4), timeout=120)
        expected = llama_onnx.ort_greedy_generate(llama_onnx.build_shards(model, [(0, model.config.n_layers)]),
                                                  out["prompt_token_ids"], 4)
        assert out["token_ids"] == expected
        until_failed = _events_until_failed(pool, mark, serving)
        assert [e["data"]["category"] for e in until_failed if e["action"] == "BrowserFailed"] == ["timeout"]
        events = [e for e in ray.get(pool.recent_events.remote(10_000)) if e["seq"] > mark]
        assert [e for e in events if e["action"] == "HedgeSent"] == []
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)
