"""The fleet: the one owner of the pool's browser actor handles, model bytes and leases.

Everything that starts, loads, restarts, retires or stops a browser goes through here, and each change
is recorded in the log before the fleet returns (BrowserLaunched, ModelLoaded, ModelWarmedUp, BrowserFailed,
BrowserRetired, BrowserQuarantined). Placement and recovery use the fleet through its public methods;
what the fleet holds that the log does not is I/O: actor handles, model bytes in the object store
(``actors/model_copies.py``), and leases (requests using a browser right now), which balance by
construction (``lease`` is a context manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.browser_actor import BrowserActor
from actors.chromium import resolve_browser
from actors.constants import (
    ADOPT_PING_WAIT,
    BROWSER_ACTOR_NAMESPACE,
    BROWSER_ACTOR_PREFIX,
    BROWSER_START_TIMEOUT,
    STANDBY_BACKGROUND_S,
    STOP_BROWSER_WAIT,
    SUSPECT_NODE_S,
    WARMUP_MAX_S,
)
from actors.cutoff import CutOffs
from actors.decisions import placement
from actors.decisions.reconcile import keys_on
from actors.decisions.recovery import classify
from actors.decisions.warmup import warmed_up
from actors.model_copies import ModelCopies
from actors.pool_log import PoolLog
from events import schema as ev
from events.errors import ActorUnreachable, BrowserFailure, FailureCategory, describe
from events.state import ALIVE_STATUSES, CLOSED_STATUSES, browsers_alive, models_on
from sharding.models import registry
from sharding.models.registry import ModelArtifact, artifact_key_parts, artifacts

log = logging.getLogger(__name__)



async def collect(ref: Any) -> None:
    """Await a call that is expected to fail (its actor is killed, or kills itself), so its error is not reported
    as unhandled."""
    try:
        await ref
    except ray.exceptions.RayError:
        pass


def _new_browser_id() -> str:
    return f"browser-{uuid.uuid4().hex[:8]}"


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A BrowserActor created and starting (``started``: its ``start`` call) for the next browser to launch on
    ``node_id``."""
    browser_id: str
    browser_type: str
    node_id: str | None
    handle: Any
    started: Any


