"""The reconcile loop's decisions (actors/decisions/reconcile.py): pure, over states built from events."""

from __future__ import annotations

import pytest

from actors.decisions.reconcile import (
    SILENT,
    CheckHealth,
    Checkpoint,
    CutOff,
    KeepStandby,
    Observations,
    Policy,
    Recover,
    ScaleDown,
    adoptable,
    decide,
    deferred_due,
    ended_by_restart,
    health_worth_recording,
    hot_keys,
    in_open_session,
    lost_to_nodes,
    probe_deadline,
    silent,
    standby_short,
    warm_keys_on,
)
from events.errors import FailureCategory
from events.fold import replay
from events.schema import (
    BrowserConnected,
    BrowserDisconnected,
    BrowserFailed,
    BrowserLaunched,
    BrowserRecoveryDeferred,
    BrowserRetired,
    ModelLoaded,
    ModelWarmedUp,
    OperationFailed,
    OperationStarted,
    Recorded,
    RecoveryCompleted,
    RecoveryStarted,
    SessionClosed,
    SessionOpened,
)
from events.state import PoolState, ResourceState, open_operations
from sharding.models.registry import artifact_key

SHA = "ab" * 32
KEY = artifact_key("m", None, SHA)
RECOVERS = Policy(recovers=True, standby_browsers=0)
HIGH = Policy(recovers=True, standby_browsers=1)
NONE = Policy(recovers=False, standby_browsers=0)


def state(*events) -> PoolState:
    return replay([Recorded(i + 1, 1000.0 + i, e) for i, e in enumerate(events)])


def up(bid: str, node: str = "n1", standby: bool = False) -> BrowserLaunched:
    return BrowserLaunched(bid, "chromium", ("wasm",), 1, node, standby, "wasm")


def loaded(bid: str) -> ModelLoaded:
    return ModelLoaded(bid, "m", None, SHA, "wasm", 10.0)


def seen(**kw) -> Observations:
    return Observations(alive_nodes=kw.pop("alive_nodes", None), **kw)


def test_browsers_on_a_vanished_node_are_recovered_as_unreachable():
    s = state(up("b1", "n1"), up("b2", "n2"), up("b3", "n2"), BrowserRetired("b3", "done"))
    assert lost_to_nodes(s, frozenset({"n1"})) == ["b2"]
    [action] = decide(s, seen(alive_nodes=frozenset({"n1"})), RECOVERS)
    assert action == Recover("b2", FailureCategory.CONNECTION, "its node n2 left the cluster", unreachable=True)


@pytest.mark.parametrize("alive_nodes, policy, recovering, expected", [
    (None, RECOVERS, frozenset(), []),                          # the node list could not be read: no verdict
    (frozenset({"n1"}), NONE, frozenset(), []),                 # level none recovers nothing
    (frozenset({"n1", "n2"}), RECOVERS, frozenset(), []),       # every node alive
])
def test_no_node_recovery_without_a_lost_node_and_a_level_that_recovers(alive_nodes, policy, recovering, expected):
    s = state(up("b1", "n1"), up("b2", "n2"))
    assert decide(s, seen(alive_nodes=alive_nodes, recovering=recovering), policy) == expected


def test_a_probe_unanswered_past_its_deadline_is_silence_once_a_later_probe_was_answered():
    outstanding = {"b1": 10.0, "b2": 10.6, "b3": 9.0}
    assert silent(outstanding, now=11.2, deadline=1.0) == {"b1", "b3"}            # no other browser to compare
    assert silent(outstanding, now=11.0, deadline=1.0) == {"b3"}       # b1 exactly at its deadline: not yet
    assert silent({}, now=100.0, deadline=1.0) == set()
    # With others: late only if a probe sent after it was answered (else the pool itself was stalled).
    assert silent(outstanding, now=11.2, deadline=1.0, newest_answer_sent=9.5) == {"b3"}
    assert silent(outstanding, now=11.2, deadline=1.0, newest_answer_sent=8.0) == set()
    assert silent(outstanding, now=11.2, deadline=1.0, newest_answer_sent=10.1) == {"b1", "b3"}


def test_the_probe_deadline_follows_the_slowest_recent_answer_within_its_bounds():
    assert probe_deadline([], floor=1.0, factor=4.0, cap=10.0) == 1.0
    assert probe_deadline([0.002, 0.01], floor=1.0, factor=4.0, cap=10.0) == 1.0
    assert probe_deadline([0.002, 0.7], floor=1.0, factor=4.0, cap=10.0) == pytest.approx(2.8)
    assert probe_deadline([5.0], floor=1.0, factor=4.0, cap=10.0) == 10.0


