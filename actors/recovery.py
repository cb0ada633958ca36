"""Recovery, carried out: the executor runs the steps that ``actors.decisions.recovery.plan_steps`` chose
on real actors, through the fleet, and records each step as an event (RecoveryStarted, one
RecoveryStepFinished per step, RecoveryCompleted).

Only the reconcile loop (actors/reconcile.py) starts recoveries; requests, health checks and the shard
coordinator report failures to it and await the outcome.

The steps, each returning the id of the browser now serving the failed one's work:
- resume:    after a hang its time budget ended (the page's script terminated): the same page and
             connection go on if the page answers and no run was cut off mid-way.
- reconnect: re-attach over CDP to the same, still running browser; its page (and models) are kept.
- restart:   a new browser process under the same id; the models the log says it held are loaded again.
- failover:  another browser (a warm standby first, then a live one, else a new one) takes the failed
             browser's models, replayed from the log; the failed browser is retired. When that browser
             holds every model already, the whole recovery (started, promotion, retirement, step,
             completed) is one append to the log: the work waiting for it goes on three round trips sooner.
- parallel:  all three at once; the first success wins. A fast failure does not cancel the others;
             browsers the losers bring up stay in the pool (a restarted or failover browser holding
             the models serves as capacity), failed attempts are cleaned up.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from actors.constants import RECOVERY_STEP_TIMEOUT, RESUME_TIMEOUT
from actors.decisions.recovery import (
    Candidate,
    FaultToleranceConfig,
    FaultToleranceLevel,
    pick_failover_target,
    plan_steps,
)
from actors.fleet import Fleet
from events import schema as ev
from events.errors import ActorUnreachable, BrowserFailure, RecoveryStepError, describe
from events.state import CLOSED_STATUSES, browsers_alive
from sharding.models.registry import ModelArtifact

log = logging.getLogger(__name__)


class RecoveryExecutor:
    """Carries out recovery plans through the fleet; every step is an event in the log.

    It keeps one map in memory: the recoveries under way (their tasks, and the artifact keys each
    restores), so a request can wait for a recovery that brings its model back. The recoveries
    themselves are in the log (``PoolState.recoveries``).
    """

    def __init__(self, fleet: Fleet, config: FaultToleranceConfig,
                 spawn: Callable[[Awaitable[Any]], asyncio.Future]) -> None:
        self.fleet = fleet
        self.log = fleet.log
        self.config = config
        self._spawn = spawn
        # browser -> its recovery under way, and the artifact keys the browser held when it started
        self._running: dict[str, tuple[asyncio.Task, frozenset[str]]] = {}

    @property
    def recovering(self) -> frozenset[str]:
        return frozenset(b for b, (t, _) in self._running.items() if not t.done())

    def restoring(self, key: str, avoid: frozenset[str] = frozenset()) -> list[asyncio.Future]:
        """The recoveries under way that bring artifact ``key`` back (of browsers not in ``avoid``). The keys
        are taken when a recovery starts: a restart's relaunch drops them from the state until reloaded."""
        return [t for b, (t, keys) in self._running.items() if b not in avoid and not t.done() and key in keys]

    def run(self, failure: BrowserFailure, config: FaultToleranceConfig | None = None,
            retire_if_not_recovered: bool = True) -> Awaitable[dict[str, Any]]:
        """Recover ``failure.browser_id`` once, however many callers report it at the same time.

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
            task = asyncio.ensure_future(self._recover(failure, config or self.config, retire_if_not_recovered))
            self._running[browser_id] = running = (task, self.fleet.keys_on(browser_id))
            task.add_done_callback(lambda _t: self._running.pop(browser_id, None))
        return asyncio.shield(running[0])

    async def _recover(self, failure: BrowserFailure, config: FaultToleranceConfig,
                       retire_if_not_recovered: bool) -> dict[str, Any]:
        browser_id = failure.browser_id
        state = self.log.state.browsers.get(browser_id)
        if state is None or state.status in CLOSED_STATUSES:
            # Already replaced by an earlier recovery (or never started): the work is wherever the log says.
            return {"success": True, "browser_id": browser_id, "recovery_browser": None, "strategy": "none",
                    "steps": [], "duration_ms": 0.0, "error": None}
        if state.status == "failed" and state.replaced_by is not None:
            # Its failure was recovered a moment ago (another browser took its work) and it is only waiting to
            # be retired (parallel's losers finish first): a late report of the same failure changes nothing.
            return {"success": True, "browser_id": browser_id, "recovery_browser": state.replaced_by,
                    "strategy": "none", "steps": [], "duration_ms": 0.0, "error": None}
        circuit_open = state.failures > config.max_recovery_attempts
        warm_standby = any(b.standby and b.browser_id != browser_id for b in browsers_alive(self.log.state))
        steps = plan_steps(config, failure.category, circuit_open, warm_standby,
                           reachable=not isinstance(failure, ActorUnreachable))
        recovery_id = uuid.uuid4().hex[:12]
        attempt = state.failures
        strategy = config.recovery_strategy.value if config.level is not FaultToleranceLevel.LOW else "reconnect"
        t0 = time.perf_counter()
        # Records of this recovery not appended yet: they go with its next append. A failover to a browser that
        # holds every model already adds its own, so such a recovery is one append, not four round trips.
        deferred: list[ev.Event] = [ev.RecoveryStarted(recovery_id=recovery_id, browser_id=browser_id,
                                                       strategy=strategy, attempt=max(attempt, 1),
                                                       category=failure.category.value)]
        serving: str | None = None
        error: str | None = "no recovery step applies" if not steps else None
        done: list[str] = []
        for step in steps:
            s0 = time.perf_counter()
            try:
                if step == "failover":                 # appends the deferred records itself, or adds to them
                    serving = await asyncio.wait_for(self.failover(browser_id, deferred), RECOVERY_STEP_TIMEOUT)
                else:
                    await self._append(deferred)       # before any record the step makes itself
                    if step == "parallel":
                        serving, winner = await asyncio.wait_for(self._parallel(browser_id), RECOVERY_STEP_TIMEOUT)
                        step = f"parallel:{winner}"
                    else:
                        serving = await asyncio.wait_for(self._step(step, browser_id),
                                                         RESUME_TIMEOUT if step == "resume" else RECOVERY_STEP_TIMEOUT)
                ok, error = True, None
            except Exception as exc:   # a failed step is recorded and the plan goes on
                ok, error = False, describe(exc)
                log.warning("recovery step failed", extra={"browser_id": browser_id, "step": step, "error": error})
            done.append(step)
            finished = ev.RecoveryStepFinished(recovery_id=recovery_id, step=step, success=ok,
                                               duration_ms=(time.perf_counter() - s0) * 1000, error=error)
            if ok:
                break
            await self._append(deferred, finished)
        else:
            finished = None
        duration_ms = (time.perf_counter() - t0) * 1000
        success = serving is not None
        # The winning step and the completion in one record: the work waiting for them goes on a round trip sooner.
        await self._append(deferred, *([finished] if finished is not None else []),
                           ev.RecoveryCompleted(recovery_id=recovery_id, browser_id=browser_id, success=success,
                                                replacement=serving, duration_ms=duration_ms))
        if not success and retire_if_not_recovered:
            # Nothing revived it: a failed browser must not linger with a live actor and its processes.
            # Its models stay known through the log; the next request places them elsewhere.
            await self.fleet.retire(browser_id, f"not recovered: {error}"[:500])
        return {"success": success, "browser_id": browser_id, "recovery_browser": serving, "strategy": strategy,
                "steps": done, "duration_ms": duration_ms, "error": error}

    async def _append(self, deferred: list[ev.Event], *events: ev.Event) -> None:
        """Append ``deferred`` (emptied) and ``events`` in one record; a browser retired among them is stopped
        once its retirement is in the log."""
        records, deferred[:] = [*deferred, *events], []
        if records:
            await self.log.record(*records)
        for e in records:
            if isinstance(e, ev.BrowserRetired):
                self.fleet.stop_soon(e.browser_id)

    async def _step(self, step: str, browser_id: str) -> str:
        return await {"resume": self.resume, "reconnect": self.reconnect, "restart": self.restart}[step](browser_id)

    # ----- the steps: each returns the id of the browser now serving the failed one's work -----
    async def resume(self, browser_id: str) -> str:
        return await self._same_page(browser_id, self.fleet.handle(browser_id).resume, "resumed")

    async def reconnect(self, browser_id: str) -> str:
        return await self._same_page(browser_id, self.fleet.handle(browser_id).reconnect, "reconnected")

    async def _same_page(self, browser_id: str, method: Any, done: str) -> str:
        """Resume or reconnect: the same page goes on, and must still hold every model the log says it does."""
        result = await method.remote()
        missing = self.fleet.keys_on(browser_id) - set(result["models"])
        if missing:
            raise RecoveryStepError(f"{done}, but the page lost {sorted(missing)}")
        await self.log.record(ev.BrowserConnected(browser_id=browser_id))
        return browser_id

    async def restart(self, browser_id: str) -> str:
        """New browser process, same id; the models the log says it held are loaded again."""
        needed = await self.fleet.artifacts_on(browser_id)
        await self.fleet.relaunch(browser_id)
        for art in needed:
            await self.fleet.load(browser_id, art)
        return browser_id

    async def _failover_target(self, browser_id: str) -> str | None:
        """The best other live browser to take ``browser_id``'s models (see pick_failover_target)."""
        keys = {a.key for a in await self.fleet.artifacts_on(browser_id)}
        return pick_failover_target([
            Candidate(b.browser_id, b.standby, len(keys & self.fleet.keys_on(b.browser_id)),
                      self.fleet.leased(b.browser_id))
            for b in browsers_alive(self.log.state) if b.browser_id != browser_id and not b.draining
        ])

    def _promotion(self, target: str) -> list[ev.Event]:
        """A standby taking over serves traffic from now on (the reconcile loop warms another spare)."""
        return [ev.BrowserRoleChanged(browser_id=target, standby=False)] if self.log.state.browsers[target].standby \
            else []

    async def _promote(self, target: str) -> None:
        if promotion := self._promotion(target):
            await self.log.record(*promotion)

    async def _load_missing(self, target: str, needed: list[ModelArtifact]) -> None:
        for art in needed:
            await self.fleet.ensure_loaded(target, art)

    async def failover(self, browser_id: str, deferred: list[ev.Event] | None = None) -> str:
        """Move the failed browser's models to another browser; retire the failed one. ``deferred``: the
        recovery's records not appended yet. A target that holds every model already adds its promotion and the
        retirement to them (the recovery appends them with its completion); otherwise they are appended first."""
        needed = await self.fleet.artifacts_on(browser_id)
        target = await self._failover_target(browser_id)
        if target is not None and self.log.state.browsers[target].standby:
            self.fleet.serving_soon(target)
        if deferred is not None and target is not None and all(a.key in self.fleet.keys_on(target) for a in needed):
            deferred += [*self._promotion(target), *self.fleet.retirement(browser_id, f"failed over to {target}")]
            return target
        if deferred:
            await self._append(deferred)
        if target is None:
            target = await self.fleet.launch(self.log.state.browsers[browser_id].browser_type)
        await self._promote(target)
        await self._load_missing(target, needed)
        await self.fleet.retire(browser_id, f"failed over to {target}")
        return target

    async def fresh_browser(self, browser_id: str) -> str:
        """Parallel's restart: a new browser process (a new actor, launched as a spare) with the models."""
        needed = await self.fleet.artifacts_on(browser_id)
        target = await self.fleet.launch(self.log.state.browsers[browser_id].browser_type, standby=True)
        await self._load_missing(target, needed)
        return target

    async def existing_browser(self, browser_id: str) -> str:
        """Parallel's failover: another browser already running takes the models (none: fail fast)."""
        target = await self._failover_target(browser_id)
        if target is None:
            raise RecoveryStepError("no other browser is running")
        await self._promote(target)
        await self._load_missing(target, await self.fleet.artifacts_on(browser_id))
        return target

    async def _parallel(self, browser_id: str) -> tuple[str, str]:
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
        settle = self._spawn(self._settle_parallel(browser_id, tasks, winner))
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
        state = self.log.state.browsers.get(browser_id)
        if not revived and state is not None and state.status == "failed":
            await self.fleet.retire(browser_id, "not revived by parallel recovery")
        for name, result in by_name.items():
            if isinstance(result, BaseException):
                log.info("parallel recovery attempt lost", extra={"step": name, "error": str(result)})
        fresh = by_name["restart"]
        spares = [b for b in browsers_alive(self.log.state) if b.standby]
        if (not isinstance(fresh, BaseException) and (winner is None or winner[0] != fresh)
                and len(spares) > max(self.config.standby_browsers, 1)):
            # A losing fresh browser is kept as a warm spare, but never more spares than configured.
            await self.fleet.retire(fresh, "parallel recovery: spare not needed")