class KeyedLocks:
    """One asyncio.Lock per name, made on first use."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def __call__(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())


class Fleet:
    def __init__(self, log_: PoolLog, locks: KeyedLocks, spawn: Callable[[Awaitable[Any]], asyncio.Future], *,
                 num_threads: int | None, memory_limit_mb: int | None, backend: str, reporter: Any = None,
                 owner_id: str | None = None, spare_process: bool = False, pages_per_node: int = 1) -> None:
        self.log = log_
        self.reporter = reporter                        # the pool actor: browsers report their failures to it
        # The pool actor's id (the same in every incarnation): its browser actors are detached and named after
        # it, so they outlive a crash of the pool's process and its next incarnation finds them (``adopt``).
        # None in-process: browsers are then the pool's children.
        self.owner_id = owner_id
        self.locks = locks
        self._spawn = spawn
        self.num_threads = num_threads                  # None: each browser chooses for its node's cores...
        self.pages_per_node = pages_per_node            # ...and this many pages sharing them (decisions/threads.py)
        self.spare_process = spare_process              # each browser keeps a spare process for its restarts
        self.memory_limit_mb = memory_limit_mb
        self.backend = backend                          # the caller's preference: auto | wasm | webgpu | webnn
        self._handles: dict[str, Any] = {}              # browser_id -> BrowserActor handle
        self._artifacts: dict[tuple, list[ModelArtifact]] = {}
        self._resolved_types: dict[str, str] = {}
        self._leases: dict[str, int] = {}                # browser_id -> requests using it now
        self._launching: dict[str, int] = {}             # node_id -> browsers being started there
        self.standby_launching = 0                       # of those, the ones started as standbys
        self.cutoffs = CutOffs()                         # browsers whose actor was found unreachable
        self.model_copies = ModelCopies(self.call, self.is_cut_off, spawn)     # model bytes in the object store
        self._suspect_nodes: dict[str, float] = {}       # node_id -> when a browser there went unreachable
        self._prepared: _Prepared | None = None          # an actor made ahead of the next launch (``prepare``)

    def own_node_id(self) -> str:
        """The Ray node the pool runs on ("" outside Ray): browsers there share its cores."""
        return self.model_copies.own_node_id()

    # ----- handles and leases -------------------------------------------------------------------
    def handle(self, browser_id: str) -> Any:
        """The browser's actor. One the pool has stopped since (retired, quarantined: a recovery or a drain
        took it away while a request was on its way to it) is a BrowserFailure, which the request's
        recovery answers by placing it again, never a bare KeyError to the caller."""
        handle = self._handles.get(browser_id)
        if handle is None:
            state = self.log.state.browsers.get(browser_id)
            why = f"{state.status}: {state.status_reason}" if state is not None else "never launched"
            raise BrowserFailure(browser_id, FailureCategory.UNKNOWN, f"no longer in the pool ({why})"[:500])
        return handle

    def has_handle(self, browser_id: str) -> bool:
        return browser_id in self._handles

    @contextlib.contextmanager
    def lease(self, *browser_ids: str) -> Iterator[None]:
        """Count the browsers as busy while the block runs: placement, health checks, scale-down and
        draining read these counts. Taking a lease does not await, so a browser chosen by placement is
        seen busy from that moment."""
        for b in browser_ids:
            self._leases[b] = self._leases.get(b, 0) + 1
        try:
            yield
        finally:
            for b in browser_ids:
                self._leases[b] -= 1

    async def call(self, browser_id: str, ref: Any) -> Any:
        """Await ``ref``, a call to ``browser_id``'s actor, unless that actor is cut off first (``cut_off``):
        then the ActorUnreachable it was cut off with is raised at once. A call to an actor on a vanished node
        otherwise waits until Ray declares the node dead (tens of seconds at Ray's default settings)."""
        return await self.cutoffs.call(browser_id, ref)

    def cut_off(self, failure: ActorUnreachable) -> None:
        """The browser's actor answers nothing: end every call awaiting it (``call``) with ``failure``, and
        place no new browser on its node for ``SUSPECT_NODE_S``. A new actor under the same id starts clean."""
        self.cutoffs.cut(failure.browser_id, failure)
        state = self.log.state.browsers.get(failure.browser_id)
        if state is not None and state.node_id:
            self._suspect_nodes[state.node_id] = time.monotonic()
            self.model_copies.forget_node(state.node_id)

    def is_cut_off(self, browser_id: str) -> bool:
        return self.cutoffs.is_cut(browser_id)

    def leased(self, browser_id: str) -> int:
        return self._leases.get(browser_id, 0)

    @property
    def leases(self) -> Mapping[str, int]:
        return dict(self._leases)

    # ----- what browsers hold ------------------------------------------------------------------------
    def keys_on(self, browser_id: str) -> frozenset[str]:
        return keys_on(self.log.state, browser_id)

    async def artifacts_for(self, model: str, ranges: list[tuple[int, int]] | None = None) -> list[ModelArtifact]:
        """The ONNX files of ``model`` (split by layer ``ranges``), built once and then cached."""
        key = (model, tuple(ranges or ()))
        async with self.locks(f"build:{key}"):
            if key not in self._artifacts:
                self._artifacts[key] = await asyncio.to_thread(artifacts, model, ranges)
        return self._artifacts[key]

    async def artifact(self, model: str, shard: str | None) -> ModelArtifact:
        """One artifact by model and layer range ("a-b", or None for the whole model): from the plans
        built so far, else built alone (a restarted pool, or a shard whose plan this pool never built)."""
        for arts in list(self._artifacts.values()):
            for art in arts:
                if art.model == model and art.shard == shard:
                    return art
        async with self.locks(f"build:{model}:{shard}"):
            art = await asyncio.to_thread(registry.artifact, model, shard)
        self._artifacts.setdefault((model, ("one", shard)), [art])
        return art

    async def artifact_by_key(self, key: str) -> ModelArtifact:
        """The artifact a key names (``model/shard@sha``)."""
        return await self.artifact(*artifact_key_parts(key))

    async def artifacts_on(self, browser_id: str) -> list[ModelArtifact]:
        """What the log says ``browser_id`` held (every model, resolved through the registry): the work a
        replacement must take over."""
        return [await self.artifact(m.model, m.shard) for m in sorted(
            models_on(self.log.state, browser_id), key=lambda m: (m.model, m.shard or ""))]

    # ----- starting browsers ------------------------------------------------------------------------
    def browser_type(self, preferred: str) -> str:
        """The installed browser type for a preference (falling back when it is not installed)."""
        if preferred not in self._resolved_types:
            self._resolved_types[preferred] = resolve_browser(preferred).browser_type
        return self._resolved_types[preferred]

    async def alive_node_ids(self) -> frozenset[str]:
        """The nodes Ray lists as alive (its own verdict, suspects included)."""
        return frozenset(n["NodeID"] for n in await asyncio.to_thread(ray.nodes) if n.get("Alive"))

    async def node_views(self) -> list[placement.NodeView]:
        """Live Ray nodes and the live browsers the log places on each (browsers still starting count as
        serving there: two launches at once must not both pick the emptiest node). A suspect node (see
        ``cut_off``) is left out: no new browser goes there."""
        return self._node_views(await asyncio.to_thread(ray.nodes))

    def _node_views(self, nodes: list[dict[str, Any]]) -> list[placement.NodeView]:
        alive = browsers_alive(self.log.state)
        now = time.monotonic()
        suspect = {n for n, t in self._suspect_nodes.items() if now - t < SUSPECT_NODE_S}
        return [
            placement.NodeView(
                node_id=n["NodeID"], browser_slots=n.get("Resources", {}).get(placement.BROWSER_SLOTS),
                serving=sum(1 for b in alive if b.node_id == n["NodeID"] and not b.standby)
                + self._launching.get(n["NodeID"], 0),
                standby=sum(1 for b in alive if b.node_id == n["NodeID"] and b.standby))
            for n in nodes if n.get("Alive") and n["NodeID"] not in suspect
        ]

    async def launch(self, browser_type: str, standby: bool = False, avoid: frozenset[str] = frozenset()) -> str:
        """A new browser; ``avoid``: browsers whose nodes it should not share when another node can host it."""
        # The first launch takes the prepared actor or ends it (it may hold a node's browser slot).
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared.browser_type != browser_type:
            self._end_prepared(prepared)
            prepared = None
        browser_id = prepared.browser_id if prepared is not None else _new_browser_id()
        state = self.log.state
        avoid_nodes = frozenset(state.browsers[b].node_id for b in avoid if b in state.browsers)
        await self.start(browser_id, browser_type, standby, avoid_nodes, prepared)
        return browser_id

    async def start(self, browser_id: str, browser_type: str, standby: bool = False,
                    avoid_nodes: frozenset[str] = frozenset(), prepared: _Prepared | None = None) -> None:
        """A new BrowserActor, started and recorded (BrowserLaunched), on the node placement chooses
        (spread; a standby away from the serving browsers). Where nodes advertise ``browser_slots``,
        each browser takes one.

        A node can vanish before Ray lists it as dead (that takes seconds): an actor placed there dies
        before it starts. The launch is then tried again, once, away from that node. A browser that dies
        while starting is a BrowserFailure (its category from the signal), like any other. ``prepared``: an
        actor made ahead for ``browser_id`` (``prepare``), used if placement chooses its node, else ended.
        """
        excluded: set[str] = set()
        self.standby_launching += standby      # from the first await on: the standby upkeep counts it
        try:
            for attempt in range(2):
                try:
                    await self._start_on(browser_id, browser_type, standby, avoid_nodes, excluded, prepared)
                    return
                except ray.exceptions.RayActorError as exc:
                    prepared = None             # taken (and dead) or ended by the first attempt
                    if attempt == 1 or not excluded:
                        raise classify(exc, browser_id) from None
                    log.warning("browser died before it started; launching elsewhere",
                                extra={"browser_id": browser_id, "nodes_excluded": sorted(excluded),
                                       "error": str(exc)})
                except asyncio.TimeoutError as exc:      # BROWSER_START_TIMEOUT: the actor never answered
                    raise classify(exc, browser_id) from None
        finally:
            self.standby_launching -= standby

    async def _start_on(self, browser_id: str, browser_type: str, standby: bool,
                        avoid_nodes: frozenset[str], excluded: set[str], prepared: _Prepared | None) -> None:
        """One launch attempt; adds the node it chose to ``excluded`` before it starts there."""
        nodes = [n for n in await self.node_views() if n.node_id not in excluded]
        node_id = placement.choose_node(nodes, standby, avoid_nodes)
        key = node_id or ""
        if node_id is not None:
            excluded.add(node_id)
        self._launching[key] = self._launching.get(key, 0) + 1     # no await since choose_node: atomic
        try:
            if prepared is not None and prepared.node_id == node_id:
                handle, started = prepared.handle, prepared.started
            else:
                if prepared is not None:
                    self._end_prepared(prepared)
                handle = self._new_actor(browser_id, browser_type, nodes, node_id)
                started = handle.start.remote(background_s=STANDBY_BACKGROUND_S if standby else 0.0)
            try:
                info = await asyncio.wait_for(started, BROWSER_START_TIMEOUT)
            except BaseException:     # also cancelled (pool shutdown): an actor still waiting for a slot
                ray.kill(handle)      # would otherwise start a browser nobody owns
                raise
            await self._record_launch(browser_id, handle, info, standby)
        finally:
            self._launching[key] -= 1      # from here the log counts it

    def _new_actor(self, browser_id: str, browser_type: str, nodes: list[placement.NodeView],
                   node_id: str | None) -> Any:
        """A BrowserActor for ``browser_id`` on ``node_id`` (None: where Ray puts it); not started."""
        options: dict[str, Any] = {"name": None}
        if self.owner_id is not None:
            # A nonce: a new actor under a browser id whose old actor is still being killed takes no taken name.
            options |= {"name": f"{self._name_prefix()}{browser_id}:{uuid.uuid4().hex[:6]}", "lifetime": "detached",
                        "namespace": BROWSER_ACTOR_NAMESPACE}
        if any(n.browser_slots is not None for n in nodes):
            options["resources"] = {placement.BROWSER_SLOTS: 1}
        if node_id is not None:
            # Soft, and spilled when that node has no slot free: the node views count this pool's browsers
            # only, and a plain soft affinity waits for a busy node rather than use another (Ray's docs).
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True,
                                                                            _spill_on_unavailable=True)
        return BrowserActor.options(**options).remote(browser_id, browser_type, self.num_threads,
                                                      self.memory_limit_mb, self.reporter,
                                                      spare_process=self.spare_process,
                                                      pages_per_node=self.pages_per_node)

    def prepare(self, browser_type: str) -> None:
        """Create and start the next browser now, where the first launch will place it: its Ray worker process
        (a new Python process importing Ray and Playwright, 0.4-1 s here) and its Chromium start while the pool
        opens its log, instead of after (docs/facts.md, a pool's first answer). It is not the pool's until a
        launch takes it (records BrowserLaunched): the next launch does if it wants that browser type on that
        node, else ends it; ``discard_prepared`` ends one no launch came for."""
        if self.owner_id is None or self._prepared is not None:
            return
        nodes = self._node_views(ray.nodes())
        node_id = placement.choose_node(nodes, standby=False)
        browser_id = _new_browser_id()
        handle = self._new_actor(browser_id, browser_type, nodes, node_id)
        self._prepared = _Prepared(browser_id, browser_type, node_id, handle, handle.start.remote())

    def discard_prepared(self) -> None:
        """End the prepared browser, if any (the pool adopted its browsers, or shuts down)."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            self._end_prepared(prepared)

    def _end_prepared(self, prepared: _Prepared) -> None:
        """Kill its actor (its Chromium dies with it: PDEATHSIG; its folder's reaper cleans up); the start call's
        error is collected, not reported as unhandled."""
        ray.kill(prepared.handle)
        self._spawn(collect(prepared.started))

    async def _record_launch(self, browser_id: str, handle: Any, info: dict[str, Any], standby: bool) -> None:
        self._handles[browser_id] = handle
        self.cutoffs.reset(browser_id)     # a new actor under the id: its calls are not cut off
        backend = placement.choose_backend(info["backends"], info["detail"], self.backend)
        await self.log.record(ev.BrowserLaunched(
            browser_id=browser_id, browser_type=info["browser_type"], backend_caps=tuple(info["backends"]),
            pid=info["pid"], node_id=info["node_id"] or "", standby=standby, backend=backend,
            wasm_threads=info["wasm_threads"]))
        log.info("browser launched", extra={"browser_id": browser_id, "backend": backend,
                                            "standby": standby, "start_ms": round(info["start_ms"]),
                                            "from_spare": info.get("from_spare", False)})

    def _name_prefix(self) -> str:
        return f"{BROWSER_ACTOR_PREFIX}{self.owner_id}:"

    async def adopt(self, browser_ids: frozenset[str]) -> frozenset[str]:
        """After the pool's process died and Ray started it again: the browser actors of ``browser_ids`` (those
        the log has serving: ``decisions.reconcile.adoptable``) that outlived it, found by name and answering a
        ping within ``ADOPT_PING_WAIT``, are this pool's again, pages and models as they were. Every other
        browser actor named after this pool (on a lost node, silent, or never recorded) is killed. Returns the
        ids adopted."""
        if self.owner_id is None:
            return frozenset()
        prefix = self._name_prefix()
        named = await asyncio.to_thread(ray.util.list_named_actors, True)
        names = [a["name"] for a in named if a["namespace"] == BROWSER_ACTOR_NAMESPACE and a["name"].startswith(prefix)]
        if self._prepared is not None:          # this incarnation's own, not yet started
            names = [n for n in names if not n.startswith(f"{prefix}{self._prepared.browser_id}:")]

        async def answers(name: str) -> tuple[str, Any, bool]:
            try:
                handle = await asyncio.to_thread(ray.get_actor, name, BROWSER_ACTOR_NAMESPACE)
            except ValueError:             # gone since the list was read
                return name, None, False
            try:
                await asyncio.wait_for(handle.ping.remote(), ADOPT_PING_WAIT)
                return name, handle, True
            except Exception:
                return name, handle, False

        adopted: set[str] = set()
        for name, handle, alive in await asyncio.gather(*(answers(n) for n in names)):
            browser_id = name[len(prefix):].rsplit(":", 1)[0]
            if alive and browser_id in browser_ids and browser_id not in adopted:
                self._handles[browser_id] = handle
                self.cutoffs.reset(browser_id)
                adopted.add(browser_id)
            elif handle is not None:
                ray.kill(handle)
        return frozenset(adopted)

    async def relaunch(self, browser_id: str) -> None:
        """A new browser process under the same id (the restart step): in the same actor, or in a new actor
        (elsewhere if its node is dead) when the actor process itself is gone."""
        handle = self.handle(browser_id)
        previous = self.log.state.browsers[browser_id]
        if not self.is_cut_off(browser_id):         # else there is nothing to restart in: its actor is silent
            try:
                info = await self.call(browser_id, handle.restart.remote())
                await self._record_launch(browser_id, handle, info, previous.standby)
                return
            except (ray.exceptions.RayActorError, ActorUnreachable):
                pass
        ray.kill(handle)
        await self.start(browser_id, previous.browser_type, previous.standby)

    # ----- models ------------------------------------------------------------------------------------
    def stage(self, art: ModelArtifact) -> None:
        """Put ``art``'s bytes in the object store now, in the background, for a browser being launched to load
        it: the launch takes seconds, and the load then finds them there instead of putting them first (MiniLM's
        90 MB: ~0.25 s here, on a pool's first answer). A failure is the load's to report."""
        async def put() -> None:
            try:
                await self.model_copies.copy(art)
            except Exception as exc:
                log.info("model bytes not staged", extra={"model": art.key, "error": describe(exc)})

        self._spawn(put())

    async def load(self, browser_id: str, art: ModelArtifact) -> None:
        """Load ``art`` into the browser's page (ModelLoaded). A failure is recorded and raised as BrowserFailure."""
        backend = self.log.state.browsers[browser_id].backend
        t0 = time.perf_counter()
        # Creating a session blocks the page for seconds: a lease, so the health check does not take a
        # busy page for a hung one.
        with self.lease(browser_id):
            try:
                send_id = await self.model_copies.send(browser_id, self.handle(browser_id),
                                                       self.log.state.browsers[browser_id].node_id, art)
                await self.call(browser_id, self.handle(browser_id).load_received.remote(
                    send_id, art.key, art.sha256, backend))
            except (BrowserFailure, ray.exceptions.RayActorError) as exc:
                failure = classify(exc, browser_id)
                await self.mark_failed(failure)
                raise failure from None
        await self.log.record(ev.ModelLoaded(browser_id=browser_id, model=art.model, shard=art.shard,
                                             sha256=art.sha256, backend=backend,
                                             load_ms=(time.perf_counter() - t0) * 1000))

    async def ensure_loaded(self, browser_id: str, art: ModelArtifact) -> None:
        """Load ``art`` unless the browser holds it already (concurrent callers load it once)."""
        async with self.locks(f"load:{browser_id}:{art.key}"):
            if art.key not in self.keys_on(browser_id):
                await self.load(browser_id, art)

    async def warm_up(self, browser_id: str, art: ModelArtifact) -> bool:
        """Run warm-up rounds of ``art`` on a standby until ``warmed_up`` says its WebAssembly is optimised
        (ModelWarmedUp), within ``WARMUP_MAX_S``. Stops without recording when the browser stops being a
        standby (a failover took it: its real work comes first). Returns whether it recorded the warm-up;
        a failure is recorded and raised as BrowserFailure."""
        # In the object store once: each round's call passes the reference, not the arrays again.
        feeds = ray.put(await asyncio.to_thread(registry.warmup_feeds, art))
        rounds: list[float] = []
        deadline = time.monotonic() + WARMUP_MAX_S
        with self.lease(browser_id):
            while not warmed_up(rounds) and time.monotonic() < deadline:
                state = self.log.state.browsers.get(browser_id)
                if state is None or not state.standby or state.status not in ALIVE_STATUSES:
                    return False
                try:
                    rounds.append(await self.call(browser_id,
                                                  self.handle(browser_id).warm_up_round.remote(art.key, feeds)))
                except (BrowserFailure, ray.exceptions.RayActorError) as exc:
                    failure = classify(exc, browser_id)
                    await self.mark_failed(failure)
                    raise failure from None
        await self.log.record(ev.ModelWarmedUp(browser_id=browser_id, model=art.model, shard=art.shard,
                                               rounds=len(rounds), first_ms=rounds[0], last_ms=rounds[-1]))
        return True

    # ----- ending browsers ---------------------------------------------------------------------------
    async def mark_failed(self, failure: BrowserFailure) -> None:
        """Record a browser's failure once, however many requests and health checks saw it at once."""
        async with self.locks(f"failed:{failure.browser_id}"):
            state = self.log.state.browsers.get(failure.browser_id)
            if isinstance(failure, ActorUnreachable) and state is not None:
                self.model_copies.forget_node(state.node_id)     # its node may be gone
            if state is not None and state.status in ALIVE_STATUSES:
                await self.log.record(ev.BrowserFailed(browser_id=failure.browser_id,
                                                       category=failure.category.value, error=failure.detail[:500]))

    async def retire(self, browser_id: str, reason: str) -> None:
        if records := self.retirement(browser_id, reason):
            await self.log.record(*records)
        self.stop_soon(browser_id)

    def retirement(self, browser_id: str, reason: str) -> list[ev.Event]:
        """The record retiring ``browser_id`` (none if it is closed already), for a caller that appends it with
        its own records and then calls ``stop_soon``; ``retire`` does both alone."""
        state = self.log.state.browsers.get(browser_id)
        if state is None or state.status in CLOSED_STATUSES:
            return []
        return [ev.BrowserRetired(browser_id=browser_id, reason=reason)]

    def serving_soon(self, browser_id: str) -> None:
        """A standby about to take traffic leaves the background now (actors/priority.py), in the time the log
        takes to record its promotion, not when its first request comes (it cost that request 20-50 ms)."""
        if (handle := self._handles.get(browser_id)) is not None:
            self._spawn(collect(handle.leave_background.remote()))

    def stop_soon(self, browser_id: str) -> None:
        """``stop`` in the background (after its retirement is in the log)."""
        self._spawn(self.stop(browser_id))

    async def quarantine(self, browser_id: str, reason: str) -> None:
        await self.log.record(ev.BrowserQuarantined(browser_id=browser_id, reason=reason))
        self._spawn(self.stop(browser_id))

    async def stop(self, browser_id: str) -> None:
        """Close the browser (its files removed) and kill its actor."""
        handle = self._handles.pop(browser_id, None)
        silent = self.cutoffs.is_cut(browser_id)
        self.cutoffs.forget(browser_id)
        if handle is None:
            return
        if silent:                                  # its actor answers nothing: no close() to wait for
            ray.kill(handle)
            return
        try:
            await asyncio.wait_for(handle.close.remote(), STOP_BROWSER_WAIT)
        except Exception as exc:  # a dead browser has nothing left to close
            log.info("closing browser failed", extra={"browser_id": browser_id, "error": str(exc)})
        ray.kill(handle)

    async def close_all(self) -> None:
        """Retire every browser in the log (one record) and stop their actors, all at once (pool shutdown)."""
        browser_ids = list(self._handles)
        retiring = [b for b in browser_ids if (s := self.log.state.browsers.get(b)) is not None
                    and s.status not in CLOSED_STATUSES]
        if retiring:
            await self.log.record(*(ev.BrowserRetired(browser_id=b, reason="pool shutdown") for b in retiring))
        await asyncio.gather(*(self.stop(b) for b in browser_ids))
        self.model_copies.clear()