def test_a_silent_browser_is_recovered_as_unreachable_or_cut_off_for_its_session():
    plan = {"shards": [{"browser_id": "b4", "artifact": KEY}]}
    s = state(up("b1"), up("b2"), up("b3"), up("b4"), up("b5"), BrowserRetired("b5", "done"),
              SessionOpened("s1", "m", plan))
    actions = decide(s, seen(silent=frozenset({"b1", "b2", "b4", "b5", "gone"}), recovering=frozenset({"b2"})),
                     RECOVERS)
    # b2 is being recovered already, b5 is retired, "gone" is not in the log; b4 runs a shard: its session
    # replaces it once the coordinator's call to it is cut off.
    assert actions == [Recover("b1", FailureCategory.CONNECTION, SILENT, unreachable=True), CutOff("b4", SILENT)]
    assert SILENT == "its actor answered no probe in time (its node may be gone)"
    assert decide(s, seen(silent=frozenset({"b1"})), NONE) == []        # level none recovers nothing
    # Lost with its node and silent too: recovered once, for the node.
    lost = state(up("b1", "n1"), up("b2", "n2"))
    [once] = decide(lost, seen(alive_nodes=frozenset({"n2"}), silent=frozenset({"b1"})), RECOVERS)
    assert once.browser_id == "b1" and "left the cluster" in once.detail


def test_a_deferred_recovery_starts_once_its_session_has_closed():
    failed = (up("b1"), SessionOpened("s1", "m", {}), BrowserFailed("b1", FailureCategory.CRASH, "killed"),
              BrowserRecoveryDeferred("b1", "s1"))
    assert deferred_due(state(*failed)) == []                               # the session still runs
    closed = state(*failed, SessionClosed("s1", "done"))
    assert deferred_due(closed) == ["b1"]
    assert deferred_due(closed, frozenset({"b1"})) == []                   # already being recovered
    [action] = decide(closed, seen(), RECOVERS)
    assert isinstance(action, Recover) and action.browser_id == "b1" and action.category is FailureCategory.CRASH
    assert not action.unreachable and "killed" in action.detail
    assert decide(closed, seen(), NONE) == []


def test_a_browser_in_an_open_session_is_left_to_the_session():
    plan = {"shards": [{"browser_id": "b1", "artifact": KEY}, {"browser_id": "b2", "artifact": KEY}],
            "shadows": [None, "b3"]}
    opened = state(up("b1"), up("b2"), up("b3"), up("b4"), SessionOpened("s1", "m", plan))
    assert [b for b in ("b1", "b2", "b3", "b4") if in_open_session(opened, b)] == ["b1", "b2", "b3"]
    assert not in_open_session(state(up("b1"), SessionOpened("s1", "m", plan), SessionClosed("s1", "done")), "b1")
    assert not in_open_session(state(up("b1"), SessionOpened("s1", "m", {})), "b1")     # a plan without shards


def test_health_checks_skip_leased_browsers_and_those_being_recovered_or_checked():
    s = state(up("b1"), up("b2"), up("b3"), up("b4"))
    actions = decide(s, seen(health_due=True, leases={"b1": 1, "b2": 0}, recovering=frozenset({"b3"}),
                             checking=frozenset({"b4"})), RECOVERS)
    assert actions == [CheckHealth("b2")]
    assert decide(s, seen(health_due=False), RECOVERS) == []


def test_spares_are_kept_only_once_a_model_serves_and_until_they_hold_it_warmed_up():
    assert not standby_short(state(up("b1")), 1)                           # nothing hot to keep warm
    serving = (up("b1"), loaded("b1"))
    assert hot_keys(state(*serving)) == {KEY}
    assert standby_short(state(*serving), 1)                               # no spare yet
    assert standby_short(state(*serving, up("s1", standby=True)), 1)       # a spare without the model
    assert standby_short(state(*serving, up("s1", standby=True), loaded("s1")), 1)   # holds it, not warmed up
    spare = (up("s1", standby=True), loaded("s1"), ModelWarmedUp("s1", "m", None, 5, 900.0, 210.0))
    assert not standby_short(state(*serving, *spare), 1)
    assert warm_keys_on(state(*serving, *spare), "s1") == {KEY} and warm_keys_on(state(*serving), "b1") == set()
    assert standby_short(state(*serving, *spare, loaded("s1")), 1)        # a reload starts cold again
    assert not standby_short(state(*serving), 0)
    assert not standby_short(state(*serving), 1, launching=1)            # one is being launched as a standby
    assert standby_short(state(*serving), 2, launching=1)
    assert decide(state(*serving), seen(), HIGH) == [KeepStandby()]
    assert decide(state(*serving), seen(standby_busy=True), HIGH) == []


def test_timers_add_scale_down_and_checkpoint_last():
    s = state(up("b1"))
    assert decide(s, seen(scale_down_due=True, checkpoint_due=True), RECOVERS) == [ScaleDown(), Checkpoint()]


