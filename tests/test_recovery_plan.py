"""The pure decisions of actors/decisions/recovery.py: options, classification, step plans, failover targets."""

from __future__ import annotations

import asyncio

import pytest
import ray

from actors.decisions.recovery import (
    Candidate,
    FaultToleranceConfig,
    FaultToleranceLevel,
    RecoveryStrategy,
    classify,
    pick_failover_target,
    plan_steps,
    retry_delay,
)
from events.errors import ActorUnreachable, BrowserFailure, FailureCategory, InputError, describe

C = FailureCategory


def cfg(level: str, strategy: str = "progressive") -> FaultToleranceConfig:
    return FaultToleranceConfig.from_options({"level": level, "recovery_strategy": strategy})


def test_options_are_validated_by_name():
    assert cfg("high", "parallel").recovery_strategy is RecoveryStrategy.PARALLEL
    for options, field in (({"level": "extreme"}, "fault_tolerance.level"),
                           ({"recovery_strategy": "pray"}, "fault_tolerance.recovery_strategy"),
                           ({"vote_k": -1}, "fault_tolerance.vote_k"),
                           ({"max_recovery_attempts": True}, "fault_tolerance.max_recovery_attempts"),
                           ({"levle": "high"}, "fault_tolerance")):
        with pytest.raises(InputError) as info:
            FaultToleranceConfig.from_options(options)
        assert info.value.field == field


def test_classify_uses_the_signal_not_the_message():
    crash = BrowserFailure("b1", C.CRASH, "page crashed")
    assert classify(crash, "b1") is crash
    assert classify(asyncio.TimeoutError(), "b1").category is C.TIMEOUT
    assert classify(ray.exceptions.RayActorError(), "b1").category is C.CRASH
    # Words in a message decide nothing.
    assert classify(RuntimeError("timeout out of memory crash"), "b1").category is C.UNKNOWN


def test_an_error_of_no_documented_type_is_an_unknown_failure_described_by_what_was_raised_remotely():
    class RemoteWrapper(Exception):       # as Ray's RayTaskError: the remote traceback in its text, the error in .cause
        def __init__(self, cause: Exception) -> None:
            super().__init__("ray::BrowserActor.run() (pid=1)\nTraceback (most recent call last):\n  ...")
            self.cause = cause

    failure = classify(RemoteWrapper(RuntimeError("Target page, context or browser has been closed\nCall log:")), "b1")
    assert isinstance(failure, BrowserFailure) and failure.browser_id == "b1" and failure.category is C.UNKNOWN
    assert failure.detail == "RuntimeError: Target page, context or browser has been closed"
    assert describe(ValueError("")) == "ValueError: "


@pytest.mark.parametrize("category", list(C))
def test_none_and_low(category):
    assert plan_steps(cfg("none"), category, circuit_open=False) == []
    resume = ["resume"] if category is C.TIMEOUT else []
    assert plan_steps(cfg("low"), category, circuit_open=False) == [*resume, "reconnect"]
    assert plan_steps(cfg("low"), category, circuit_open=True) == []


def test_the_first_retry_after_a_successful_recovery_goes_at_once_later_ones_back_off():
    assert retry_delay(1, recovered=True, backoff_s=0.05) == 0.0
    assert retry_delay(1, recovered=False, backoff_s=0.05) == 0.05
    assert retry_delay(2, recovered=True, backoff_s=0.05) == 0.1
    assert retry_delay(3, recovered=False, backoff_s=0.05) == 0.2


@pytest.mark.parametrize("strategy", ["reconnect", "restart", "failover", "progressive", "parallel"])
def test_a_hang_resumes_the_same_page_first_whatever_the_strategy(strategy):
    """A TIMEOUT means the browser actor terminated the hung script: the page is tried as it is first."""
    steps = plan_steps(cfg("medium", strategy), C.TIMEOUT, circuit_open=False)
    assert steps[0] == "resume" and len(steps) >= 2
    assert plan_steps(cfg("high", strategy), C.TIMEOUT, circuit_open=True) == ["failover"]
    assert "resume" not in plan_steps(cfg("medium", strategy), C.TIMEOUT, False, reachable=False)
    assert "resume" not in plan_steps(cfg("medium", strategy), C.CRASH, circuit_open=False)


