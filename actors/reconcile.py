"""The pool's one control loop: observe -> decide -> execute -> record.

Guarantees:
- Every recovery starts here (``report``): requests, voting, health checks, the node check, deferred
  recoveries and the shard coordinator report a failure and await the outcome; none recovers on its own.
  A browser is recovered once however many report it at the same time.
- What the loop does is decided by ``actors.decisions.reconcile.decide``, a pure function of the
  projected state and what the loop observed; each action it executes is recorded as events.
- The loop wakes when the log records something it acts on (a model loaded, a browser promoted,
  failed or retired, a session closed) and otherwise on its timers (health checks every
  ``health_interval`` at levels >= medium, checkpoints every ``checkpoint_interval`` at levels >= high,
  scale-down checks with ``adaptive_scaling``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from actors.constants import HEALTH_TIMEOUT, STANDBY_DEFER_S
from actors.decisions import adaptive
from actors.decisions.reconcile import (
    Action,
    CheckHealth,
    Checkpoint,
    KeepStandby,
    Observations,
    Policy,
    Recover,
    ScaleDown,
    decide,
    hot_keys,
    warm_keys_on,
)
from actors.decisions.recovery import FaultToleranceConfig, classify
from actors.fleet import Fleet, KeyedLocks
from actors.recovery import RecoveryExecutor
from events import schema as ev
from events.errors import ActorUnreachable, BrowserFailure
from events.state import browsers_alive

log = logging.getLogger(__name__)

# Kinds after which the loop looks again at once (standby upkeep, deferred recoveries).
WAKE_KINDS = frozenset({"ModelLoaded", "BrowserRoleChanged", "BrowserFailed", "BrowserRetired",
                        "BrowserQuarantined", "BrowserLaunched", "SessionClosed"})


class Reconciler:
    def __init__(self, fleet: Fleet, config: FaultToleranceConfig, locks: KeyedLocks,
                 spawn: Callable[[Awaitable[Any]], asyncio.Future], *, health_interval: float,
                 adaptive_scaling: bool, scale_down_idle_s: float, standby_type: Callable[[], str],
                 until_no_requests: Callable[[float], Awaitable[bool]]) -> None:
        self.fleet = fleet
        self.log = fleet.log
        self.config = config
        self.locks = locks
        self._spawn = spawn
        self.recovery = RecoveryExecutor(fleet, config, spawn)
        self.health_interval = health_interval
        self.adaptive_scaling = adaptive_scaling
        self.scale_down_idle_s = scale_down_idle_s
        self._standby_type = standby_type
        self._until_no_requests = until_no_requests
        self.policy = Policy(recovers=config.recovers,
                             standby_browsers=config.standby_browsers if config.keeps_standby else 0)
        self._wake = asyncio.Event()
        self._standby_task: asyncio.Future | None = None
        self._checking: dict[str, asyncio.Future] = {}
        self.closed = False
        self.log.watch(self._on_record)

    def _on_record(self, rec: ev.Recorded) -> None:
        if rec.kind in WAKE_KINDS:
            self._wake.set()

    # ----- the one entry into recovery --------------------------------------------------------------
    async def report(self, failure: BrowserFailure, config: FaultToleranceConfig | None = None,
                     retire_if_not_recovered: bool = True) -> dict[str, Any]:
        """A browser failed: record it (once) and recover it by ``config`` (the pool's by default).

        Resolves to the recovery's result dict (see RecoveryExecutor.run). At level none, or once the
        pool is closing, the failure is recorded and nothing is recovered.
        """
        await self.fleet.mark_failed(failure)
        config = config or self.config
        if not config.recovers or self.closed:
            return {"success": False, "browser_id": failure.browser_id, "recovery_browser": None,
                    "strategy": "none", "steps": [], "duration_ms": 0.0,
                    "error": "not recovered: " + ("the pool is closing" if self.closed
                                                  else "fault tolerance level is none")}
        return await self.recovery.run(failure, config, retire_if_not_recovered)

    def report_soon(self, failure: BrowserFailure) -> None:
        """``report`` without waiting for the outcome (a caller that goes on without the browser)."""
        self._spawn(self.report(failure))

    # ----- the loop ----------------------------------------------------------------------------------
    async def run(self) -> None:
        now = time.monotonic()
        health_every = self.health_interval if self.config.checks_health else None
        checkpoint_every = self.config.checkpoint_interval if self.config.checkpoints else None
        scale_every = min(1.0, self.scale_down_idle_s / 4) if self.adaptive_scaling else None
        due = {name: now + every for name, every in (("health", health_every), ("checkpoint", checkpoint_every),
                                                     ("scale", scale_every)) if every is not None}
        every = {"health": health_every, "checkpoint": checkpoint_every, "scale": scale_every}
        while not self.closed:
            wait = min(due.values(), default=now + 60.0) - time.monotonic()
            if wait > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            self._wake.clear()
            now = time.monotonic()
            fired = {name for name, t in due.items() if t <= now}
            for name in fired:
                due[name] = now + every[name]
            try:
                await self.reconcile(fired)
            except Exception as exc:   # one bad pass (the GCS briefly unreachable...) must not end the loop
                log.warning("reconcile pass failed", extra={"error": f"{type(exc).__name__}: {exc}"})

    async def reconcile(self, fired: set[str] = frozenset()) -> list[Action]:
        """One pass: observe, decide, execute. Returns the actions it executed."""
        seen = Observations(
            alive_nodes=await self._alive_nodes() if "health" in fired else None,
            leases=self.fleet.leases,
            recovering=self.recovery.recovering,
            health_due="health" in fired,
            checkpoint_due="checkpoint" in fired,
            standby_busy=self._standby_task is not None and not self._standby_task.done(),
            checking=frozenset(b for b, t in self._checking.items() if not t.done()),
            scale_down_due="scale" in fired,
        )
        actions = decide(self.log.state, seen, self.policy)
        for action in actions:
            await self._execute(action)
        return actions

    async def _alive_nodes(self) -> frozenset[str] | None:
        try:
            return frozenset(n.node_id for n in await self.fleet.node_views())
        except Exception as exc:     # the GCS may be briefly unreachable: the browser checks still run
            log.warning("node check failed", extra={"error": str(exc)})
            return None

    async def _execute(self, action: Action) -> None:
        if isinstance(action, Recover):
            kind = ActorUnreachable if action.unreachable else BrowserFailure
            self.report_soon(kind(action.browser_id, action.category, action.detail))
        elif isinstance(action, CheckHealth):
            if self.fleet.has_handle(action.browser_id):
                self._checking[action.browser_id] = self._spawn(self.check(action.browser_id))
        elif isinstance(action, KeepStandby):
            self._standby_task = self._spawn(self._keep_standby())
        elif isinstance(action, ScaleDown):
            await self._scale_down()
        elif isinstance(action, Checkpoint):
            try:
                await self.log.checkpoint()
            except Exception as exc:
                log.warning("checkpoint failed", extra={"error": str(exc)})

    # ----- executing actions -------------------------------------------------------------------------
    async def check(self, browser_id: str) -> dict[str, Any]:
        """The browser's own health report; a failure to answer is reported (and so recovered)."""
        try:
            report = await asyncio.wait_for(self.fleet.handle(browser_id).health.remote(), HEALTH_TIMEOUT * 2)
        except Exception as exc:    # whatever the browser answers instead of a health report is a failure
            failure = classify(exc, browser_id)
            self.report_soon(failure)
            return {"error": str(failure), "category": failure.category.value}
        async with self.locks(f"blocked:{browser_id}"):
            state = self.log.state.browsers.get(browser_id)
            new = report["blocked_requests"] - (state.blocked_requests if state is not None else 0)
            if state is not None and new > 0:
                log.warning("page attempted outside requests", extra={"browser_id": browser_id, "count": new})
                await self.log.record(ev.PageRequestsBlocked(browser_id=browser_id, count=new,
                                                             urls=tuple(report["blocked_urls"][-new:])))
        return report

    async def _keep_standby(self) -> None:
        """Keep ``standby_browsers`` warm spares holding every model that serves traffic now, each warmed up
        (actors/decisions/warmup.py) so the first request a spare takes runs at full speed."""
        try:
            while not self.closed:
                state = self.log.state
                hot = hot_keys(state)
                spares = [b for b in browsers_alive(state) if b.standby]
                if len(spares) < self.policy.standby_browsers:
                    # A new browser's start-up, model load and warm-up take seconds of CPU: requests in flight
                    # (a failed-over request's rerun among them) go first, for at most STANDBY_DEFER_S.
                    await self._until_no_requests(STANDBY_DEFER_S)
                    await self.fleet.launch(self._standby_type(), standby=True)
                    continue
                cold = [(b.browser_id, key) for b in spares for key in sorted(hot - warm_keys_on(state, b.browser_id))]
                if not cold:
                    return
                for browser_id, key in cold:
                    art = await self.fleet.artifact_by_key(key)
                    await self.fleet.ensure_loaded(browser_id, art)
                    await self.fleet.warm_up(browser_id, art)
        except Exception as exc:
            log.warning("standby replenishment failed", extra={"error": str(exc)})

    async def _scale_down(self) -> None:
        """adaptive_scaling: retire serving browsers idle for ``scale_down_idle_s`` (keeping one). Growth
        needs no loop: placement launches a browser when the ones holding a model are busy."""
        async with self.locks("placement"):     # nothing is placed on a browser while it is judged idle
            state = self.log.state
            idle = adaptive.idle_to_retire(state, self.fleet.leases, time.time(), self.scale_down_idle_s)
            serving = sum(1 for b in browsers_alive(state) if not b.standby and not b.draining)
            for browser_id in idle:
                serving -= 1
                await self.log.record(ev.PoolScaled(direction="down", browsers=serving, reason=(
                    f"{browser_id} idle for {self.scale_down_idle_s:g} s")))
                await self.fleet.retire(browser_id, "scaled down: idle")
