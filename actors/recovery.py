"""Fault tolerance: configuration, failure classification, and the five recovery strategies.

The decisions are pure functions (``FaultToleranceConfig.from_options``, ``classify``,
``plan_steps``, ``pick_failover_target``); ``RecoveryExecutor`` carries a plan out on real actors
and records each step as an event:

- reconnect: re-attach over CDP to the same, still running browser; its page (and models) are kept.
- restart:   a new browser process in the same actor (or a new actor if the process is gone), then
             the models the log says the browser held are loaded again (replayed from the log).
- failover:  another browser (a warm standby first, then a live one, else a new one) gets the failed
             browser's models, replayed from the log; the failed browser is retired.
- progressive: reconnect -> restart -> failover, as in the guide (reconnect only for CONNECTION and
             TIMEOUT failures: a crashed page has nothing to reconnect to).
- parallel:  all three at once; the first success wins. A fast failure does not cancel the others;
             browsers the losers bring up stay in the pool (a restarted or failover browser holding
             the models serves as capacity), failed attempts are cleaned up.
WebGPU device loss is first recovered in place: a new device and the sessions created again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import ray

from actors.constants import RECOVERY_STEP_TIMEOUT
from actors.errors import ActorUnreachable, BrowserFailure, FailureCategory, InputError
from events import schema as ev

if TYPE_CHECKING:
    from actors.pool import PoolCore

log = logging.getLogger(__name__)


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
    checkpoint_interval: float = 60.0        # seconds between log snapshots (level high and up)
    max_recovery_attempts: int = 3           # per request, and failures before a browser's circuit opens
    standby_browsers: int = 1                # warm spares at level high and up
    vote_k: int = 3                          # browsers per request at level critical
    vote_cosine: float = 0.999               # embeddings agree when cosine >= this
    backoff_s: float = 0.05                  # before attempt n: backoff_s * 2**(n-1)
    shadow_shards: bool = True               # level high and up: each shard of a sharded generation has a shadow

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
        if not isinstance(options.get("shadow_shards", True), bool):
            raise InputError("fault_tolerance.shadow_shards", f"must be a bool, got {options['shadow_shards']!r}")
        for name in ("max_recovery_attempts", "standby_browsers", "vote_k"):
            value = options.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InputError(f"fault_tolerance.{name}", f"must be an int >= 0, got {value!r}")
        return cls(level=level, recovery_strategy=strategy, **options)

    @property
    def recovers(self) -> bool:
        return self.level is not FaultToleranceLevel.NONE

    def shadows(self, shards: int) -> bool:
        """Whether a generation over ``shards`` browsers runs each shard on a shadow too (level high and up):
        a shard failure then costs no prefix re-run, for a second forward per shard per step."""
        return (shards > 1 and self.shadow_shards
                and self.level in (FaultToleranceLevel.HIGH, FaultToleranceLevel.CRITICAL))


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
    return BrowserFailure(browser_id, FailureCategory.UNKNOWN, f"{type(exc).__name__}: {exc}")


def plan_steps(config: FaultToleranceConfig, category: FailureCategory, circuit_open: bool,
               warm_standby: bool = False, reachable: bool = True) -> list[str]:
    """The ordered recovery steps for a failure. ``parallel`` is expressed as one step, "parallel".

    ``circuit_open``: the browser failed too often; do not try to revive it, move its work.
    ``warm_standby``: a standby browser is up (level high): progressive escalates from reconnect to
    failover onto it, which is cheaper than a restart, and restarts only if that fails.
    ``reachable``: False when the browser's actor itself did not answer (ActorUnreachable): progressive
    then skips reconnect, itself a call to that actor (on a vanished node it only waits to fail).
    """
    if config.level is FaultToleranceLevel.NONE:
        return []
    if config.level is FaultToleranceLevel.LOW:
        return [] if circuit_open else ["reconnect"]
    if circuit_open:
        return ["failover"]
    strategy = config.recovery_strategy
    steps: list[str] = ["reinit_device"] if category is FailureCategory.DEVICE_LOST else []
    if strategy is RecoveryStrategy.PARALLEL:
        return [*steps, "parallel"]
    if strategy in (RecoveryStrategy.PROGRESSIVE, RecoveryStrategy.COORDINATED):
        if category in (FailureCategory.CONNECTION, FailureCategory.TIMEOUT) and reachable:
            steps.append("reconnect")
        return [*steps, "failover", "restart"] if warm_standby else [*steps, "restart", "failover"]
    return [*steps, strategy.value]


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


class RecoveryStepError(RuntimeError):
    """A recovery step ran but did not bring the browser's work back."""


