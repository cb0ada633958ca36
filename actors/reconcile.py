"""The pool's one control loop: observe -> decide -> execute -> record.

Guarantees:
- Every recovery starts here (``report``): requests, voting, health checks, the node check, deferred
  recoveries and the shard coordinator report a failure and await the outcome; none recovers on its own.
  A browser is recovered once however many report it at the same time.
- What the loop does is decided by ``actors.decisions.reconcile.decide``, a pure function of the
  projected state and what the loop observed; each action it executes is recorded as events.
- The loop wakes when the log records something it acts on (a model loaded, a browser promoted,
  failed or retired, a session closed) and otherwise on its timers (probes every ``PROBE_INTERVAL`` at
  levels >= low, health checks every ``health_interval`` at levels >= medium, checkpoints every
  ``checkpoint_interval`` at levels >= high, scale-down checks with ``adaptive_scaling``).
- No call waits on a browser whose actor answers no probe for ``PROBE_DEADLINE`` (a vanished node): it is
  cut off (``Fleet.cut_off``: the calls awaiting it fail at once) and recovered elsewhere. Time the pool's
  own loop was stalled does not count as a browser's silence.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from actors.constants import (
    HEALTH_TIMEOUT,
    PROBE_DEADLINE,
    PROBE_DEADLINE_FACTOR,
    PROBE_DEADLINE_MAX,
    PROBE_INTERVAL,
    PROBE_RTT_WINDOW,
    STANDBY_DEFER_S,
)
from actors.decisions import adaptive
from actors.decisions.reconcile import (
    Action,
    CheckHealth,
    Checkpoint,
    CutOff,
    KeepStandby,
    Observations,
    Policy,
    Recover,
    ScaleDown,
    decide,
    health_worth_recording,
    hot_keys,
    probe_deadline,
    silent,
    warm_keys_on,
)
from actors.decisions.recovery import FaultToleranceConfig, classify
from actors.fleet import Fleet, KeyedLocks
from actors.metrics import refresh_interval_s
from actors.recovery import RecoveryExecutor
from events import schema as ev
from events.errors import ActorUnreachable, BrowserFailure, FailureCategory
from events.state import browsers_alive

log = logging.getLogger(__name__)

# Kinds after which the loop looks again at once (standby upkeep, deferred recoveries).
WAKE_KINDS = frozenset({"ModelLoaded", "BrowserRoleChanged", "BrowserFailed", "BrowserRetired",
                        "BrowserQuarantined", "BrowserLaunched", "SessionClosed"})


class Reconciler:
    def __init__(self, fleet: Fleet, config: FaultToleranceConfig, locks: KeyedLocks,
                 spawn: Callable[[Awaitable[Any]], asyncio.Future], *, health_interval: float,
                 adaptive_scaling: bool, scale_down_idle_s: float, standby_type: Callable[[], str],
                 until_no_requests: Callable[[float], Awaitable[bool]],
                 tell_sessions: Callable[[ActorUnreachable], Awaitable[None]] | None = None) -> None:
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
        self._tell_sessions = tell_sessions       # a browser of a session was cut off: its coordinator must know
        self.policy = Policy(recovers=config.recovers,
                             standby_browsers=config.standby_browsers if config.keeps_standby else 0)
        self._wake = asyncio.Event()
        self._standby_task: asyncio.Future | None = None
        self._checking: dict[str, asyncio.Future] = {}
        self._probes: dict[str, tuple[float, asyncio.Future]] = {}   # browser -> its unanswered probe (sent, call)
        self._probe_rtts: collections.deque[float] = collections.deque(maxlen=PROBE_RTT_WINDOW)
        self._newest_answer_sent = 0.0          # when the newest answered probe was sent (any browser)
        self._last_pass = time.monotonic()
        self._nodes_seen: frozenset[str] | None = None      # Ray's live nodes, read since the last pass
        self._nodes_read: asyncio.Future | None = None
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
        probe_every = PROBE_INTERVAL if self.config.recovers else None
        every = {"health": health_every, "checkpoint": checkpoint_every, "scale": scale_every,
                 "probe": probe_every, "metrics": refresh_interval_s()}
        due = {name: now + t for name, t in every.items() if t is not None}
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
                if time.monotonic() - now > PROBE_DEADLINE / 2:
                    log.warning("slow reconcile pass: %.0f ms (%s)", (time.monotonic() - now) * 1000, sorted(fired))
            except Exception as exc:   # one bad pass (the GCS briefly unreachable...) must not end the loop
                log.warning("reconcile pass failed", extra={"error": f"{type(exc).__name__}: {exc}"})

    async def reconcile(self, fired: set[str] = frozenset()) -> list[Action]:
        """One pass: observe, decide, execute. Returns the actions it executed."""
        if "probe" in fired:
            self._probe()
        if "metrics" in fired:
            self.log.refresh_metrics()
        seen = Observations(
            alive_nodes=self._take_nodes(fired),
            leases=self.fleet.leases,
            recovering=self.recovery.recovering,
            health_due="health" in fired,
            checkpoint_due="checkpoint" in fired,
            standby_busy=self._standby_task is not None and not self._standby_task.done(),
            standby_launching=self.fleet.standby_launching,
            checking=frozenset(b for b, t in self._checking.items() if not t.done()),
            scale_down_due="scale" in fired,
            silent=self._silent(),
        )
        actions = decide(self.log.state, seen, self.policy)
        for action in actions:
            await self._execute(action)
        return actions

    def _probe(self) -> None:
        """Ping every live browser's actor that has no probe outstanding. With one browser alone (no other to
        compare it with), a pause of the pool's own loop (a long pass, the machine stalled) is added to its
        outstanding probe's start: it is not the browser's silence. With others, a later probe answered is the
        evidence that the pool is running again (``decisions.reconcile.silent``), and no time is added."""
        now = time.monotonic()
        stalled = now - self._last_pass - PROBE_INTERVAL
        self._last_pass = now
        alive = browsers_alive(self.log.state)
        if stalled > PROBE_INTERVAL and len(alive) <= 1:
            self._probes = {b: (sent + stalled, call) for b, (sent, call) in self._probes.items()}
        for b in alive:
            if b.browser_id in self._probes or not self.fleet.has_handle(b.browser_id) \
                    or self.fleet.is_cut_off(b.browser_id):
                continue
            call = asyncio.ensure_future(self.fleet.handle(b.browser_id).ping.remote())
            self._probes[b.browser_id] = (now, call)
            call.add_done_callback(lambda f, b=b.browser_id: self._probe_answered(b, f))

    def _silent(self) -> frozenset[str]:
        """Browsers whose actor answers no probe (``decisions.reconcile.silent``): compared with the others
        when there are others, and given a deadline that follows how slowly probes are answered now."""
        others = len(browsers_alive(self.log.state)) > 1
        return silent({b: sent for b, (sent, _) in self._probes.items()}, time.monotonic(), self._probe_deadline(),
                      self._newest_answer_sent if others else None)

    def _probe_deadline(self) -> float:
        return probe_deadline(self._probe_rtts, PROBE_DEADLINE, PROBE_DEADLINE_FACTOR, PROBE_DEADLINE_MAX)

    def probe_view(self) -> dict[str, Any]:
        """What the probes see now (for operators and tests): the deadline, the slowest recent answer, and how
        long each outstanding probe has waited, in seconds."""
        now = time.monotonic()
        return {"deadline_s": self._probe_deadline(), "slowest_recent_s": max(self._probe_rtts, default=None),
                "waiting_s": {b: now - sent for b, (sent, _) in self._probes.items()}}

    def _probe_answered(self, browser_id: str, call: asyncio.Future) -> None:
        """Any end of the call is an answer: an actor that died raises at once, and that is for the requests
        and health checks to report; only silence is the probe's."""
        if not call.cancelled():
            call.exception()
        sent, mine = self._probes.get(browser_id, (0.0, None))
        if mine is call:
            del self._probes[browser_id]
            waited = time.monotonic() - sent
            self._probe_rtts.append(waited)
            self._newest_answer_sent = max(self._newest_answer_sent, sent)
            if waited > PROBE_DEADLINE / 2:
                log.warning("slow probe answer from %s: %.0f ms", browser_id, waited * 1000,
                            extra={"browser_id": browser_id, "ms": round(waited * 1000)})

    def _take_nodes(self, fired: set[str]) -> frozenset[str] | None:
        """The node list read since the last pass (once), and a new read started when a health pass is due.
        Read in the background: listing nodes asks Ray's GCS, which can take seconds while a node is being
        lost, and a pass must not wait on it (the probes would stop meanwhile)."""
        nodes, self._nodes_seen = self._nodes_seen, None
        if "health" in fired and (self._nodes_read is None or self._nodes_read.done()):
            self._nodes_read = self._spawn(self._read_nodes())
        return nodes

    async def _read_nodes(self) -> None:
        try:
            self._nodes_seen = await self.fleet.alive_node_ids()
        except Exception as exc:     # the GCS may be briefly unreachable: the browser checks still run
            log.warning("node check failed", extra={"error": str(exc)})
            return
        self._wake.set()

    async def _execute(self, action: Action) -> None:
        if isinstance(action, Recover):
            if action.unreachable:
                failure = ActorUnreachable(action.browser_id, action.category, action.detail)
                log.warning("browser unreachable: %s", action.detail, extra={"browser_id": action.browser_id})
                self._probes.pop(action.browser_id, None)
                self.fleet.cut_off(failure)       # nothing waits on it any longer
                self.report_soon(failure)
            else:
                self.report_soon(BrowserFailure(action.browser_id, action.category, action.detail))
        elif isinstance(action, CutOff):
            failure = ActorUnreachable(action.browser_id, FailureCategory.CONNECTION, action.detail)
            log.warning("session browser unreachable: %s", action.detail, extra={"browser_id": action.browser_id})
            self._probes.pop(action.browser_id, None)
            self.fleet.cut_off(failure)
            if self._tell_sessions is not None:
                self._spawn(self._tell_sessions(failure))
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
            report = await asyncio.wait_for(self.fleet.call(browser_id, self.fleet.handle(browser_id).health.remote()),
                                            HEALTH_TIMEOUT * 2)
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
            memory_mb, loaded = report["memory_bytes"] / (1 << 20), tuple(sorted(report["models"]))
            if state is not None and health_worth_recording(self.log.state.resources.get(browser_id), memory_mb,
                                                            loaded):
                await self.log.record(ev.BrowserHealthReported(browser_id=browser_id, memory_mb=memory_mb,
                                                               loaded=loaded))
        return report

    async def _keep_standby(self) -> None:
        """Keep ``standby_browsers`` warm spares holding every model that serves traffic now, each warmed up
        (actors/decisions/warmup.py) so the first request a spare takes runs at full speed."""
        try:
            while not self.closed:
                state = self.log.state
                hot = hot_keys(state)
                spares = [b for b in browsers_alive(state) if b.standby]
                # A standby being launched elsewhere (a parallel recovery's fresh browser) counts: it joins
                # as a spare, and this loop warms it up once it is there.
                if len(spares) + self.fleet.standby_launching < self.policy.standby_browsers:
                    # A new browser's start-up, model load and warm-up take seconds of CPU: requests in flight
                    # (a failed-over request's rerun among them) go first, for at most STANDBY_DEFER_S.
                    await self._until_no_requests(STANDBY_DEFER_S)
                    spares = [b for b in browsers_alive(self.log.state) if b.standby]    # as they are now
                    if len(spares) + self.fleet.standby_launching < self.policy.standby_browsers:
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
