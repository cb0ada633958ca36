"""Projections: one test per event kind's apply, the queries, and the replay properties."""

from __future__ import annotations

import functools
import itertools
import shutil
import tempfile
from pathlib import Path

import pytest
from event_strategies import logs
from hypothesis import given, settings
from hypothesis import strategies as st

from events.codec import log_entry
from events.errors import FailureCategory, SequenceGapError, SnapshotError
from events.fold import apply, replay
from events.schema import (
    EVENT_TYPES,
    BrowserConnected,
    BrowserDisconnected,
    BrowserDraining,
    BrowserFailed,
    BrowserHealthReported,
    BrowserLaunched,
    BrowserQuarantined,
    BrowserRecoveryDeferred,
    BrowserRetired,
    BrowserRoleChanged,
    HedgeSent,
    HedgeWon,
    ModelLoaded,
    ModelUnloaded,
    ModelWarmedUp,
    OperationCompleted,
    OperationFailed,
    OperationStarted,
    PageRequestsBlocked,
    PoolConfigured,
    PoolScaled,
    Recorded,
    RecoveryCompleted,
    RecoveryStarted,
    RecoveryStepFinished,
    RequestRejected,
    SessionClosed,
    SessionOpened,
    SessionResumed,
    ShardPromoted,
    SnapshotWritten,
    TokensAppended,
)
from events.state import (
    PERF_WINDOW,
    STATE_VERSION,
    BrowserState,
    ModelState,
    OperationState,
    PoolState,
    RecoveryStep,
    ResourceState,
    SessionState,
    SessionTokens,
    browsers_alive,
    models_on,
    open_operations,
    recovery_statistics,
    state_from_json,
    state_to_json,
)
from events.store import EventStore


def records(*events, start: int = 1) -> list[Recorded]:
    return [Recorded(start + i, 1000.0 + start + i, e) for i, e in enumerate(events)]


def run(*events) -> PoolState:
    return replay(records(*events))


def launched(bid: str = "b1", standby: bool = False) -> BrowserLaunched:
    return BrowserLaunched(bid, "chromium", ("wasm", "webgpu"), 4242, "node-1", standby)


# --- one test per kind ---


def test_browser_launched():
    s = run(launched())
    assert s.browsers == {"b1": BrowserState("b1", "chromium", ("wasm", "webgpu"), 4242, "node-1", False,
                                             status="launched", launched_seq=1, last_active_ts=1001.0)}
    assert s.metrics == {"browsers_launched": 1} and s.last_seq == 1 and s.last_ts == 1001.0


def test_browser_launched_again_is_a_fresh_process_holding_nothing():
    s = run(launched(), ModelLoaded("b1", "m", None, "h", "wasm", 5.0), BrowserHealthReported("b1", 300.0, ("m",)),
            BrowserFailed("b1", FailureCategory.CRASH, "gone"), launched())
    assert s.browsers["b1"].status == "launched" and s.browsers["b1"].failures == 1
    assert s.browsers["b1"].launched_seq == 5
    assert models_on(s, "b1") == [] and s.resources == {}


def test_browser_connected():
    assert run(launched(), BrowserConnected("b1")).browsers["b1"].status == "connected"


def test_browser_disconnected():
    b = run(launched(), BrowserConnected("b1"), BrowserDisconnected("b1", "cdp closed")).browsers["b1"]
    assert (b.status, b.status_reason) == ("disconnected", "cdp closed")


def test_browser_failed_keeps_models_for_recovery():
    s = run(launched(), ModelLoaded("b1", "m", "0-9", "h", "wasm", 5.0),
            BrowserFailed("b1", FailureCategory.DEVICE_LOST, "device lost"))
    b = s.browsers["b1"]
    assert (b.status, b.failures, b.last_failure, b.last_error) == ("failed", 1, FailureCategory.DEVICE_LOST,
                                                                    "device lost")
    assert [m.model for m in models_on(s, "b1")] == ["m"]
    assert s.metrics["browser_failures"] == 1 and s.metrics["browser_failures.device_lost"] == 1