class RecoveryExecutor:
    """Carries out recovery plans on a pool's actors; every step is an event in the log."""

    def __init__(self, pool: PoolCore) -> None:
        self.pool = pool
        # browser -> its recovery under way, and the artifact keys the browser held when it started
        self._running: dict[str, tuple[asyncio.Task, frozenset[str]]] = {}

    def restoring(self, key: str, avoid: frozenset[str] = frozenset()) -> list[asyncio.Future]:
        """The recoveries under way that bring artifact ``key`` back (of browsers not in ``avoid``). The keys
        are taken when a recovery starts: a restart's relaunch drops them from the state until reloaded."""
        return [t for b, (t, keys) in self._running.items() if b not in avoid and not t.done() and key in keys]

    def recover(self, failure: BrowserFailure, config: FaultToleranceConfig | None = None,
                retire_if_not_recovered: bool = True) -> Awaitable[dict[str, Any]]:
        """Recover ``failure.browser_id`` once, however many requests saw it fail at the same time.

        The recovery is registered (``restoring`` sees it) before this returns, not when it is first
        awaited: a request placed meanwhile waits for it instead of loading the model elsewhere.

        A browser nothing revived is retired, unless ``retire_if_not_recovered`` is False: a caller that
        escalates by itself (the guide's progressive: reconnect, then restart) needs it left failed.

        Resolves to the guide's result dict: success, browser_id, recovery_browser (the browser now
        serving its work), strategy, steps, duration_ms, error.
        """
        browser_id = failure.browser_id
        running = self._running.get(browser_id)
        if running is None:
            task = asyncio.ensure_future(self._recover(failure, config or self.pool.ft, retire_if_not_recovered))
            self._running[browser_id] = running = (task, self.pool._keys_on(browser_id))
            task.add_done_callback(lambda _t: self._running.pop(browser_id, None))
        return asyncio.shield(running[0])

    async def _recover(self, failure: BrowserFailure, config: FaultToleranceConfig,
                       retire_if_not_recovered: bool) -> dict[str, Any]:
        pool = self.pool
        browser_id = failure.browser_id
        state = pool.state.browsers.get(browser_id)
        if state is None or state.status in ("retired", "quarantined"):
            # Already replaced by an earlier recovery: the work is wherever the log says.
            return {"success": True, "browser_id": browser_id, "recovery_browser": None, "strategy": "none",
                    "steps": [], "duration_ms": 0.0, "error": None}
        circuit_open = state.failures > config.max_recovery_attempts
        warm_standby = any(b.standby and b.browser_id != browser_id for b in pool._alive_states())
        steps = plan_steps(config, failure.category, circuit_open, warm_standby,
                           reachable=not isinstance(failure, ActorUnreachable))
        recovery_id = uuid.uuid4().hex[:12]
        attempt = state.failures
        strategy = config.recovery_strategy.value if config.level is not FaultToleranceLevel.LOW else "reconnect"
        t0 = time.perf_counter()
        await pool._record(ev.RecoveryStarted(recovery_id=recovery_id, browser_id=browser_id, strategy=strategy,
                                              attempt=max(attempt, 1), category=failure.category.value))
        serving: str | None = None
        error: str | None = "no recovery step applies" if not steps else None
        done: list[str] = []
        for step in steps:
            s0 = time.perf_counter()
            try:
                if step == "parallel":
                    serving, winner = await asyncio.wait_for(self._parallel(recovery_id, browser_id),
                                                             RECOVERY_STEP_TIMEOUT)
                    step = f"parallel:{winner}"
                else:
                    serving = await asyncio.wait_for(self._step(step, browser_id), RECOVERY_STEP_TIMEOUT)
                ok, error = True, None
            except Exception as exc:   # a failed step is recorded and the plan goes on
                ok, error = False, f"{type(exc).__name__}: {exc}"[:500]
                log.warning("recovery step failed", extra={"browser_id": browser_id, "step": step, "error": error})
            done.append(step)
            await pool._record(ev.RecoveryStepFinished(recovery_id=recovery_id, step=step, success=ok,
                                                       duration_ms=(time.perf_counter() - s0) * 1000, error=error))
            if ok:
                break
        duration_ms = (time.perf_counter() - t0) * 1000
        success = serving is not None
        await pool._record(ev.RecoveryCompleted(recovery_id=recovery_id, browser_id=browser_id, success=success,
                                                replacement=serving, duration_ms=duration_ms))
        if not success and retire_if_not_recovered:
            # Nothing revived it: a failed browser must not linger with a live actor and its processes.
            # Its models stay known through the log; the next request places them elsewhere.
            await pool._retire(browser_id, f"not recovered: {error}"[:500])
        return {"success": success, "browser_id": browser_id, "recovery_browser": serving, "strategy": strategy,
                "steps": done, "duration_ms": duration_ms, "error": error}

    async def _step(self, step: str, browser_id: str) -> str:
        return await {"reconnect": self.reconnect, "restart": self.restart, "failover": self.failover,
                      "reinit_device": self.reinit_device}[step](browser_id)

    # ----- the steps: each returns the id of the browser now serving the failed one's work -----
    async def reconnect(self, browser_id: str) -> str:
        pool = self.pool
        result = await pool._handles[browser_id].reconnect.remote()
        missing = pool._keys_on(browser_id) - set(result["models"])
        if missing:
            raise RecoveryStepError(f"reconnected, but the page lost {sorted(missing)}")
        await pool._record(ev.BrowserConnected(browser_id=browser_id))
        return browser_id

    async def reinit_device(self, browser_id: str) -> str:
        pool = self.pool
        await pool._handles[browser_id].reinit_device.remote()
        await pool._record(ev.BrowserConnected(browser_id=browser_id))
        return browser_id

    async def restart(self, browser_id: str) -> str:
        """New browser process, same id; the models the log says it held are loaded again."""
        pool = self.pool
        needed = pool._artifacts_on(browser_id)
        standby = pool.state.browsers[browser_id].standby
        handle = pool._handles[browser_id]
        try:
            info = await handle.restart.remote()
            await pool._record_launch(browser_id, handle, info, standby)
        except ray.exceptions.RayActorError:
            # The actor process itself is gone (or its node): a new actor takes the same id, elsewhere
            # if the old node is dead.
            ray.kill(handle)
            await pool._start_browser(browser_id, pool.state.browsers[browser_id].browser_type, standby)
        for art in needed:
            await pool._load(browser_id, art)
        return browser_id

    def _failover_target(self, browser_id: str) -> str | None:
        """The best other live browser to take ``browser_id``'s models (see pick_failover_target)."""
        pool = self.pool
        keys = {a.key for a in pool._artifacts_on(browser_id)}
        return pick_failover_target([
            Candidate(b.browser_id, b.standby, len(keys & pool._keys_on(b.browser_id)),
                      pool._in_flight.get(b.browser_id, 0))
            for b in pool._alive_states() if b.browser_id != browser_id and not b.draining
        ])

    async def _promote(self, target: str) -> None:
        """A standby taking over serves traffic from now on; another spare is warmed in its place."""
        if self.pool.state.browsers[target].standby:
            await self.pool._record(ev.BrowserRoleChanged(browser_id=target, standby=False))
            self.pool._replenish_standby()

    async def _load_missing(self, target: str, needed: list) -> None:
        for art in needed:
            if art.key not in self.pool._keys_on(target):
                await self.pool._load(target, art)

    async def failover(self, browser_id: str, retire: bool = True) -> str:
        """Move the failed browser's models to another browser; retire the failed one."""
        pool = self.pool
        needed = pool._artifacts_on(browser_id)
        target = self._failover_target(browser_id)
        if target is None:
            target = await pool._launch(pool.state.browsers[browser_id].browser_type)
        await self._promote(target)
        await self._load_missing(target, needed)
        if retire:
            await pool._retire(browser_id, f"failed over to {target}")
        return target

    async def fresh_browser(self, browser_id: str) -> str:
        """Parallel's restart: a new browser process (a new actor, launched as a spare) with the models."""
        pool = self.pool
        needed = pool._artifacts_on(browser_id)
        target = await pool._launch(pool.state.browsers[browser_id].browser_type, standby=True)
        await self._load_missing(target, needed)
        return target

    async def existing_browser(self, browser_id: str) -> str:
        """Parallel's failover: another browser already running takes the models (none: fail fast)."""
        target = self._failover_target(browser_id)
        if target is None:
            raise RecoveryStepError("no other browser is running")
        await self._promote(target)
        await self._load_missing(target, self.pool._artifacts_on(browser_id))
        return target

    async def _parallel(self, recovery_id: str, browser_id: str) -> tuple[str, str]:
        """Reconnect, a fresh browser and an existing browser at once; the first success wins.

        A fast failure does not cancel the others. Losers run to completion: a fresh browser that
        loses stays as a warm spare, and the failed browser is retired unless reconnect revived it.
        """
        attempts: dict[str, Callable[[], Awaitable[str]]] = {
            "reconnect": lambda: self.reconnect(browser_id),
            "restart": lambda: self.fresh_browser(browser_id),
            "failover": lambda: self.existing_browser(browser_id),
        }
        tasks = {asyncio.ensure_future(fn()): name for name, fn in attempts.items()}
        winner: tuple[str, str] | None = None
        errors: list[str] = []
        pending = set(tasks)
        while pending and winner is None:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                if task.exception() is None and winner is None:
                    winner = (task.result(), tasks[task])
                elif task.exception() is not None:
                    errors.append(f"{tasks[task]}: {task.exception()}")
        settle = asyncio.ensure_future(self._settle_parallel(browser_id, tasks, winner))
        self.pool._background.add(settle)
        settle.add_done_callback(self.pool._background.discard)
        if winner is None:
            await settle
            raise RecoveryStepError("; ".join(errors) or "all parallel attempts failed")
        if winner[1] == "restart":
            await self._promote(winner[0])
        return winner

    async def _settle_parallel(self, browser_id: str, tasks: dict, winner: tuple[str, str] | None) -> None:
        results = await asyncio.gather(*tasks, return_exceptions=True)
        by_name = {tasks[t]: r for t, r in zip(tasks, results, strict=True)}
        revived = not isinstance(by_name["reconnect"], BaseException)
        state = self.pool.state.browsers.get(browser_id)
        if not revived and state is not None and state.status == "failed":
            await self.pool._retire(browser_id, "not revived by parallel recovery")
        for name, result in by_name.items():
            if isinstance(result, BaseException):
                log.info("parallel recovery attempt lost", extra={"step": name, "error": str(result)})
        fresh = by_name["restart"]
        spares = [b for b in self.pool._alive_states() if b.standby]
        if (not isinstance(fresh, BaseException) and (winner is None or winner[0] != fresh)
                and len(spares) > max(self.pool.ft.standby_browsers, 1)):
            # A losing fresh browser is kept as a warm spare, but never more spares than configured.
            await self.pool._retire(fresh, "parallel recovery: spare not needed")
