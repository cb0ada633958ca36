"""Recovery decisions, pure: the fault-tolerance configuration, failure classification, the ordered
steps of each strategy, and the choice of a failover target. No actor calls and no event loop here; the
recovery executor (actors/recovery.py) carries these decisions out.

A hang comes first: a TIMEOUT failure means a time budget ran out and the browser actor terminated the
page's script, so the page is usually fine again. Every strategy first tries ``resume`` (the same page,
if it answers and no run was cut off mid-way): nothing is restarted for a loop that has already ended.

The five strategies:
- reconnect: re-attach over CDP to the same, still running browser; its page (and models) are kept.
- restart:   a new browser process under the same id; the models the log says it held are loaded again.
- failover:  another browser (a warm standby first, then a live one, else a new one) takes the failed
             browser's models; the failed browser is retired.
- progressive: reconnect -> restart -> failover, as in the guide (reconnect only for CONNECTION and
             TIMEOUT failures: a crashed page has nothing to reconnect to); with a warm standby up,
             failover comes before restart (it is the cheaper step).
- parallel:  all three at once; the first success wins.
WebGPU device loss is recovered like a crash (restart or failover): onnxruntime-web keeps the one
device it started with for the life of the page, so a lost device cannot be replaced in place.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum
from typing import Any

import ray.exceptions

from actors.constants import (
    DEFAULT_BACKOFF_S,
    DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_MAX_RECOVERY_ATTEMPTS,
    DEFAULT_STANDBY_BROWSERS,
    DEFAULT_VOTE_COSINE,
    DEFAULT_VOTE_K,
    HEDGE_BUDGET_RATIO,
)
from events.errors import ActorUnreachable, BrowserFailure, FailureCategory, InputError, describe


class FaultToleranceLevel(str, Enum):
    NONE = "none"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class RecoveryStrategy(str, Enum):
    RECONNECT = "reconnect"
    RESTART = "restart"
    FAILOVER = "failover"
    PROGRESSIVE = "progressive"
    PARALLEL = "parallel"
    COORDINATED = "coordinated"     # the guide's name for shard recovery by prefix replay (= progressive here)


@dataclass(frozen=True)
class FaultToleranceConfig:
    level: FaultToleranceLevel = FaultToleranceLevel.NONE
    recovery_strategy: RecoveryStrategy = RecoveryStrategy.PROGRESSIVE
    checkpoint_interval: float = DEFAULT_CHECKPOINT_INTERVAL   # seconds between log snapshots (level high and up)
    max_recovery_attempts: int = DEFAULT_MAX_RECOVERY_ATTEMPTS  # per request; failures before a circuit opens
    standby_browsers: int = DEFAULT_STANDBY_BROWSERS       # warm spares at level high and up
    vote_k: int = DEFAULT_VOTE_K                           # browsers per request at level critical
    vote_cosine: float = DEFAULT_VOTE_COSINE               # embeddings agree when cosine >= this
    backoff_s: float = DEFAULT_BACKOFF_S                   # before attempt n: backoff_s * 2**(n-1)
    shadow_shards: bool = True               # level high and up: each shard of a sharded generation has a shadow
    hedge: bool = True                       # level high: a slow embedding request is also sent to an idle browser
    hedge_budget: float = HEDGE_BUDGET_RATIO     # ...for at most this share of requests, over time (0 < x <= 1)

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> FaultToleranceConfig:
        """Validate the guide's ``fault_tolerance_options`` dict; unknown keys are an error."""
        options = dict(options or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(options) - known
        if unknown:
            raise InputError("fault_tolerance", f"unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        try:
            level = FaultToleranceLevel(options.pop("level", "none"))
        except ValueError:
            raise InputError("fault_tolerance.level", f"must be one of {[v.value for v in FaultToleranceLevel]}") \
                from None
        try:
            strategy = RecoveryStrategy(options.pop("recovery_strategy", "progressive"))
        except ValueError:
            raise InputError("fault_tolerance.recovery_strategy",
                             f"must be one of {[v.value for v in RecoveryStrategy]}") from None
        for name in ("shadow_shards", "hedge"):
            if not isinstance(options.get(name, True), bool):
                raise InputError(f"fault_tolerance.{name}", f"must be a bool, got {options[name]!r}")
        budget = options.get("hedge_budget", HEDGE_BUDGET_RATIO)
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
            raise InputError("fault_tolerance.hedge_budget", f"must be a number in (0, 1], got {budget!r}")
        for name in ("max_recovery_attempts", "standby_browsers", "vote_k"):
            value = options.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InputError(f"fault_tolerance.{name}", f"must be an int >= 0, got {value!r}")
        return cls(level=level, recovery_strategy=strategy, **options)

    @property
    def recovers(self) -> bool:
        """Levels low and up recover a failed browser (low: by reconnecting only)."""
        return self.level is not FaultToleranceLevel.NONE

    @property
    def checks_health(self) -> bool:
        """Levels medium and up: the reconcile loop checks nodes and idle browsers on its own."""
        return self.level in (FaultToleranceLevel.MEDIUM, FaultToleranceLevel.HIGH, FaultToleranceLevel.CRITICAL)

    @property
    def keeps_standby(self) -> bool:
        """Levels high and up keep ``standby_browsers`` warm spares holding the hot models."""
        return self.level in (FaultToleranceLevel.HIGH, FaultToleranceLevel.CRITICAL)

    @property
    def restarts_in_place(self) -> bool:
        """Levels medium and up whose strategy restarts a failed browser's process (restart, progressive):
        their browsers keep a spare process ready by default (actors/browser.py ``SpareProcess``)."""
        return self.checks_health and self.recovery_strategy in (RecoveryStrategy.RESTART,
                                                                 RecoveryStrategy.PROGRESSIVE,
                                                                 RecoveryStrategy.COORDINATED)

    @property
    def checkpoints(self) -> bool:
        """Levels high and up snapshot the projection every ``checkpoint_interval``."""
        return self.keeps_standby

    @property
    def hedges(self) -> bool:
        """Level high hedges slow embedding requests (actors/decisions/hedging.py) unless ``hedge`` is False;
        level critical runs every request ``vote_k`` times already."""
        return self.level is FaultToleranceLevel.HIGH and self.hedge

    @property
    def votes(self) -> bool:
        """Level critical runs each request on ``vote_k`` browsers and answers by majority."""
        return self.level is FaultToleranceLevel.CRITICAL

    def check_voters(self, max_connections: int, shards: int = 1, field: str = "fault_tolerance.vote_k") -> None:
        """Level critical needs ``vote_k`` >= 2 independent runs of a request, each on its own ``shards``
        browsers, inside ``max_connections``: otherwise a clear InputError, never a vote of fewer."""
        if not self.votes:
            return
        if self.vote_k < 2:
            raise InputError("fault_tolerance.vote_k", f"level critical answers by majority over vote_k >= 2 "
                                                       f"browsers, got vote_k={self.vote_k}")
        needed = self.vote_k * shards
        if needed > max_connections:
            per = f"{shards} shards each, " if shards > 1 else ""
            raise InputError(field, f"level critical runs {self.vote_k} voters ({per}{needed} browsers) but "
                                    f"max_connections={max_connections}; raise max_connections or lower vote_k")

    def shadows(self, shards: int) -> bool:
        """Whether a generation over ``shards`` browsers runs each shard on a shadow too (level high and up):
        a shard failure then costs no prefix re-run, for a second forward per shard per step."""
        return shards > 1 and self.shadow_shards and self.keeps_standby and not self.votes


def classify(exc: BaseException, browser_id: str) -> BrowserFailure:
    """A failure category from the real signal an exception carries (never from message guessing).

    BrowserFailure already carries the category the actor observed (crash/disconnect events,
    process exit, time budget, device.lost, memory ceiling). A dead actor process is a CRASH; a
    node that stopped answering (ActorUnavailableError) is CONNECTION; a timeout of ours is TIMEOUT.
    """
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, BrowserFailure):
        return cause
    if isinstance(exc, BrowserFailure):
        return exc
    if isinstance(exc, ray.exceptions.ActorUnavailableError):
        return ActorUnreachable(browser_id, FailureCategory.CONNECTION, "browser actor unreachable")
    if isinstance(exc, ray.exceptions.RayActorError):
        return BrowserFailure(browser_id, FailureCategory.CRASH, "browser actor process died")
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return BrowserFailure(browser_id, FailureCategory.TIMEOUT, "no answer within the budget")
    return BrowserFailure(browser_id, FailureCategory.UNKNOWN, describe(exc))


def plan_steps(config: FaultToleranceConfig, category: FailureCategory, circuit_open: bool,
               warm_standby: bool = False, reachable: bool = True) -> list[str]:
    """The ordered recovery steps for a failure. ``parallel`` is expressed as one step, "parallel".

    ``circuit_open``: the browser failed too often; do not try to revive it, move its work.
    ``warm_standby``: a standby browser is up (level high): progressive escalates from reconnect to
    failover onto it, which is cheaper than a restart, and restarts only if that fails.
    ``reachable``: False when the browser's actor itself did not answer (ActorUnreachable): progressive
    then skips reconnect, itself a call to that actor (on a vanished node it only waits to fail).
    A TIMEOUT starts with ``resume`` (the hung script was terminated; see the module docstring).
    """
    if config.level is FaultToleranceLevel.NONE:
        return []
    resume = ["resume"] if category is FailureCategory.TIMEOUT and reachable else []
    if config.level is FaultToleranceLevel.LOW:
        return [] if circuit_open else [*resume, "reconnect"]
    if circuit_open:
        return ["failover"]
    strategy = config.recovery_strategy
    steps: list[str] = resume
    if strategy is RecoveryStrategy.PARALLEL:
        return [*steps, "parallel"]
    if strategy in (RecoveryStrategy.PROGRESSIVE, RecoveryStrategy.COORDINATED):
        if category in (FailureCategory.CONNECTION, FailureCategory.TIMEOUT) and reachable:
            steps.append("reconnect")
        return [*steps, "failover", "restart"] if warm_standby else [*steps, "restart", "failover"]
    return [*steps, strategy.value]


def retry_delay(failures: int, recovered: bool, backoff_s: float) -> float:
    """Seconds a request waits before its next attempt, after ``failures`` failed ones. The first retry
    after a recovery that succeeded goes at once (the failed browser's work has a new home, and waiting
    only adds to what the caller sees); otherwise exponential backoff, ``backoff_s * 2**(failures-1)``."""
    if failures == 1 and recovered:
        return 0.0
    return backoff_s * 2 ** (failures - 1)


@dataclass(frozen=True)
class Candidate:
    browser_id: str
    standby: bool
    holds: int          # how many of the needed artifacts it already holds
    in_flight: int


def pick_failover_target(candidates: list[Candidate]) -> str | None:
    """A warm standby holding the most models first, then the live browser holding most, least busy."""
    if not candidates:
        return None
    best = max(candidates, key=lambda c: (c.holds, c.standby, -c.in_flight, c.browser_id))
    return best.browser_id