def test_browser_retired_drops_models_and_resources():
    s = run(launched(), ModelLoaded("b1", "m", None, "h", "wasm", 5.0), BrowserHealthReported("b1", 1.0, ()),
            BrowserRetired("b1", "replaced"))
    assert s.browsers["b1"].status == "retired" and s.browsers["b1"].status_reason == "replaced"
    assert s.models == {} and s.resources == {} and s.metrics["browsers_retired"] == 1


def test_browser_role_changed_promotes_a_standby_keeping_its_models():
    s = run(launched(standby=True), ModelLoaded("b1", "m", None, "h", "wasm", 5.0), BrowserRoleChanged("b1", False))
    assert s.browsers["b1"].standby is False and s.browsers["b1"].status == "launched"
    assert [m.model for m in models_on(s, "b1")] == ["m"] and s.metrics["browsers_promoted"] == 1


def test_browser_quarantined_takes_it_out_of_service():
    s = run(launched(), ModelLoaded("b1", "m", None, "h", "wasm", 5.0), BrowserQuarantined("b1", "outvoted"))
    assert s.browsers["b1"].status == "quarantined" and s.browsers["b1"].status_reason == "outvoted"
    assert browsers_alive(s) == [] and s.models == {} and s.metrics["browsers_quarantined"] == 1


def test_browser_health_reported():
    s = run(launched(), BrowserHealthReported("b1", 812.5, ("m1", "m2")))
    assert s.resources == {"b1": ResourceState("b1", 812.5, ("m1", "m2"), reported_seq=2, reported_ts=1002.0)}


def test_model_loaded():
    s = run(launched(), ModelLoaded("b1", "smollm2", "10-19", "abc", "wasm", 4100.0))
    assert s.models == {("b1", "smollm2", "10-19"): ModelState("b1", "smollm2", "10-19", "abc", "wasm", 4100.0, 2)}
    assert s.metrics["models_loaded"] == 1


def test_model_warmed_up():
    s = run(launched(), ModelLoaded("b1", "m", None, "h", "wasm", 1.0), ModelWarmedUp("b1", "m", None, 4, 410.0, 21.5))
    assert s.models[("b1", "m", None)].warmed_up and s.metrics["models_warmed_up"] == 1
    assert not run(launched(), ModelLoaded("b1", "m", None, "h", "wasm", 1.0)).models[("b1", "m", None)].warmed_up
    load = ModelLoaded("b1", "m", None, "h", "wasm", 1.0)
    reloaded = run(launched(), load, ModelWarmedUp("b1", "m", None, 4, 1.0, 1.0), load)
    assert not reloaded.models[("b1", "m", None)].warmed_up       # a new load starts cold


def test_hedge_sent():
    s = run(launched(), HedgeSent("h1", "b1", "m", 24, 180.0), HedgeSent("h2", "b1", "m", 1, 50.0))
    assert s.metrics["hedges_sent"] == 2 and recovery_statistics(s)["hedges_sent"] == 2
    assert s.browsers == run(launched()).browsers          # a hedge changes no browser: its run is an operation


def test_hedge_won():
    s = run(launched(), HedgeSent("h1", "b1", "m", 24, 180.0), HedgeWon("h1", "b1", "m"))
    assert s.metrics["hedges_won"] == 1 and recovery_statistics(s)["hedges_won"] == 1


def test_model_unloaded():
    s = run(launched(), ModelLoaded("b1", "m", None, "h", "wasm", 1.0), ModelLoaded("b1", "n", None, "h", "wasm", 1.0),
            ModelUnloaded("b1", "m", None))
    assert list(s.models) == [("b1", "n", None)] and s.metrics["models_unloaded"] == 1


def test_page_requests_blocked():
    s = run(launched(), PageRequestsBlocked("b1", 2, ("http://a/", "ws://a/")), PageRequestsBlocked("b1", 1, ()))
    assert s.browsers["b1"].blocked_requests == 3 and s.metrics["requests_blocked"] == 3
    assert run(launched(), PageRequestsBlocked("b1", 2, ()), launched()).browsers["b1"].blocked_requests == 0
    ghost = run(PageRequestsBlocked("ghost", 1, ()))
    assert ghost.browsers == {} and ghost.metrics == {"anomaly.PageRequestsBlocked": 1}