@pytest.mark.parametrize("strategy", ["reconnect", "restart", "failover"])
def test_single_strategies_are_their_one_step(strategy):
    assert plan_steps(cfg("medium", strategy), C.CRASH, circuit_open=False) == [strategy]


def test_progressive_reconnects_only_where_something_is_left_to_reconnect_to():
    p = cfg("medium")
    assert plan_steps(p, C.CONNECTION, False) == ["reconnect", "restart", "failover"]
    assert plan_steps(p, C.TIMEOUT, False) == ["resume", "reconnect", "restart", "failover"]
    assert plan_steps(p, C.CRASH, False) == ["restart", "failover"]
    assert plan_steps(p, C.MEMORY, False) == ["restart", "failover"]


def test_progressive_skips_reconnect_when_the_actor_itself_is_unreachable():
    """Reconnect is a call to the browser's actor: when that actor did not answer, it would only wait to fail."""
    assert plan_steps(cfg("medium"), C.CONNECTION, False, reachable=False) == ["restart", "failover"]
    assert plan_steps(cfg("high"), C.CONNECTION, False, warm_standby=True, reachable=False) == ["failover", "restart"]
    unreachable = classify(ray.exceptions.ActorUnavailableError("gone", None), "b1")
    assert isinstance(unreachable, ActorUnreachable) and unreachable.category is C.CONNECTION


def test_progressive_with_a_warm_standby_fails_over_before_restarting():
    p = cfg("high")
    assert plan_steps(p, C.CRASH, False, warm_standby=True) == ["failover", "restart"]
    assert plan_steps(p, C.CONNECTION, False, warm_standby=True) == ["reconnect", "failover", "restart"]


def test_device_loss_is_recovered_like_a_crash():
    # onnxruntime-web keeps its first device for the page's life: nothing can be recovered in place.
    assert plan_steps(cfg("medium"), C.DEVICE_LOST, False) == ["restart", "failover"]
    assert plan_steps(cfg("medium", "parallel"), C.DEVICE_LOST, False) == ["parallel"]


@pytest.mark.parametrize("strategy", ["reconnect", "restart", "progressive", "parallel"])
def test_an_open_circuit_moves_the_work(strategy):
    assert plan_steps(cfg("high", strategy), C.CRASH, circuit_open=True) == ["failover"]


def test_failover_target_prefers_what_holds_the_models_then_standby_then_idle():
    assert pick_failover_target([]) is None
    assert pick_failover_target([Candidate("live", False, 1, 0), Candidate("spare", True, 0, 0)]) == "live"
    assert pick_failover_target([Candidate("live", False, 1, 0), Candidate("spare", True, 1, 0)]) == "spare"
    assert pick_failover_target([Candidate("busy", False, 1, 3), Candidate("idle", False, 1, 0)]) == "idle"


def test_levels_that_recover():
    assert not cfg("none").recovers
    assert all(cfg(level.value).recovers for level in FaultToleranceLevel if level is not FaultToleranceLevel.NONE)


def test_a_spare_process_is_kept_by_default_only_where_a_restart_is_the_recovery_step():
    assert cfg("medium", "restart").restarts_in_place and cfg("medium", "progressive").restarts_in_place
    assert cfg("high", "progressive").restarts_in_place and cfg("critical", "restart").restarts_in_place
    for level, strategy in (("none", "restart"), ("low", "progressive"), ("medium", "failover"),
                            ("high", "failover"), ("medium", "reconnect"), ("medium", "parallel")):
        assert not cfg(level, strategy).restarts_in_place, (level, strategy)