def test_actions_come_in_the_documented_order():
    s = state(up("b1", "n1"), loaded("b1"), up("b2", "n2"), up("b3", "n1"), SessionOpened("s", "m", {}),
              BrowserFailed("b3", FailureCategory.CRASH, "x"), BrowserRecoveryDeferred("b3", "s"),
              SessionClosed("s", "done"))
    actions = decide(s, seen(alive_nodes=frozenset({"n1"}), health_due=True, checkpoint_due=True,
                             scale_down_due=True), HIGH)
    assert [type(a).__name__ for a in actions] == ["Recover", "Recover", "CheckHealth", "KeepStandby",
                                                   "ScaleDown", "Checkpoint"]
    assert [a.browser_id for a in actions[:3]] == ["b2", "b3", "b1"]   # b2's node is gone: not health-checked


def test_a_restarted_pool_ends_what_its_dead_incarnation_left_open():

    s = state(up("b1"), up("b2"), BrowserRetired("b2", "done"), up("b3"),
              BrowserFailed("b3", FailureCategory.CRASH, "x"), OperationStarted("op1", "m", "b1", "infer", "d"),
              RecoveryStarted("r1", "b3", "restart", 1, FailureCategory.CRASH), SessionOpened("s1", "m", {}))
    ended = ended_by_restart(s)
    assert ended == [
        OperationFailed("op1", FailureCategory.CRASH, "the pool restarted while it ran"),
        RecoveryCompleted("r1", "b3", False, None, 0.0),
        SessionClosed("s1", "pool restarted"),
        BrowserRetired("b1", "pool restarted"), BrowserRetired("b3", "pool restarted"),
    ]
    after = replay([Recorded(i + 1, 1000.0 + i, e) for i, e in enumerate(
        [up("b1"), up("b2"), BrowserRetired("b2", "done"), up("b3"), BrowserFailed("b3", FailureCategory.CRASH, "x"),
         OperationStarted("op1", "m", "b1", "infer", "d"), RecoveryStarted("r1", "b3", "restart", 1,
                                                                             FailureCategory.CRASH),
         SessionOpened("s1", "m", {}), *ended])])
    assert open_operations(after) == [] and after.recoveries == {} and after.sessions == {}
    assert {b.status for b in after.browsers.values()} == {"retired"}
    assert ended_by_restart(after) == [] and ended_by_restart(PoolState()) == []


def test_a_restarted_pool_adopts_the_live_browsers_it_found_and_retires_the_rest():
    s = state(up("b1"), up("b2"), BrowserRetired("b2", "done"), up("b3"),
              BrowserFailed("b3", FailureCategory.CRASH, "x"), up("b4"), up("b5"),
              RecoveryStarted("r5", "b5", "restart", 1, FailureCategory.CRASH), up("b6"),
              BrowserDisconnected("b6", "CDP connection lost"),
              OperationStarted("op1", "m", "b1", "infer", "d"))
    # Serving in the log and no recovery open: b1, b4 (b2 retired, b3 failed, b5 was being recovered, b6 had lost
    # its connection).
    assert adoptable(s) == frozenset({"b1", "b4"})
    # b4's actor did not answer (its node is gone): only b1 is adopted. Its operation still ends (the request is
    # retried by Ray), and every other browser not yet closed is retired.
    ended = ended_by_restart(s, adopted=frozenset({"b1"}))
    assert ended == [
        OperationFailed("op1", FailureCategory.CRASH, "the pool restarted while it ran"),
        RecoveryCompleted("r5", "b5", False, None, 0.0),
        BrowserRetired("b3", "pool restarted"), BrowserRetired("b4", "pool restarted"),
        BrowserRetired("b5", "pool restarted"), BrowserRetired("b6", "pool restarted"), BrowserConnected("b1"),
    ]
    assert adoptable(PoolState()) == frozenset()


@pytest.mark.parametrize(("last", "memory_mb", "loaded", "recorded"), [
    (None, 300.0, ("a",), True),                                        # the first report
    (ResourceState("b1", 300.0, ("a",), 5, 1.0), 320.0, ("a",), False),    # within 10 %
    (ResourceState("b1", 300.0, ("a",), 5, 1.0), 330.0, ("a",), True),     # 10 % more
    (ResourceState("b1", 300.0, ("a",), 5, 1.0), 270.0, ("a",), True),     # 10 % less
    (ResourceState("b1", 300.0, ("a",), 5, 1.0), 300.0, ("a", "b"), True),  # a model more
    (ResourceState("b1", 300.0, ("b", "a"), 5, 1.0), 300.0, ("a", "b"), False),  # the same models
])
def test_a_health_report_is_recorded_when_its_models_or_memory_change(last, memory_mb, loaded, recorded):
    assert health_worth_recording(last, memory_mb, loaded) is recorded