def test_browser_draining():
    s = run(launched(), BrowserDraining("b1", "3.2x slower than its peers"))
    assert s.browsers["b1"].draining and s.browsers["b1"].status == "launched"     # alive until retired
    assert s.metrics["browsers_drained"] == 1
    assert not run(launched(), BrowserDraining("b1", "slow"), launched()).browsers["b1"].draining
    assert run(BrowserDraining("ghost", "x")).metrics == {"anomaly.BrowserDraining": 1}


def test_pool_scaled():
    s = run(PoolScaled("up", 2, "4 requests in flight on 1 browser"), PoolScaled("down", 1, "idle 30 s"))
    assert s.metrics == {"pool_scaled_up": 1, "pool_scaled_down": 1}


def test_pool_configured_the_last_one_holds():
    assert run().config == {}
    first = PoolConfigured("medium", "progressive", {"max_connections": 2, "fault_tolerance": {"vote_k": 3}})
    s = run(first, PoolConfigured("high", "failover", {"max_connections": 4}))
    assert s.config == {"level": "high", "recovery_strategy": "failover", "options": {"max_connections": 4}}
    assert s.metrics == {"pool_configured": 2}
    assert state_from_json(state_to_json(s)) == s


def test_operations_fill_the_performance_window_of_their_browser_and_model():
    ops = []
    for i in range(PERF_WINDOW + 3):
        ops += [OperationStarted(f"op{i}", "m", "b1", "infer", "d"), OperationCompleted(f"op{i}", float(i), {})]
    s = run(launched(), *ops, OperationStarted("bad", "m", "b1", "infer", "d"),
            OperationFailed("bad", FailureCategory.TIMEOUT, "slow"),
            OperationStarted("r", "m", "b1", "replay", "d"), OperationCompleted("r", 999.0, {}))
    w = s.perf[("b1", "m")]
    assert w.recent_ms == tuple(float(i) for i in range(3, PERF_WINDOW + 3))     # the latest, a replay not judged
    assert len(w.recent_ok) == PERF_WINDOW and w.recent_ok[-1] is False and all(w.recent_ok[:-1])
    assert s.browsers["b1"].last_active_ts == s.last_ts
    # A new process of that browser, or its retirement, forgets how the old one performed.
    assert ("b1", "m") not in apply(s, Recorded(s.last_seq + 1, 1.0, launched())).perf
    assert apply(s, Recorded(s.last_seq + 1, 1.0, BrowserRetired("b1", "done"))).perf == {}


def test_request_rejected():
    s = run(RequestRejected("m", "busy", 8, 8), RequestRejected("m", "busy", 8, 8))
    assert s.metrics == {"requests_rejected": 2, "requests_rejected.busy": 2}


def test_operation_started():
    s = run(launched(), OperationStarted("op1", "m", "b1", "infer", "sha:1"))
    assert s.operations == {"op1": OperationState("op1", "m", "b1", "infer", "sha:1", 2, 1002.0)}
    assert s.metrics["operations_started"] == 1


def test_operation_completed():
    s = run(OperationStarted("op1", "m", "b1", "infer", "d"), OperationCompleted("op1", 12.5, {"tokens": 3}),
            OperationStarted("op2", "m", "b1", "infer", "d"), OperationCompleted("op2", 7.5, {}))
    assert s.operations == {}
    assert s.metrics["operations_completed"] == 2 and s.metrics["operation_ms_total"] == 20.0


