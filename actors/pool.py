"""ResourcePool: the front door. Places models on browsers, runs requests, recovers from failures.

Guarantees:
- The pool's view of browsers, models and operations is the projection of the event log
  (``events.state``); it changes only by applying events the StateLog has acknowledged.
- Every OperationStarted is followed by exactly one OperationCompleted or OperationFailed.
- A request returns a correct result or raises a typed error: InputError for bad input (it never
  reaches a browser), PoolBusyError when ``max_queued_requests`` requests are already admitted (the
  refusal is a RequestRejected event), BrowserFailure at level none, NoBrowserAvailableError when
  recovery is exhausted. At levels >= low a failed browser is recovered (actors/recovery.py) and the request
  runs again, at most ``max_recovery_attempts`` times, with backoff.
- Browsers are the pool's children: ``shutdown`` closes them and removes their files.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors import adaptive, placement, validation
from actors.browser import BrowserActor
from actors.chromium import resolve_browser
from actors.constants import (
    BROWSER_START_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_NUM_THREADS,
    HEALTH_TIMEOUT,
    RUN_TIMEOUT,
)
from actors.errors import (
    ActorUnreachable,
    BrowserFailure,
    FailureCategory,
    InputError,
    NoBrowserAvailableError,
    PoolBusyError,
)
from actors.metrics import PoolMetrics
from actors.recovery import FaultToleranceConfig, FaultToleranceLevel, RecoveryExecutor, RecoveryStrategy, classify
from actors.state_log import get_or_create_state_log, new_batch_id
from actors.voting import NoMajorityError, vote_embeddings, vote_tokens
from events import schema as ev
from events.state import (
    ALIVE_STATUSES,
    BrowserState,
    PoolState,
    apply,
    browsers_alive,
    models_on,
    recovery_statistics,
)
from sharding import coordinator
from sharding.models import minilm
from sharding.models.cache import cache_dir
from sharding.models.registry import ModelArtifact, ModelSpec, artifact_key, artifacts, get_spec, llama_model
from sharding.plan import even_layer_ranges

log = logging.getLogger(__name__)

TASK_FAMILIES = ("text_embedding", "text_generation")
RECORD_GAP_WAIT = 5.0     # seconds before a gap in acknowledged seqs is read back from the log
HEALTH_INTERVAL = 2.0     # seconds between health checks of every browser (levels >= medium)
SCALE_DOWN_IDLE_S = 30.0  # adaptive_scaling: a serving browser idle this long is retired (one always stays)


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
    return h.hexdigest()[:16]


class PoolCore:
    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 browser_preferences: dict[str, str] | None = None,
                 fault_tolerance: dict[str, Any] | None = None,
                 backend: str = "auto", num_threads: int = DEFAULT_NUM_THREADS,
                 event_log: str | None = None, name: str | None = None,
                 request_timeout: float = RUN_TIMEOUT, memory_limit_mb: int | None = None,
                 health_interval: float = HEALTH_INTERVAL,
                 max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
                 adaptive_scaling: bool = False, scale_down_idle_s: float = SCALE_DOWN_IDLE_S) -> None:
        for field, value in (("max_connections", max_connections), ("max_queued_requests", max_queued_requests)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(field, f"must be a positive int, got {validation.show(value)}")
        if not isinstance(adaptive_scaling, bool):
            raise InputError("adaptive_scaling", f"must be a bool, got {validation.show(adaptive_scaling)}")
        if isinstance(scale_down_idle_s, bool) or not isinstance(scale_down_idle_s, int | float) \
                or not scale_down_idle_s > 0:
            raise InputError("scale_down_idle_s",
                             f"must be a positive number, got {validation.show(scale_down_idle_s)}")
        self.max_connections = max_connections
        self.max_queued_requests = max_queued_requests
        self.adaptive_scaling = adaptive_scaling
        self.scale_down_idle_s = float(scale_down_idle_s)
        self._admitted = 0                               # requests inside infer/generate right now
        self.browser_preferences = {t: "chromium" for t in TASK_FAMILIES} | dict(browser_preferences or {})
        self.ft = FaultToleranceConfig.from_options(fault_tolerance)
        self.backend = backend
        self.num_threads = num_threads
        self.request_timeout = request_timeout
        self.memory_limit_mb = memory_limit_mb
        self.health_interval = health_interval
        self.name = name or f"webpool-{uuid.uuid4().hex[:8]}"
        self.event_log_location = event_log
        self.state = PoolState()
        self.recovery = RecoveryExecutor(self)
        self._log: Any = None
        # I/O handles and caches of derived data; none of this is pool state (that is the projection).
        self._handles: dict[str, Any] = {}               # browser_id -> BrowserActor handle
        self._backend_of: dict[str, str] = {}            # browser_id -> backend chosen for it
        self._model_refs: dict[str, ray.ObjectRef] = {}  # sha256 -> model bytes in the object store
        self._artifacts: dict[tuple, list[ModelArtifact]] = {}
        self._artifact_by_key: dict[str, ModelArtifact] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._resolved_types: dict[str, str] = {}
        self._in_flight: dict[str, int] = {}
        self._launching: dict[str, int] = {}             # node_id -> browsers being started there
        self._coordinators: dict[str, Any] = {}          # model -> its ShardCoordinator actor
        self._session_attempts: dict[str, int] = {}      # open session -> coordinator calls that began it
        self._recover_after_session: dict[str, list[BrowserFailure]] = {}   # browsers a session went on without
        self._pending: dict[int, Any] = {}               # acknowledged records not yet applied (out of order)
        self._applied = asyncio.Condition()
        self._background: set[asyncio.Future] = set()
        self._standby_task: asyncio.Future | None = None
        self._closed = False
        self._metrics: PoolMetrics | None = None

    # ----- events -------------------------------------------------------------------------------
    async def _ensure_log(self) -> None:
        if self._log is not None:
            return
        async with self._lock("log"):
            if self._log is not None:
                return
            location = self.event_log_location or str(cache_dir() / "events" / self.name)
            # Next to the pool: a local log directory is on this node's disk.
            context = ray.get_runtime_context()
            handle = await asyncio.to_thread(get_or_create_state_log, f"{self.name}-log", location,
                                             context.namespace, node_id=context.get_node_id())
            self.state = await handle.state.remote()
            self._log = handle
            if ray.is_initialized():
                self._metrics = PoolMetrics(self.name)
            # Browsers recorded by an earlier incarnation of this pool died with it (they are its
            # children): say so in the log rather than pretend they are still there.
            stale = [b.browser_id for b in self.state.browsers.values() if b.status not in ("retired", "quarantined")]
            if stale:
                await self._record(*(ev.BrowserRetired(b, "pool restarted") for b in stale))
            if self.ft.level in (FaultToleranceLevel.MEDIUM, FaultToleranceLevel.HIGH, FaultToleranceLevel.CRITICAL):
                self._spawn(self._health_loop())
            if self.ft.level in (FaultToleranceLevel.HIGH, FaultToleranceLevel.CRITICAL):
                self._spawn(self._checkpoint_loop())
            if self.adaptive_scaling:
                self._spawn(self._scale_down_loop())

    async def _record(self, *events: ev.Event) -> None:
        """Append events; returns once they (and every earlier event) are applied to ``self.state``.

        Concurrent requests append concurrently and acknowledgements can arrive out of order, so
        records are applied strictly in ``seq`` order; a gap that does not fill (a lost reply) is
        read back from the log.
        """
        # The batch id makes Ray's at-least-once retry of this append write it once.
        await self._apply_acknowledged(await self._log.append_batch.remote(list(events), new_batch_id()))

    async def _apply_acknowledged(self, records: list[ev.Recorded]) -> None:
        """Apply ``records`` (acknowledged by the log) and every one before them, in seq order."""
        if not records:
            return
        for rec in records:
            self._pending[rec.seq] = rec
        target = records[-1].seq
        async with self._applied:
            self._apply_pending()
            while self.state.last_seq < target:
                try:
                    await asyncio.wait_for(self._applied.wait(), RECORD_GAP_WAIT)
                except asyncio.TimeoutError:
                    for rec in await self._log.read.remote(self.state.last_seq + 1, target):
                        self._pending.setdefault(rec.seq, rec)
                self._apply_pending()

    def _apply_pending(self) -> None:
        advanced = False
        while (rec := self._pending.pop(self.state.last_seq + 1, None)) is not None:
            before, self.state = self.state, apply(self.state, rec)
            advanced = True
            if self._metrics is not None:
                try:
                    self._metrics.observe(before, rec, self.state)
                except Exception as exc:     # metrics are a view: they never stop the pool
                    log.warning("metrics update failed", extra={"kind": rec.kind, "error": str(exc)})
        if advanced:
            self._applied.notify_all()

    @contextlib.asynccontextmanager
    async def _admission(self, model: str) -> AsyncIterator[None]:
        """Admit a request, or refuse it with PoolBusyError when ``max_queued_requests`` are in.

        The check and the count happen with no await between them, so the bound is exact.
        """
        if self._admitted >= self.max_queued_requests:
            admitted = self._admitted
            await self._ensure_log()
            await self._record(ev.RequestRejected(model=model, reason="busy", admitted=admitted,
                                                  limit=self.max_queued_requests))
            raise PoolBusyError(f"pool busy: {admitted} requests in progress (max_queued_requests="
                                f"{self.max_queued_requests}); retry later")
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    async def _detached(self, model: str, work: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Run an admitted request as the pool's own task: a caller that goes away (Ray cancels the calls
        of a driver that dies) does not cancel the work, which ends in OperationCompleted or -Failed."""
        async def admitted() -> dict[str, Any]:
            async with self._admission(model):
                return await work()

        return await asyncio.shield(self._spawn(admitted()))

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Future:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ----- browsers -----------------------------------------------------------------------------
    def _browser_type(self, task: str) -> str:
        preferred = self.browser_preferences.get(task, "chromium")
        if preferred not in self._resolved_types:
            self._resolved_types[preferred] = resolve_browser(preferred).browser_type
        return self._resolved_types[preferred]

    async def _node_views(self) -> list[placement.NodeView]:
        """Live Ray nodes and the live browsers the log places on each (browsers still starting count as
        serving there: two launches at once must not both pick the emptiest node)."""
        nodes = await asyncio.to_thread(ray.nodes)
        alive = browsers_alive(self.state)
        return [
            placement.NodeView(
                node_id=n["NodeID"], browser_slots=n.get("Resources", {}).get(placement.BROWSER_SLOTS),
                serving=sum(1 for b in alive if b.node_id == n["NodeID"] and not b.standby)
                + self._launching.get(n["NodeID"], 0),
                standby=sum(1 for b in alive if b.node_id == n["NodeID"] and b.standby))
            for n in nodes if n.get("Alive")
        ]

    async def _start_browser(self, browser_id: str, browser_type: str, standby: bool = False,
                             avoid_nodes: frozenset[str] = frozenset()) -> None:
        """A new BrowserActor, started and recorded (BrowserLaunched), on the node placement chooses
        (spread; a standby away from the serving browsers). Where nodes advertise ``browser_slots``,
        each browser takes one.

        A node can vanish before Ray lists it as dead (that takes seconds): an actor placed there dies
        before it starts. The launch is then tried again, once, away from that node.
        """
        excluded: set[str] = set()
        for attempt in range(2):
            try:
                await self._start_browser_on(browser_id, browser_type, standby, avoid_nodes, excluded)
                return
            except ray.exceptions.RayActorError as exc:
                if attempt == 1 or not excluded:
                    raise
                log.warning("browser died before it started; launching elsewhere",
                            extra={"browser_id": browser_id, "nodes_excluded": sorted(excluded), "error": str(exc)})

    async def _start_browser_on(self, browser_id: str, browser_type: str, standby: bool,
                                avoid_nodes: frozenset[str], excluded: set[str]) -> None:
        """One launch attempt; adds the node it chose to ``excluded`` before it starts there."""
        nodes = [n for n in await self._node_views() if n.node_id not in excluded]
        options: dict[str, Any] = {"name": None}
        if any(n.browser_slots is not None for n in nodes):
            options["resources"] = {placement.BROWSER_SLOTS: 1}
        node_id = placement.choose_node(nodes, standby, avoid_nodes)
        if node_id is not None:
            # Soft: if that node is gone by the time Ray schedules, any other will do.
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
        key = node_id or ""
        if node_id is not None:
            excluded.add(node_id)
        self._launching[key] = self._launching.get(key, 0) + 1     # no await since choose_node: atomic
        try:
            handle = BrowserActor.options(**options).remote(browser_id, browser_type, self.num_threads,
                                                            self.memory_limit_mb)
            try:
                info = await asyncio.wait_for(handle.start.remote(), BROWSER_START_TIMEOUT)
            except BaseException:     # also cancelled (pool shutdown): an actor still waiting for a slot
                ray.kill(handle)      # would otherwise start a browser nobody owns
                raise
            await self._record_launch(browser_id, handle, info, standby)
        finally:
            self._launching[key] -= 1      # from here the log counts it

    async def _record_launch(self, browser_id: str, handle: Any, info: dict[str, Any], standby: bool) -> None:
        self._handles[browser_id] = handle
        self._backend_of[browser_id] = placement.choose_backend(info["backends"], info["detail"], self.backend)
        await self._record(ev.BrowserLaunched(
            browser_id=browser_id, browser_type=info["browser_type"], backend_caps=tuple(info["backends"]),
            pid=info["pid"], node_id=info["node_id"] or "", standby=standby))
        log.info("browser launched", extra={"browser_id": browser_id, "backend": self._backend_of[browser_id],
                                            "standby": standby, "start_ms": round(info["start_ms"])})

    async def _launch(self, browser_type: str, standby: bool = False, avoid: frozenset[str] = frozenset()) -> str:
        """A new browser; ``avoid``: browsers whose nodes it should not share when another node can host it."""
        browser_id = f"browser-{uuid.uuid4().hex[:8]}"
        avoid_nodes = frozenset(self.state.browsers[b].node_id for b in avoid if b in self.state.browsers)
        await self._start_browser(browser_id, browser_type, standby, avoid_nodes)
        return browser_id

    async def _stop_actor(self, browser_id: str) -> None:
        handle = self._handles.pop(browser_id, None)
        if handle is None:
            return
        try:
            await asyncio.wait_for(handle.close.remote(), 10)
        except Exception as exc:  # a dead browser has nothing left to close
            log.info("closing browser failed", extra={"browser_id": browser_id, "error": str(exc)})
        ray.kill(handle)

    async def _retire(self, browser_id: str, reason: str) -> None:
        state = self.state.browsers.get(browser_id)
        if state is not None and state.status not in ("retired", "quarantined"):
            await self._record(ev.BrowserRetired(browser_id=browser_id, reason=reason))
        self._spawn(self._stop_actor(browser_id))

    async def _quarantine(self, browser_id: str, reason: str) -> None:
        await self._record(ev.BrowserQuarantined(browser_id=browser_id, reason=reason))
        self._spawn(self._stop_actor(browser_id))

    def _alive_states(self) -> list[BrowserState]:
        return browsers_alive(self.state)

    def _live_ids(self) -> list[str]:
        return [b.browser_id for b in browsers_alive(self.state)]

    def _keys_on(self, browser_id: str) -> frozenset[str]:
        return frozenset(artifact_key(m.model, m.shard, m.sha256) for m in models_on(self.state, browser_id))

    def _artifacts_on(self, browser_id: str) -> list[ModelArtifact]:
        """What the log says ``browser_id`` held: the work a replacement must take over."""
        return [self._artifact_by_key[k] for k in sorted(self._keys_on(browser_id)) if k in self._artifact_by_key]

    def _views(self, model: str | None = None) -> list[placement.BrowserView]:
        """Browsers that take traffic (alive, not standby, not draining), with their expected cost for
        ``model`` from the performance history."""
        return [
            placement.BrowserView(b.browser_id, b.browser_type, self._keys_on(b.browser_id),
                                  self._in_flight.get(b.browser_id, 0),
                                  adaptive.expected_cost(self.state.perf.get((b.browser_id, model))) if model else None)
            for b in browsers_alive(self.state) if not b.standby and not b.draining
        ]

    async def _model_ref(self, art: ModelArtifact) -> ray.ObjectRef:
        if art.sha256 not in self._model_refs:
            data = await asyncio.to_thread(np.fromfile, art.path, np.uint8)
            self._model_refs[art.sha256] = ray.put(data)
        return self._model_refs[art.sha256]

    async def _place(self, art: ModelArtifact, task: str, avoid: frozenset[str] = frozenset()) -> str:
        """A live browser holding ``art``: found, or made so by loading it (launching if allowed).

        When no live browser holding ``art`` is free but one that held it is being recovered, the
        request first waits for that recovery (at most its own time budget): the recovery brings the
        model back (a reconnect takes ~50 ms), where loading it elsewhere takes seconds and may take
        a browser more.
        """
        waited = False
        while True:
            async with self._lock("placement"):
                browser_type = self._browser_type(task)
                views = self._views(art.model)
                if avoid and len(views) >= self.max_connections and all(v.browser_id in avoid for v in views):
                    raise NoBrowserAvailableError(f"no browser outside {sorted(avoid)} for {art.key} "
                                                  f"(max_connections={self.max_connections})")
                decision = placement.place(art.key, views, self.max_connections, browser_type, avoid)
                recovering = [] if waited or decision.action == "use" else self.recovery.restoring(art.key, avoid)
                if not recovering:
                    browser_id = decision.browser_id
                    if decision.action == "launch":
                        busy = sum(v.in_flight for v in views)
                        await self._record(ev.PoolScaled(direction="up", browsers=len(views) + 1, reason=(
                            f"{busy} request(s) in flight on {len(views)} browser(s) for {art.key}" if views
                            else f"no browser yet for {art.key}")))
                        browser_id = await self._launch(browser_type, avoid=avoid)
                    assert browser_id is not None
                    self._in_flight[browser_id] = self._in_flight.get(browser_id, 0) + 1   # reserve it
                    break
            waited = True
            await asyncio.wait(recovering, timeout=self.request_timeout)
        try:
            async with self._lock(f"load:{browser_id}:{art.key}"):
                if art.key not in self._keys_on(browser_id):
                    await self._load(browser_id, art)
        finally:
            self._in_flight[browser_id] -= 1
        return browser_id

    async def _load(self, browser_id: str, art: ModelArtifact) -> None:
        backend = self._backend_of[browser_id]
        t0 = time.perf_counter()
        # Creating a session blocks the page for seconds: count it as work so the health loop
        # does not take a busy page for a hung one.
        self._in_flight[browser_id] = self._in_flight.get(browser_id, 0) + 1
        try:
            await self._handles[browser_id].load_model.remote(art.key, await self._model_ref(art), art.sha256,
                                                              backend)
        except (BrowserFailure, ray.exceptions.RayActorError) as exc:
            failure = classify(exc, browser_id)
            await self._browser_failed(failure)
            raise failure from None
        finally:
            self._in_flight[browser_id] -= 1
        await self._record(ev.ModelLoaded(browser_id=browser_id, model=art.model, shard=art.shard, sha256=art.sha256,
                                          backend=backend, load_ms=(time.perf_counter() - t0) * 1000))
        if self.ft.standby_browsers and self.ft.level in (FaultToleranceLevel.HIGH, FaultToleranceLevel.CRITICAL):
            self._replenish_standby()

    async def _browser_failed(self, failure: BrowserFailure) -> None:
        """Record a browser's failure once, however many requests and health checks saw it at once."""
        async with self._lock(f"failed:{failure.browser_id}"):
            state = self.state.browsers.get(failure.browser_id)
            if state is not None and state.status in ("launched", "connected", "disconnected"):
                await self._record(ev.BrowserFailed(browser_id=failure.browser_id,
                                                    category=failure.category.value, error=failure.detail[:500]))

    async def _artifacts_for(self, model: str, ranges: list[tuple[int, int]] | None = None) -> list[ModelArtifact]:
        key = (model, tuple(ranges or ()))
        async with self._lock(f"build:{key}"):
            if key not in self._artifacts:
                arts = await asyncio.to_thread(artifacts, model, ranges)
                self._artifact_by_key.update({a.key: a for a in arts})
                self._artifacts[key] = arts
        return self._artifacts[key]

    # ----- standby browsers (level high and up) -------------------------------------------------
    def _replenish_standby(self) -> None:
        if self._closed or (self._standby_task is not None and not self._standby_task.done()):
            return
        self._standby_task = self._spawn(self._ensure_standby())

    async def _ensure_standby(self) -> None:
        """Keep ``standby_browsers`` warm spares holding every model that serves traffic now."""
        try:
            while not self._closed:
                hot = {k for b in self._views() for k in self._keys_on(b.browser_id)}
                spares = [b for b in self._alive_states() if b.standby]
                if len(spares) < self.ft.standby_browsers:
                    await self._launch(self._browser_type("text_embedding"), standby=True)
                    continue
                missing = [(b.browser_id, k) for b in spares for k in sorted(hot - self._keys_on(b.browser_id))]
                if not missing:
                    return
                for browser_id, key in missing:
                    async with self._lock(f"load:{browser_id}:{key}"):
                        if key not in self._keys_on(browser_id):
                            await self._load(browser_id, self._artifact_by_key[key])
        except Exception as exc:
            log.warning("standby replenishment failed", extra={"error": str(exc)})

    # ----- operations ---------------------------------------------------------------------------
    async def _run_op(self, browser_id: str, model: str, kind: str, digest: str,
                      call: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Run ``call()`` on a browser as one recorded operation (started -> completed | failed).

        Any browser-side failure is classified, recorded (OperationFailed, BrowserFailed) and raised
        as BrowserFailure.
        """
        op_id = uuid.uuid4().hex
        # Counted before the first await: placement must see this browser busy from the moment it was chosen.
        self._in_flight[browser_id] = self._in_flight.get(browser_id, 0) + 1
        try:
            await self._record(ev.OperationStarted(op_id=op_id, model=model, browser_id=browser_id, kind=kind,
                                                   input_digest=digest))
        except BaseException:
            self._in_flight[browser_id] -= 1
            raise
        t0 = time.perf_counter()
        try:
            result = await call()
        except (BrowserFailure, ray.exceptions.RayActorError, asyncio.TimeoutError) as exc:
            failure = classify(exc, browser_id)
            await self._record(ev.OperationFailed(op_id=op_id, category=failure.category.value,
                                                  error=str(failure)[:500]))
            await self._browser_failed(failure)
            raise failure from None
        except BaseException as exc:
            cause = getattr(exc, "cause", None) or exc
            await self._record(ev.OperationFailed(op_id=op_id, category="unknown",
                                                  error=f"{type(cause).__name__}: {cause}"[:500]))
            raise
        finally:
            self._in_flight[browser_id] -= 1
        duration_ms = (time.perf_counter() - t0) * 1000
        await self._record(ev.OperationCompleted(op_id=op_id, duration_ms=duration_ms,
                                                 metrics=result.get("metrics", {})))
        await self._drain_degraded(model)
        result.setdefault("metrics", {})["duration_ms"] = duration_ms
        return result

    async def _drain_degraded(self, model: str) -> None:
        """A browser much slower than its peers for ``model`` takes no new requests; once idle it is retired
        and a fresh browser takes over its models (each step an event)."""
        for slow in adaptive.degraded_browsers(self.state, model):
            async with self._lock(f"failed:{slow.browser_id}"):
                state = self.state.browsers.get(slow.browser_id)
                if state is None or state.draining or state.status not in ALIVE_STATUSES:
                    continue
                log.warning("draining a degraded browser", extra={"browser_id": slow.browser_id,
                                                                 "model": model, "reason": slow.reason})
                await self._record(ev.BrowserDraining(browser_id=slow.browser_id, reason=slow.reason))
            self._spawn(self._drain(slow.browser_id))

    async def _drain(self, browser_id: str) -> None:
        needed = self._artifacts_on(browser_id)
        browser_type = self.state.browsers[browser_id].browser_type
        deadline = time.monotonic() + self.request_timeout * 2
        while self._in_flight.get(browser_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._retire(browser_id, "drained: slower than its peers")
        if self._closed:
            return
        async with self._lock("placement"):
            if len(self._views()) >= self.max_connections:
                return
            replacement = await self._launch(browser_type, avoid=frozenset({browser_id}))
        for art in needed:
            await self._load(replacement, art)

    async def _with_recovery(self, attempt: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Run ``attempt``; on a browser failure recover that browser and try again (levels >= low)."""
        failures: list[BrowserFailure] = []
        while True:
            try:
                result = await attempt()
            except BrowserFailure as failure:
                if not self.ft.recovers:
                    raise
                failures.append(failure)
                if len(failures) > self.ft.max_recovery_attempts:
                    raise NoBrowserAvailableError(
                        f"request failed {len(failures)} times; recovery exhausted "
                        f"(max_recovery_attempts={self.ft.max_recovery_attempts}); last: {failure}") from failure
                outcome = await self.recovery.recover(failure)
                if not outcome["success"]:
                    log.warning("recovery failed", extra={"browser_id": failure.browser_id,
                                                         "error": outcome["error"]})
                await asyncio.sleep(self.ft.backoff_s * 2 ** (len(failures) - 1))
                continue
            if failures:
                result["recovered"] = True
                result["original_error"] = str(failures[0])
                result["recovery_attempts"] = len(failures)
            return result

    async def infer(self, model_name: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """Embed ``{"text": str}`` (one vector) or ``{"texts": [str, ...]}`` (a matrix)."""
        spec, request = validation.embedding_request(model_name, inputs)
        return await self._detached(spec.name, lambda: self._infer(spec, request))

    async def _infer(self, spec: ModelSpec, request: validation.EmbeddingRequest) -> dict[str, Any]:
        feeds = minilm.tokenize(request.texts)
        await self._ensure_log()
        [art] = await self._artifacts_for(spec.name)
        digest = _digest(*feeds.values())

        async def on(browser_id: str) -> dict[str, Any]:
            handle = self._handles[browser_id]

            async def call() -> dict[str, Any]:
                out = await handle.run.remote(art.key, feeds, fetch=["embedding"], timeout=self.request_timeout)
                emb = out["outputs"]["embedding"]
                return {"embedding": emb[0] if request.single else emb, "metrics": {"page_ms": out["ms"]}}

            result = await self._run_op(browser_id, spec.name, "infer", digest, call)
            return result | {"model": spec.name, "browser_id": browser_id, "backend": self._backend_of[browser_id]}

        async def attempt() -> dict[str, Any]:
            if self.ft.level is FaultToleranceLevel.CRITICAL:
                return await self._voted(art, spec.task, on, lambda answers: vote_embeddings(
                    {b: r["embedding"] for b, r in answers.items()}, self.ft.vote_cosine))
            return await on(await self._place(art, spec.task))

        return await self._with_recovery(attempt)

    async def _voted(self, art: ModelArtifact, task: str, on: Callable[[str], Awaitable[dict[str, Any]]],
                     vote: Callable[[dict[str, dict[str, Any]]], Any]) -> dict[str, Any]:
        """Level critical: run on k distinct browsers, answer by majority, quarantine dissenters."""
        k = max(1, min(self.ft.vote_k, self.max_connections))
        chosen: list[str] = []
        for _ in range(k):
            try:
                chosen.append(await self._place(art, task, avoid=frozenset(chosen)))
            except NoBrowserAvailableError:
                break
        outcomes = await asyncio.gather(*(on(b) for b in chosen), return_exceptions=True)
        answers = {b: o for b, o in zip(chosen, outcomes, strict=True) if not isinstance(o, BaseException)}
        failures = [o for o in outcomes if isinstance(o, BrowserFailure)]
        if not answers:
            raise failures[0] if failures else NoBrowserAvailableError("no browser answered")
        try:
            result = vote(answers)
        except NoMajorityError:
            if failures:
                raise failures[0] from None   # recover the failed browser, then vote again
            raise
        for dissenter in result.dissenting:
            log.warning("browser outvoted", extra={"browser_id": dissenter, "agreeing": result.agreeing})
            await self._quarantine(dissenter, f"outvoted by {', '.join(result.agreeing)}")
        for failure in failures:
            self._spawn(self.recovery.recover(failure))
        winner = answers[result.agreeing[0]]
        return winner | {"votes": {"agreeing": list(result.agreeing), "dissenting": list(result.dissenting),
                                   "failed": [f.browser_id for f in failures]}}

    async def generate(self, model_name: str, prompt: str, max_new_tokens: int = 16, shards: int = 1,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> dict[str, Any]:
        """Generate text with a llama model split over ``shards`` browsers (greedy unless temperature > 0)."""
        spec, req = validation.generation_request(model_name, prompt, max_new_tokens, shards, temperature,
                                                  top_p, seed)
        return await self._detached(spec.name, lambda: self._generate(spec, req))

    async def _generate(self, spec: ModelSpec, req: validation.GenerationRequest) -> dict[str, Any]:
        model = await asyncio.to_thread(llama_model, spec.name)
        prompt_ids = model.encode(req.prompt)
        validation.check_context(len(prompt_ids), req.max_new_tokens, model.config.max_context)
        validation.check_shards(req.shards, model.config.n_layers)
        await self._ensure_log()
        ranges = even_layer_ranges(model.config.n_layers, req.shards)
        arts = await self._artifacts_for(spec.name, ranges if req.shards > 1 else None)

        async def on(avoid: frozenset[str] = frozenset()) -> dict[str, Any]:
            used: set[str] = set(avoid)

            async def stage_apart(art: ModelArtifact) -> coordinator.ShardStage:
                """``art`` on a browser no other stage of this request uses."""
                browser_id = await self._place(art, spec.task, avoid=frozenset(used))
                used.add(browser_id)
                return coordinator.ShardStage(browser_id, self._handles[browser_id], art)

            stages = [await stage_apart(art) for art in arts]
            shadows: list[coordinator.ShardStage | None] = []
            for art in arts if self.ft.shadows(req.shards) else []:
                try:
                    shadows.append(await stage_apart(art))
                except NoBrowserAvailableError:     # no room (max_connections): that shard runs unshadowed
                    shadows.append(None)
            return await self._generate_on(spec.name, stages, shadows, prompt_ids, req, model.config.eos_id)

        async def attempt() -> dict[str, Any]:
            if self.ft.level is FaultToleranceLevel.CRITICAL and req.shards == 1 and req.temperature == 0:
                return await self._voted(arts[0], spec.task, lambda b: on(frozenset(self._live_ids()) - {b}),
                                         lambda answers: vote_tokens(
                                             {b: r["token_ids"] for b, r in answers.items()}))
            return await on()

        result = await self._with_recovery(attempt)
        return result | {"model": spec.name, "text": model.decode(result["token_ids"]),
                         "prompt_token_ids": prompt_ids}

    async def _generate_on(self, model: str, stages: list[coordinator.ShardStage],
                           shadows: list[coordinator.ShardStage | None], prompt_ids: list[int],
                           req: validation.GenerationRequest, eos_id: int | None) -> dict[str, Any]:
        # The operation is recorded against the first shard's browser, which _run_op counts as busy. The
        # session's other browsers are busy too: the health loop must not probe them (nor scale-down retire
        # them) mid-session; a failure there is the coordinator's to handle (replay, or its shadow).
        others = {s.browser_id for s in [*stages, *shadows] if s is not None} - {stages[0].browser_id}
        for browser_id in others:
            self._in_flight[browser_id] = self._in_flight.get(browser_id, 0) + 1
        try:
            return await self._run_session(model, stages, shadows, prompt_ids, req, eos_id)
        finally:
            for browser_id in others:
                self._in_flight[browser_id] -= 1

    async def _run_session(self, model: str, stages: list[coordinator.ShardStage],
                           shadows: list[coordinator.ShardStage | None], prompt_ids: list[int],
                           req: validation.GenerationRequest, eos_id: int | None) -> dict[str, Any]:
        session_id = uuid.uuid4().hex
        await self._record(ev.SessionOpened(session_id=session_id, model=model, plan={
            "shards": [{"browser_id": s.browser_id, "artifact": s.artifact.key,
                        "layers": s.artifact.meta["layer_range"]} for s in stages],
            "shadows": [s.browser_id if s else None for s in shadows],
            "prompt_ids": prompt_ids, "max_new_tokens": req.max_new_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}))
        shard_coordinator = await self._coordinator(model)

        async def call() -> dict[str, Any]:
            # Ray retries this call on a restarted coordinator if its process dies; the retry resumes from the log.
            return await shard_coordinator.generate.remote(
                session_id, stages, shadows, prompt_ids, req.max_new_tokens, eos_id, req.temperature, req.top_p,
                req.seed, self.request_timeout)

        reason = "failed"
        try:
            # One operation per request, recorded against the first shard's browser.
            result = await self._run_op(stages[0].browser_id, model, "generate", _digest(prompt_ids, req), call)
            reason = "done"
        finally:
            self._session_attempts.pop(session_id, None)
            await self._record(ev.SessionClosed(session_id=session_id, reason=reason))
            for failure in self._recover_after_session.pop(session_id, []):
                if self.ft.recovers and not self._closed:
                    self._spawn(self.recovery.recover(failure))
        return result | {"session_id": session_id, "browser_id": stages[0].browser_id}

    async def _coordinator(self, model: str) -> Any:
        """The ShardCoordinator actor of ``model`` (one per sharded model), started on first use next to the pool."""
        async with self._lock(f"coordinator:{model}"):
            if model not in self._coordinators:
                node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
                me = ray.get_runtime_context().current_actor
                self._coordinators[model] = coordinator.ShardCoordinator.options(
                    scheduling_strategy=node).remote(me, model)
            return self._coordinators[model]

    async def coordinator(self, model_name: str) -> Any:
        """The handle of ``model_name``'s ShardCoordinator (started if needed): its ``pid`` is a fault to inject."""
        spec = get_spec(model_name)
        if spec.task != "text_generation":
            raise InputError("model_name", f"{spec.name} is a {spec.task} model; only generation has a coordinator")
        return await self._coordinator(spec.name)

    # ----- called by ShardCoordinator actors ------------------------------------------------------
    async def session_begin(self, session_id: str) -> dict[str, list[int]] | None:
        """A coordinator starts running ``session_id``: None the first time; on a later call (the coordinator
        that ran it died and Ray retried the call) what the log says of the session so far, recorded as
        SessionResumed: ``tokens`` (logged) and ``promoted`` (shards whose shadow took over: the retry
        must not send them to the dead primary again)."""
        async with self._lock(f"session:{session_id}"):
            attempt = self._session_attempts.get(session_id, 0) + 1
            self._session_attempts[session_id] = attempt
            if attempt == 1:
                return None
            session = self.state.sessions[session_id]
            log.warning("session taken over by a new coordinator",
                        extra={"session_id": session_id, "tokens": len(session.tokens), "attempt": attempt})
            await self._record(ev.SessionResumed(session_id=session_id, tokens=len(session.tokens), attempt=attempt))
            return {"tokens": list(session.tokens), "promoted": list(session.promoted)}

    async def session_append(self, session_id: str, position: int, token_ids: list[int]) -> None:
        """Log ``token_ids`` as the session's tokens from ``position`` on; returns once they are in the log.

        Idempotent: a call a dead coordinator left in flight and its successor's retry of the same step
        log the tokens once. A different token at a logged position is refused (it would fork the session).
        """
        async with self._lock(f"session:{session_id}"):
            logged = self.state.sessions[session_id].tokens
            overlap = logged[position:position + len(token_ids)]
            if position > len(logged) or tuple(token_ids[:len(overlap)]) != overlap:
                raise RuntimeError(f"session {session_id}: tokens {token_ids} at {position} do not extend the "
                                   f"{len(logged)} logged ones")
            if fresh := token_ids[len(overlap):]:
                await self._record(ev.TokensAppended(session_id=session_id, token_ids=tuple(fresh)))

    async def shard_replace(self, failure: BrowserFailure, artifact_key: str,
                            avoid: list[str]) -> coordinator.ShardStage | None:
        """A shard's browser failed mid-generation: recover it, or place its shard on another browser (not one
        in ``avoid``, the session's other shards). None when this pool does not recover (level none)."""
        if not self.ft.recovers or self._closed:
            return None
        artifact = self._artifact_by_key[artifact_key]
        await self._browser_failed(failure)
        outcome = await self.recovery.recover(failure)
        serving = outcome["recovery_browser"]
        if serving not in self._live_ids() or artifact_key not in self._keys_on(serving):
            serving = await self._place(artifact, "text_generation", avoid=frozenset(avoid))
        return coordinator.ShardStage(serving, self._handles[serving], artifact)

    async def shard_lost(self, session_id: str, shard: int, failure: BrowserFailure, promoted: str | None) -> None:
        """A session went on without a failed browser: its shadow took over (``promoted``), or the failed one
        was the shadow. Recorded now; the browser is recovered when the session closes. The session will
        not use it again, and recovering it meanwhile (a new browser, shard reloads) would only take CPU
        from the session (measured on 2 cores: the decode after a promotion ran ~1.5-3 s longer)."""
        if promoted is not None:
            await self._record(ev.ShardPromoted(session_id=session_id, shard=shard,
                                                failed_browser=failure.browser_id, shadow_browser=promoted))
        await self._browser_failed(failure)
        self._recover_after_session.setdefault(session_id, []).append(failure)

    async def shard_replay(self, session_id: str, model: str, stage: coordinator.ShardStage,
                           inputs: dict[str, np.ndarray], info: dict[str, Any], timeout: float) -> None:
        """Rebuild a replacement shard's cache from the session's inputs, recorded as a "replay" operation."""
        async def call() -> dict[str, Any]:
            await coordinator.replay_stage(stage, session_id, inputs, timeout)
            return {"metrics": dict(info)}

        await self._run_op(stage.browser_id, model, "replay", session_id, call)

    # ----- health, checkpoints, explicit recovery -------------------------------------------------
    async def _check_browser(self, browser_id: str) -> dict[str, Any]:
        try:
            report = await asyncio.wait_for(self._handles[browser_id].health.remote(), HEALTH_TIMEOUT * 2)
        except Exception as exc:    # whatever the browser answers instead of a health report is a failure
            failure = classify(exc, browser_id)
            await self._browser_failed(failure)
            if self.ft.recovers and not self._closed:
                self._spawn(self.recovery.recover(failure))
            return {"error": str(failure), "category": failure.category.value}
        async with self._lock(f"blocked:{browser_id}"):
            state = self.state.browsers.get(browser_id)
            new = report["blocked_requests"] - (state.blocked_requests if state is not None else 0)
            if state is not None and new > 0:
                log.warning("page attempted outside requests", extra={"browser_id": browser_id, "count": new})
                await self._record(ev.PageRequestsBlocked(browser_id=browser_id, count=new,
                                                          urls=tuple(report["blocked_urls"][-new:])))
        return report

    async def _check_nodes(self) -> None:
        """Browsers on a node Ray no longer lists as alive have failed with it (CONNECTION), busy or not."""
        alive_nodes = {n.node_id for n in await self._node_views()}
        for b in self._alive_states():
            if b.node_id and b.node_id not in alive_nodes:
                failure = ActorUnreachable(b.browser_id, FailureCategory.CONNECTION,
                                           f"its node {b.node_id[:12]} left the cluster")
                await self._browser_failed(failure)
                if self.ft.recovers and not self._closed:
                    self._spawn(self.recovery.recover(failure))

    async def _health_loop(self) -> None:
        """Check nodes, then idle browsers. A busy page (running a model, creating a session) cannot answer
        until its work is done; a hang there is caught by that request's own time budget instead."""
        while not self._closed:
            await asyncio.sleep(self.health_interval)
            try:
                await self._check_nodes()
            except Exception as exc:     # the GCS may be briefly unreachable: the browser checks still run
                log.warning("node check failed", extra={"error": str(exc)})
            for browser_id in self._live_ids():
                # Still alive now (one checked earlier in this pass may have failed it): a browser being
                # recovered is not probed.
                if (browser_id in self._live_ids() and browser_id in self._handles and not self._closed
                        and not self._in_flight.get(browser_id)):
                    await self._check_browser(browser_id)

    async def _scale_down_loop(self) -> None:
        """adaptive_scaling: retire serving browsers idle for ``scale_down_idle_s`` (keeping one). Growth
        needs no loop: placement launches a browser when the ones holding a model are busy."""
        while not self._closed:
            await asyncio.sleep(min(1.0, self.scale_down_idle_s / 4))
            async with self._lock("placement"):     # nothing is placed on a browser while it is judged idle
                idle = adaptive.idle_to_retire(self.state, self._in_flight, time.time(), self.scale_down_idle_s)
                serving = len(self._views())
                for browser_id in idle:
                    serving -= 1
                    await self._record(ev.PoolScaled(direction="down", browsers=serving, reason=(
                        f"{browser_id} idle for {self.scale_down_idle_s:g} s")))
                    await self._retire(browser_id, "scaled down: idle")

    async def _checkpoint_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.ft.checkpoint_interval)
            try:
                seq = await self._log.snapshot.remote()
                # The log appended a SnapshotWritten of its own (seq + 1): take it now, or the next record
                # would wait RECORD_GAP_WAIT for it as for a lost acknowledgement.
                await self._apply_acknowledged(await self._log.read.remote(seq + 1, seq + 1))
            except Exception as exc:
                log.warning("checkpoint failed", extra={"error": str(exc)})

    async def health(self) -> dict[str, Any]:
        """Each live browser's own report (models, PIDs, memory); failures are recorded (and recovered)."""
        await self._ensure_log()
        ids = [b for b in self._live_ids() if b in self._handles]
        reports = await asyncio.gather(*(self._check_browser(b) for b in ids))
        return dict(zip(ids, reports, strict=True))

    async def recover_browser(self, browser_id: str, category: str = "unknown", detail: str = "reported",
                              strategy: str | None = None) -> dict:
        """Recover a browser a caller saw fail (the guide's handle_browser_failure).

        ``strategy`` (reconnect | restart | failover | progressive | parallel) overrides the pool's
        configured one for this recovery; an explicit strategy is a request to recover, so it runs even
        when the pool's own level is none or low (as at medium).
        """
        await self._ensure_log()
        if browser_id not in self.state.browsers:
            raise InputError("browser_id", f"unknown browser {browser_id!r}")
        config = self.ft
        if strategy is not None:
            try:
                chosen = RecoveryStrategy(strategy)
            except ValueError:
                raise InputError("strategy", f"must be one of {[v.value for v in RecoveryStrategy]}") from None
            level = config.level if config.level in (FaultToleranceLevel.HIGH, FaultToleranceLevel.CRITICAL) \
                else FaultToleranceLevel.MEDIUM
            config = dataclasses.replace(config, level=level, recovery_strategy=chosen)
        failure = BrowserFailure(browser_id, category, detail)
        await self._browser_failed(failure)
        # An explicit reconnect is a first step its caller escalates from (to a restart): a failed one
        # leaves the browser failed, not retired, for that next step.
        return await self.recovery.recover(failure, config,
                                           retire_if_not_recovered=strategy != RecoveryStrategy.RECONNECT.value)

    async def place(self, model_name: str) -> dict[str, Any]:
        """A live browser holding ``model_name`` (whole, unsharded), loading it (launching a browser if
        allowed) as a request would: the guide's get_browser_for_model."""
        spec = get_spec(model_name)
        await self._ensure_log()
        [art] = await self._artifacts_for(spec.name)
        browser_id = await self._place(art, spec.task)
        return {"browser_id": browser_id, "browser_type": self.state.browsers[browser_id].browser_type,
                "backend": self._backend_of[browser_id]}

    async def inject_fault(self, browser_id: str, kind: str, **options: Any) -> dict[str, Any]:
        """Make a real fault happen in a browser (tests, benchmarks, the CLI). ``kill_actor`` kills its process."""
        handle = self._handles[browser_id]
        if kind == "kill_actor":
            ray.kill(handle, no_restart=True)
            return {"fault": kind, "browser_id": browser_id}
        return await handle.inject_fault.remote(kind, **options)

    async def get_state(self) -> PoolState:
        await self._ensure_log()
        return self.state

    async def get_recovery_statistics(self) -> dict[str, Any]:
        await self._ensure_log()
        return recovery_statistics(self.state)

    async def recent_events(self, n: int = 100) -> list[dict[str, Any]]:
        await self._ensure_log()
        return await self._log.recent.remote(n)

    async def browser_handle(self, browser_id: str) -> Any:
        """The actor handle of a browser (tests and fault injection use it)."""
        return self._handles[browser_id]

    async def shutdown(self) -> None:
        """Close every browser (removing its files) and retire it in the log."""
        self._closed = True
        for task in list(self._background):
            task.cancel()
        if self._log is None:
            return
        for browser_id in list(self._handles):
            state = self.state.browsers.get(browser_id)
            if state is not None and state.status not in ("retired", "quarantined"):
                await self._record(ev.BrowserRetired(browser_id=browser_id, reason="pool shutdown"))
            await self._stop_actor(browser_id)
        for handle in self._coordinators.values():
            ray.kill(handle, no_restart=True)
        self._coordinators.clear()
        self._model_refs.clear()


@ray.remote(num_cpus=0, max_restarts=0)
class ResourcePool(PoolCore):
    """The pool as a Ray actor: ``ray.get(pool.infer.remote(model, inputs))`` from any driver."""