def test_operation_completed_resets_the_consecutive_failure_count():
    """The circuit breaker counts failures in a row: a browser that answers again starts afresh."""
    failed_twice = run(launched(), BrowserFailed("b1", FailureCategory.TIMEOUT, "slow"), BrowserConnected("b1"),
                       BrowserFailed("b1", FailureCategory.TIMEOUT, "slow"), BrowserConnected("b1"))
    assert failed_twice.browsers["b1"].failures == 2
    s = failed_twice
    for i, e in enumerate((OperationStarted("op", "m", "b1", "infer", "d"), OperationCompleted("op", 1.0, {}))):
        s = apply(s, Recorded(s.last_seq + 1, 2000.0 + i, e))
    assert s.browsers["b1"].failures == 0 and s.browsers["b1"].last_failure is FailureCategory.TIMEOUT


def test_operation_failed():
    s = run(OperationStarted("op1", "m", "b1", "infer", "d"), OperationFailed("op1", FailureCategory.TIMEOUT, "slow"))
    assert s.operations == {}
    assert s.metrics["operations_failed"] == 1 and s.metrics["operations_failed.timeout"] == 1


def test_browser_launched_keeps_the_chosen_backend():
    s = run(BrowserLaunched("b1", "chromium", ("wasm", "webgpu"), 1, "n", False, "webgpu"))
    assert s.browsers["b1"].backend == "webgpu"
    assert run(launched()).browsers["b1"].backend == ""       # a log from before schema 4


def test_browser_launched_keeps_its_pages_thread_count():
    s = run(BrowserLaunched("b1", "chromium", ("wasm",), 1, "n", False, "wasm", 2))
    assert s.browsers["b1"].wasm_threads == 2
    assert run(launched()).browsers["b1"].wasm_threads == 0   # a log from before schema 8


def test_browser_recovery_deferred_until_its_session_closes_and_cleared_when_the_recovery_starts():
    s = run(launched(), SessionOpened("s1", "m", {}), BrowserFailed("b1", FailureCategory.CRASH, "gone"),
            BrowserRecoveryDeferred("b1", "s1"))
    assert s.browsers["b1"].recover_after == "s1" and s.browsers["b1"].status == "failed"
    s = apply(s, Recorded(s.last_seq + 1, 2000.0, RecoveryStarted("r1", "b1", "progressive", 1,
                                                                      FailureCategory.CRASH)))
    assert s.browsers["b1"].recover_after is None
    assert run(BrowserRecoveryDeferred("ghost", "s1")).metrics["anomaly.BrowserRecoveryDeferred"] == 1


def test_recovery_completed_marks_a_failed_browser_replaced_until_it_changes_status():
    s = run(launched(), BrowserFailed("b1", FailureCategory.CRASH, "gone"),
            RecoveryStarted("r1", "b1", "parallel", 1, FailureCategory.CRASH),
            RecoveryCompleted("r1", "b1", True, "b2", 30.0))
    assert (s.browsers["b1"].status, s.browsers["b1"].replaced_by) == ("failed", "b2")
    assert run(launched(), BrowserFailed("b1", FailureCategory.CRASH, "gone"),     # reconnect revived it later
               RecoveryStarted("r1", "b1", "parallel", 1, FailureCategory.CRASH),
               RecoveryCompleted("r1", "b1", True, "b2", 30.0), BrowserConnected("b1")).browsers["b1"].replaced_by \
        is None
    for completed in (RecoveryCompleted("r1", "b1", False, None, 30.0),       # not recovered: may be tried again
                      RecoveryCompleted("r1", "b1", True, "b1", 30.0)):      # restarted in place: alive again
        s = run(launched(), BrowserFailed("b1", FailureCategory.CRASH, "gone"),
                RecoveryStarted("r1", "b1", "parallel", 1, FailureCategory.CRASH), completed)
        assert s.browsers["b1"].replaced_by is None


def test_recovery_started():
    s = run(RecoveryStarted("r1", "b1", "progressive", 1, FailureCategory.CRASH))
    assert s.recoveries["r1"].strategy == "progressive" and s.recoveries["r1"].steps == ()
    assert s.metrics["recovery_attempts"] == 1


def test_recovery_step_finished():
    s = run(RecoveryStarted("r1", "b1", "progressive", 1, FailureCategory.CRASH),
            RecoveryStepFinished("r1", "reconnect", False, 40.0, "refused"),
            RecoveryStepFinished("r1", "restart", True, 900.0, None))
    assert s.recoveries["r1"].steps == (RecoveryStep("reconnect", False, 40.0, "refused"),
                                        RecoveryStep("restart", True, 900.0, None))


def test_recovery_completed():
    s = run(RecoveryStarted("r1", "b1", "failover", 1, FailureCategory.CRASH),
            RecoveryCompleted("r1", "b1", True, "b2", 1200.0),
            RecoveryStarted("r2", "b2", "restart", 1, FailureCategory.MEMORY),
            RecoveryCompleted("r2", "b2", False, None, 300.0))
    assert s.recoveries == {}
    assert (s.metrics["recovery_successes"], s.metrics["recovery_failures"], s.metrics["recovery_ms_total"]) == (
        1, 1, 1500.0)


def test_session_opened():
    s = run(SessionOpened("s1", "smollm2", {"shards": [[0, 10], [10, 20], [20, 30]]}))
    assert s.sessions == {"s1": SessionState("s1", "smollm2", {"shards": [[0, 10], [10, 20], [20, 30]]}, (), 1)}


def test_tokens_appended():
    s = run(SessionOpened("s1", "m", {}), TokensAppended("s1", (1, 2, 3)), TokensAppended("s1", (4,)))
    assert s.sessions["s1"].tokens == (1, 2, 3, 4) and s.metrics["tokens_appended"] == 4


def test_session_resumed():
    s = run(SessionOpened("s1", "m", {}), TokensAppended("s1", (1, 2)), SessionResumed("s1", 2, 2))
    assert s.sessions["s1"].resumes == 1 and s.sessions["s1"].tokens == (1, 2)
    assert s.metrics["sessions_resumed"] == 1


def test_a_resume_that_does_not_match_the_logged_tokens_is_an_anomaly():
    s = run(SessionOpened("s1", "m", {}), TokensAppended("s1", (1, 2)), SessionResumed("s1", 5, 2),
            SessionResumed("ghost", 0, 2))
    assert s.sessions["s1"].resumes == 0 and s.metrics["anomaly.SessionResumed"] == 2


def test_shard_promoted():
    s = run(SessionOpened("s1", "m", {}), ShardPromoted("s1", 1, "b2", "b5"), ShardPromoted("ghost", 0, "b1", "b4"),
            ShardPromoted("s1", 1, "b2", "b5"))
    assert s.sessions["s1"].promoted == (1,)
    assert s.metrics["shard_promotions"] == 1 and s.metrics["anomaly.ShardPromoted"] == 2


def test_session_closed():
    s = run(SessionOpened("s1", "m", {}), TokensAppended("s1", (1,)), SessionClosed("s1", "eos"))
    assert s.sessions == {} and s.metrics["sessions_closed"] == 1


def test_session_tokens_follows_open_sessions_from_log_entries():
    """SessionTokens folds log entries (recent_events' shape, as events_since returns them) into the open
    sessions' plans and token counts; a closed session leaves; the first-opened session to reach n wins."""
    events = [SessionOpened("s1", "m", {"p": 1}), SessionOpened("s2", "m", {"p": 2}), SessionOpened("s3", "m", {}),
              TokensAppended("s2", (1, 2)), TokensAppended("s1", (1, 2, 3)), TokensAppended("s3", (1, 2)),
              SessionClosed("s3", "eos"), TokensAppended("gone", (9,))]
    entries = [log_entry(Recorded(i + 1, 100.0 + i, e)) for i, e in enumerate(events)]
    watch = SessionTokens()
    watch.add(entries[:4])
    assert watch.reached(2) == "s2" and watch.reached(3) is None and watch.last_seq == 4
    watch.add(entries[4:])
    assert watch.reached(2) == "s1" and watch.plans["s1"] == {"p": 1} and watch.reached(4) is None
    assert "s3" not in watch.plans and watch.tokens == {"s1": 3, "s2": 2} and watch.last_seq == 8


def test_snapshot_written():
    s = run(launched(), SnapshotWritten(1, "snapshots/1.snap"))
    assert s.metrics["snapshots"] == 1 and s.metrics["last_snapshot_seq"] == 1


def test_every_kind_has_a_test_above():
    tested = {name for name in globals() if name.startswith("test_")}
    for kind in EVENT_TYPES:
        snake = "".join("_" + c.lower() if c.isupper() else c for c in kind).lstrip("_")
        assert any(t == f"test_{snake}" or t.startswith(f"test_{snake}_") for t in tested), kind


# --- anomalies, order, purity ---


@pytest.mark.parametrize(
    "event",
    [
        BrowserConnected("ghost"), BrowserDisconnected("ghost", "x"), BrowserFailed("ghost", FailureCategory.CRASH, ""),
        BrowserRetired("ghost", "x"), BrowserHealthReported("ghost", 1.0, ()),
        ModelLoaded("ghost", "m", None, "h", "wasm", 1.0), ModelUnloaded("b1", "never-loaded", None),
        ModelWarmedUp("b1", "never-loaded", None, 1, 1.0, 1.0),
        OperationCompleted("ghost", 1.0, {}), OperationFailed("ghost", FailureCategory.CRASH, ""),
        RecoveryStepFinished("ghost", "s", True, 1.0, None), RecoveryCompleted("ghost", "b", True, None, 1.0),
        TokensAppended("ghost", (1,)), SessionClosed("ghost", "x"),
    ],
)
def test_events_about_unknown_subjects_only_count_an_anomaly(event):
    before = run(launched())
    after = apply(before, Recorded(2, 5.0, event))
    assert after.metrics == {**before.metrics, f"anomaly.{event.KIND}": 1}
    assert (after.browsers, after.models, after.operations, after.sessions) == (
        before.browsers, before.models, before.operations, before.sessions)


def test_duplicate_starts_are_anomalies_not_overwrites():
    s = run(OperationStarted("op1", "m", "b1", "infer", "d1"), OperationStarted("op1", "m", "b2", "infer", "d2"),
            SessionOpened("s", "m", {}), SessionOpened("s", "other", {}),
            RecoveryStarted("r", "b1", "restart", 1, FailureCategory.CRASH),
            RecoveryStarted("r", "b1", "failover", 2, FailureCategory.CRASH))
    assert s.operations["op1"].browser_id == "b1" and s.sessions["s"].model == "m"
    assert s.recoveries["r"].strategy == "restart"
    assert {k: v for k, v in s.metrics.items() if k.startswith("anomaly.")} == {
        "anomaly.OperationStarted": 1, "anomaly.SessionOpened": 1, "anomaly.RecoveryStarted": 1}


def test_records_must_follow_without_gap_or_repeat():
    s = run(launched())
    with pytest.raises(SequenceGapError, match="seq 3"):
        apply(s, Recorded(3, 1.0, BrowserConnected("b1")))
    with pytest.raises(SequenceGapError, match="seq 1"):
        apply(s, Recorded(1, 1.0, BrowserConnected("b1")))
    with pytest.raises(SequenceGapError):
        replay(records(launched(), start=5))


def test_apply_leaves_its_input_untouched():
    s = run(launched(), ModelLoaded("b1", "m", None, "h", "wasm", 1.0), OperationStarted("op", "m", "b1", "i", "d"))
    frozen = state_to_json(s)
    s2 = apply(s, Recorded(4, 9.0, OperationCompleted("op", 1.0, {})))
    s3 = apply(s2, Recorded(5, 9.5, BrowserRetired("b1", "done")))
    assert state_to_json(s) == frozen
    assert s.operations and s.models and not s3.models and s2.models is s.models  # untouched maps are shared


# --- queries ---


def test_queries():
    s = run(launched("b1"), launched("b2", standby=True), launched("b3"), BrowserConnected("b1"),
            BrowserFailed("b3", FailureCategory.CRASH, "x"), launched("b4"), BrowserRetired("b4", "idle"),
            ModelLoaded("b1", "m2", None, "h", "wasm", 1.0), ModelLoaded("b1", "m1", "1", "h", "wasm", 1.0),
            ModelLoaded("b2", "m1", None, "h", "wasm", 1.0),
            OperationStarted("late", "m", "b1", "i", "d"), OperationStarted("early", "m", "b1", "i", "d"),
            OperationCompleted("late", 1.0, {}), OperationStarted("later", "m", "b2", "i", "d"),
            RecoveryStarted("r1", "b3", "restart", 1, FailureCategory.CRASH),
            RecoveryCompleted("r1", "b3", True, "b5", 5),
            RecoveryStarted("r2", "b3", "restart", 2, FailureCategory.CRASH),
            RecoveryCompleted("r2", "b3", False, None, 5),
            RecoveryStarted("r3", "b3", "restart", 3, FailureCategory.CRASH))
    assert [b.browser_id for b in browsers_alive(s)] == ["b1", "b2"]
    assert [(m.model, m.shard) for m in models_on(s, "b1")] == [("m1", "1"), ("m2", None)]
    assert models_on(s, "nobody") == []
    assert [o.op_id for o in open_operations(s)] == ["early", "later"]
    assert recovery_statistics(s) == {"recovery_attempts": 3, "recovery_successes": 1, "recovery_failures": 1,
                                      "success_rate": 1 / 3, "hedges_sent": 0, "hedges_won": 0,
                                      "active_browsers": 2, "total_browsers": 4}
    assert recovery_statistics(PoolState())["success_rate"] == 0.0


# --- snapshot serialisation ---


def test_state_json_rejects_other_versions_and_garbage():
    doc = state_to_json(run(launched())).replace(f'"state_version":{STATE_VERSION}'.encode(),
                                                  f'"state_version":{STATE_VERSION + 1}'.encode())
    with pytest.raises(SnapshotError, match="version"):
        state_from_json(doc)
    for bad in (b"", b"[]", f'{{"state_version": {STATE_VERSION}}}'.encode(), b"\xff\x00"):
        with pytest.raises(SnapshotError):
            state_from_json(bad)


# --- properties over random event sequences (tests/event_strategies.py) ---

@settings(max_examples=300, deadline=None)
@given(logs(), st.data())
def test_replay_all_equals_snapshot_plus_tail(recs, data):
    full = replay(recs)
    cut = data.draw(st.integers(0, len(recs)), label="snapshot at")
    snapshot = state_from_json(state_to_json(replay(recs[:cut])))
    assert snapshot == replay(recs[:cut])
    assert replay(recs[cut:], snapshot) == full
    assert functools.reduce(apply, recs, PoolState()) == full  # one apply at a time = the batched fold
    assert state_from_json(state_to_json(full)) == full
    assert full.last_seq == len(recs)


def _is_store_marker(rec: Recorded) -> bool:
    e = rec.event
    return isinstance(e, SnapshotWritten) and e.path == f"snapshots/{e.snapshot_seq:020d}.snap"


@settings(max_examples=30, deadline=None)
@given(logs(), st.data())
def test_store_snapshot_plus_tail_equals_full_replay(recs, data):
    """The same property through real snapshot files: write in random batches, snapshot at a random
    point, reopen, and the projection equals replaying every stored event."""
    events = [r.event for r in recs]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(events)), max_size=6), label="batch cuts"))
    snap_after = data.draw(st.integers(0, len(cuts)), label="snapshot after batch")
    root = Path(tempfile.mkdtemp())
    try:
        with EventStore.open(root, fsync="never") as store:
            bounds = [0, *cuts, len(events)]
            for i, (a, b) in enumerate(itertools.pairwise(bounds)):
                store.append(events[a:b])
                if i == snap_after and store.last_seq:
                    store.write_snapshot(store.last_seq, replay(store.read()))
        with EventStore.open(root, fsync="never", snapshot_every=1000) as store:
            stored = list(store.read())
            assert [r.event for r in stored if not _is_store_marker(r)] == events
            assert store.state() == replay(stored)
            snap = store.latest_snapshot()
            if snap is not None:
                assert replay(store.read(snap.seq + 1), snap.state) == replay(stored)
    finally:
        shutil.rmtree(root)
