"""ResourcePool: the front door. Validates and admits requests (or refuses them with a retry hint) and
hands them to the router; the public API of the pool, the guide's names and the coordinators' calls.

The pool is a thin shell over five parts, each the one owner of its thing:
- ``PoolLog`` (actors/pool_log.py): the projection of the event log, and the one way to change it;
- ``Fleet`` (actors/fleet.py): browser actor handles, model bytes, leases;
- ``Reconciler`` (actors/reconcile.py): the one control loop and the one entry into recovery;
- ``Router`` (actors/router.py): placement, recorded operations, retries, hedging and voting;
- ``Sessions`` (actors/sessions.py): generation sessions and the shard coordinators' calls.
Decisions are pure functions in actors/decisions/.

Guarantees:
- The pool's view of browsers, models and operations is the projection of the event log
  (``events.state``); it changes only by applying events the StateLog has acknowledged.
- Every OperationStarted is followed by exactly one OperationCompleted or OperationFailed.
- A request returns a correct result or raises a typed error: InputError for bad input (it never
  reaches a browser), PoolBusyError when ``max_queued_requests`` requests are already admitted (the
  refusal is a RequestRejected event), BrowserFailure at level none, NoBrowserAvailableError when
  recovery is exhausted. At levels >= low a failed browser is reported to the reconcile loop, which
  recovers it, and the request runs again, at most ``max_recovery_attempts`` times, with backoff.
- Browsers are the pool's children: ``shutdown`` closes them and removes their files.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import ray

from actors import logs
from actors.batching import AnswerRate
from actors.constants import (
    DEFAULT_BATCH_WAIT_MS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_MAX_QUEUED_ROWS,
    HEALTH_INTERVAL,
    RUN_TIMEOUT,
    SCALE_DOWN_IDLE_S,
)
from actors.decisions import batching, validation
from actors.decisions.reconcile import adoptable, ended_by_restart, in_open_session
from actors.decisions.recovery import (
    FaultToleranceConfig,
    FaultToleranceLevel,
    RecoveryStrategy,
)
from actors.fleet import Fleet, KeyedLocks, collect
from actors.pool_log import PoolLog
from actors.reconcile import Reconciler
from actors.router import Router
from actors.sessions import Sessions
from events import schema as ev
from events.errors import (
    ActorUnreachable,
    BrowserFailure,
    FailureCategory,
    InputError,
    PoolBusyError,
    show,
)
from events.state import ALIVE_STATUSES, PoolState, browsers_alive, recovery_statistics
from sharding.models.cache import cache_dir
from sharding.models.registry import get_spec

log = logging.getLogger(__name__)

TASK_FAMILIES = ("text_embedding", "text_generation")


def _own_handle() -> Any:
    """This pool's actor handle, for its browsers to report to; None when the pool runs in-process."""
    try:
        return ray.get_runtime_context().current_actor
    except RuntimeError:
        return None


def _own_actor_id() -> str | None:
    """This pool's actor id (the same in every incarnation); None when the pool runs in-process."""
    return ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None


class PoolCore:
    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 browser_preferences: dict[str, str] | None = None,
                 fault_tolerance: dict[str, Any] | None = None,
                 backend: str = "auto", num_threads: int | None = None,
                 event_log: str | None = None, name: str | None = None,
                 request_timeout: float = RUN_TIMEOUT, memory_limit_mb: int | None = None,
                 health_interval: float = HEALTH_INTERVAL,
                 max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
                 max_queued_rows: int = DEFAULT_MAX_QUEUED_ROWS,
                 adaptive_scaling: bool = False, scale_down_idle_s: float = SCALE_DOWN_IDLE_S,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
                 spare_process: bool | None = None) -> None:
        logs.configure()
        for field, value in (("max_connections", max_connections), ("max_queued_requests", max_queued_requests),
                             ("max_queued_rows", max_queued_rows), ("max_batch_size", max_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(field, f"must be a positive int, got {show(value)}")
        if num_threads is not None and (not isinstance(num_threads, int) or isinstance(num_threads, bool)
                                        or num_threads < 1):
            raise InputError("num_threads", f"must be a positive int or None (chosen per machine), "
                                            f"got {show(num_threads)}")
        if not isinstance(adaptive_scaling, bool):
            raise InputError("adaptive_scaling", f"must be a bool, got {show(adaptive_scaling)}")
        if isinstance(scale_down_idle_s, bool) or not isinstance(scale_down_idle_s, int | float) \
                or not scale_down_idle_s > 0:
            raise InputError("scale_down_idle_s",
                             f"must be a positive number, got {show(scale_down_idle_s)}")
        if spare_process is not None and not isinstance(spare_process, bool):
            raise InputError("spare_process", f"must be a bool or None, got {show(spare_process)}")
        if isinstance(batch_wait_ms, bool) or not isinstance(batch_wait_ms, int | float) or not batch_wait_ms >= 0:
            raise InputError("batch_wait_ms", f"must be a number >= 0, got {show(batch_wait_ms)}")
        self.max_connections = max_connections
        self.max_queued_requests = max_queued_requests
        self.max_queued_rows = max_queued_rows
        self.browser_preferences = {t: "chromium" for t in TASK_FAMILIES} | dict(browser_preferences or {})
        self.ft = FaultToleranceConfig.from_options(fault_tolerance)
        self.ft.check_voters(max_connections)
        if spare_process is None:      # by default where a restart is the likely recovery step
            spare_process = self.ft.restarts_in_place
        self.request_timeout = request_timeout
        self.name = name or f"webpool-{uuid.uuid4().hex[:8]}"
        self._options = {"backend": backend, "num_threads": num_threads, "memory_limit_mb": memory_limit_mb,
                         "health_interval": health_interval, "adaptive_scaling": adaptive_scaling,
                         "scale_down_idle_s": scale_down_idle_s, "max_batch_size": max_batch_size,
                         "batch_wait_ms": batch_wait_ms,
                         "spare_process": spare_process}    # the rest of what PoolConfigured records
        self._admitted = 0                               # requests inside infer/generate right now
        self._admitted_rows = 0                          # their rows (texts; a generation counts one)
        self._no_requests = asyncio.Event()              # set while no request is admitted
        self._no_requests.set()
        self._answer_rate = AnswerRate()
        self._background: set[asyncio.Future] = set()
        self._closed = False
        self._shut_down = asyncio.Event()              # set by shutdown (until_closed answers then)
        self._started = False
        self.locks = KeyedLocks()
        self.log = PoolLog(self.name, event_log or str(cache_dir() / "events" / self.name))
        # The pool's browsers may all share one node: each sizes its page's threads for that (decisions/threads.py).
        self.fleet = Fleet(self.log, self.locks, self._spawn, num_threads=num_threads,
                           memory_limit_mb=memory_limit_mb, backend=backend, reporter=_own_handle(),
                           owner_id=_own_actor_id(), spare_process=spare_process, pages_per_node=max_connections)
        self.reconciler = Reconciler(self.fleet, self.ft, self.locks, self._spawn, health_interval=health_interval,
                                     adaptive_scaling=adaptive_scaling, scale_down_idle_s=float(scale_down_idle_s),
                                     standby_type=lambda: self.router.browser_type("text_embedding"),
                                     until_no_requests=self._until_no_requests,
                                     tell_sessions=lambda failure: self.sessions.cut_off(failure))
        self.router = Router(self.fleet, self.reconciler, self.ft, self.locks, self._spawn,
                             browser_preferences=self.browser_preferences, request_timeout=request_timeout,
                             max_connections=max_connections, max_batch_size=max_batch_size,
                             batch_wait_ms=batch_wait_ms)
        self.sessions = Sessions(self.fleet, self.reconciler, self.ft, self.locks, self.router.run_op,
                                 self.router.place, request_timeout, max_connections)
        if self.fleet.owner_id is not None and not ray.get_runtime_context().was_current_actor_reconstructed:
            # A new pool's first browser actor comes up while the log opens (an incarnation Ray restarted
            # adopts the browsers its predecessor left instead).
            try:
                self.fleet.prepare(self.router.browser_type("text_embedding"))
            except Exception as exc:       # a browser that cannot be had is the first request's error to give
                log.info("no browser actor prepared", extra={"pool": self.name, "error": str(exc)})

    @property
    def state(self) -> PoolState:
        return self.log.state

    # ----- start-up and background work ---------------------------------------------------------------
    async def _ensure_log(self) -> None:
        """Open the log (once) and start the reconcile loop."""
        if self._started:
            return
        async with self.locks("log"):
            if self._started:
                return
            await self.log.open()
            # An earlier incarnation's work and coordinators died with it; its browser actors outlive it, and
            # those still alive serve on. The log says so before anything new starts.
            adopted = await self.fleet.adopt(adoptable(self.state)) if self.state.last_seq else frozenset()
            if adopted:
                self.fleet.discard_prepared()
            if ended := ended_by_restart(self.state, adopted):
                log.warning("pool rebuilt from its log", extra={"pool": self.name, "last_seq": self.state.last_seq,
                                                                "closed": len(ended), "adopted": sorted(adopted)})
                await self.log.record(*ended)
            configured = self._configured()
            if dict(self.state.config) != {"level": configured.level, "options": configured.options,
                                           "recovery_strategy": configured.recovery_strategy}:
                await self.log.record(configured)
            self._spawn(self.reconciler.run())
            self._started = True

    def _configured(self) -> ev.PoolConfigured:
        """This pool's configuration as an event (options as JSON data: the log says how the pool ran)."""
        ft = {f.name: getattr(self.ft, f.name) for f in dataclasses.fields(self.ft)}
        options = {"max_connections": self.max_connections, "max_queued_requests": self.max_queued_requests,
                   "max_queued_rows": self.max_queued_rows,
                   "browser_preferences": self.browser_preferences, "request_timeout": self.request_timeout,
                   "fault_tolerance": {k: getattr(v, "value", v) for k, v in ft.items()}, **self._options}
        return ev.PoolConfigured(level=self.ft.level.value, recovery_strategy=self.ft.recovery_strategy.value,
                                 options=options)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Future:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @contextlib.asynccontextmanager
    async def _admission(self, model: str, rows: int) -> AsyncIterator[None]:
        """Admit a request of ``rows`` rows, or refuse it with PoolBusyError when ``max_queued_requests``
        requests, or ``max_queued_rows`` rows with it, are in (a request alone is always admitted). The
        error says when to retry: the rows ahead at the pool's recent rate, the faster of the rate it answered
        rows at while it had work (``AnswerRate``) and its serving pages' own (``batching.page_rows_per_s``).

        The check and the count happen with no await between them, so the bounds are exact.
        """
        over_rows = self._admitted and self._admitted_rows + rows > self.max_queued_rows
        if self._admitted >= self.max_queued_requests or over_rows:
            admitted, admitted_rows = self._admitted, self._admitted_rows
            retry = batching.retry_after_s(admitted_rows, (self._answer_rate.rows_per_s(),
                                                           batching.page_rows_per_s(self.log.state, model)))
            rejected = (ev.RequestRejected(model=model, reason="busy_rows", admitted=admitted_rows,
                                           limit=self.max_queued_rows) if over_rows else
                        ev.RequestRejected(model=model, reason="busy", admitted=admitted,
                                           limit=self.max_queued_requests))
            await self._ensure_log()
            await self.log.record(rejected)
            raise PoolBusyError(f"pool busy: {admitted} requests ({admitted_rows} rows) in progress "
                                f"(max_queued_requests={self.max_queued_requests}, max_queued_rows="
                                f"{self.max_queued_rows}); retry in {retry:.2f} s", retry_after_s=retry)
        if not self._admitted:
            self._answer_rate.work_began()
        self._admitted += 1
        self._admitted_rows += rows
        self._no_requests.clear()
        try:
            yield
            self._answer_rate.add(rows)
        finally:
            self._admitted -= 1
            self._admitted_rows -= rows
            if not self._admitted:
                self._answer_rate.work_ended()
                self._no_requests.set()

    async def _until_no_requests(self, timeout: float) -> bool:
        """Wait until no request is admitted (or ``timeout`` s); returns whether none is."""
        try:
            await asyncio.wait_for(self._no_requests.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _detached(self, model: str, work: Callable[[], Awaitable[dict[str, Any]]],
                        rows: int = 1) -> dict[str, Any]:
        """Run an admitted request as the pool's own task: a caller that goes away (Ray cancels the calls
        of a driver that dies) does not cancel the work, which ends in OperationCompleted or -Failed."""
        async def admitted() -> dict[str, Any]:
            async with self._admission(model, rows):
                return await work()

        return await asyncio.shield(self._spawn(admitted()))

    # ----- placement ----------------------------------------------------------------------------------
    def _live_ids(self) -> list[str]:
        return [b.browser_id for b in browsers_alive(self.state)]

    # ----- requests -----------------------------------------------------------------------------------
    async def infer(self, model_name: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """Embed ``{"text": str}`` (one vector) or ``{"texts": [str, ...]}`` (a matrix)."""
        spec, request = validation.embedding_request(model_name, inputs)

        async def work() -> dict[str, Any]:
            await self._ensure_log()
            return await self.router.embed(spec, request)

        return await self._detached(spec.name, work, rows=len(request.texts))

    async def generate(self, model_name: str, prompt: str, max_new_tokens: int = 16, shards: int = 1,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> dict[str, Any]:
        """Generate text with a llama model split over ``shards`` browsers (greedy unless temperature > 0)."""
        spec, req = validation.generation_request(model_name, prompt, max_new_tokens, shards, temperature,
                                                  top_p, seed)

        async def work() -> dict[str, Any]:
            await self._ensure_log()
            return await self.sessions.generate(spec, req, self.router.voted, self.router.with_recovery)

        return await self._detached(spec.name, work)

    async def coordinator(self, model_name: str) -> Any:
        """The handle of ``model_name``'s ShardCoordinator (started if needed): its ``pid`` is a fault to inject."""
        return await self.sessions.coordinator_of(model_name)

    # ----- called by ShardCoordinator actors (see actors/sessions.py) ---------------------------------
    async def session_begin(self, session_id: str, model: str, plan: dict[str, Any]) -> dict[str, list[int]] | None:
        return await self.sessions.begin(session_id, model, plan)

    async def session_append(self, session_id: str, position: int, token_ids: list[int]) -> None:
        await self.sessions.append(session_id, position, token_ids)

    async def shard_replace(self, failure: BrowserFailure, artifact_key: str, avoid: list[str]) -> Any:
        return await self.sessions.replace(failure, artifact_key, avoid)

    async def shard_lost(self, session_id: str, shard: int, failure: BrowserFailure, promoted: str | None) -> None:
        await self.sessions.lost(session_id, shard, failure, promoted)

    async def shard_replay(self, session_id: str, model: str, stage: Any, inputs: dict[str, Any],
                           info: dict[str, Any], timeout: float) -> None:
        await self.sessions.replay(session_id, model, stage, inputs, info, timeout)

    # ----- health, explicit recovery, inspection ------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        """Each live browser's own report (models, PIDs, memory); failures are reported (and recovered)."""
        await self._ensure_log()
        ids = [b for b in self._live_ids() if self.fleet.has_handle(b)]
        reports = await asyncio.gather(*(self.reconciler.check(b) for b in ids))
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
            level = config.level if config.keeps_standby else FaultToleranceLevel.MEDIUM
            config = dataclasses.replace(config, level=level, recovery_strategy=chosen)
        # An explicit reconnect is a first step its caller escalates from (to a restart): a failed one
        # leaves the browser failed, not retired, for that next step.
        return await self.reconciler.report(BrowserFailure(browser_id, category, detail), config,
                                            retire_if_not_recovered=strategy != RecoveryStrategy.RECONNECT.value)

    async def browser_failed(self, browser_id: str, category: str, detail: str,
                             exited_pid: int | None = None) -> None:
        """A browser actor saw its browser fail (process exit, page crash, lost connection): recovered now,
        not when the next request or health check meets the dead browser. Ignored at level none (a failure
        is then the error of the request that meets it, for its caller to handle), when the pool knows of
        the failure already (the browser is not alive in the log), when an open generation session uses
        the browser (the session handles its shards' failures), and when a recovery revived it since: the exit
        of the process the log says the browser runs (``exited_pid``) is final, anything else is asked of the
        browser actor (a round trip, ~5-10 ms on a busy machine, in which requests still went to the dead
        browser)."""
        await self._ensure_log()
        state = self.state.browsers.get(browser_id)
        if not self.ft.recovers or self._closed or state is None or state.status not in ALIVE_STATUSES \
                or in_open_session(self.state, browser_id) or not self.fleet.has_handle(browser_id):
            return
        if exited_pid is not None and exited_pid == state.pid:
            now: tuple[str, str] | None = (category, detail)
        else:
            try:
                now = await self.fleet.call(browser_id, self.fleet.handle(browser_id).current_failure.remote())
            except (ray.exceptions.RayActorError, ActorUnreachable):
                now = (category, detail)         # its actor died since: still failed
        if now is not None:
            self.reconciler.report_soon(BrowserFailure(browser_id, FailureCategory(now[0]), now[1]))

    async def place(self, model_name: str) -> dict[str, Any]:
        """A live browser holding ``model_name`` (whole, unsharded), loading it (launching a browser if
        allowed) as a request would: the guide's get_browser_for_model."""
        spec = get_spec(model_name)
        await self._ensure_log()
        [art] = await self.fleet.artifacts_for(spec.name)
        browser_id = await self.router.place(art, spec.task)
        state = self.state.browsers[browser_id]
        return {"browser_id": browser_id, "browser_type": state.browser_type, "backend": state.backend}

    async def inject_fault(self, browser_id: str, kind: str, **options: Any) -> dict[str, Any]:
        """Make a real fault happen in a browser (tests, benchmarks, the CLI). ``kill_actor`` kills its process."""
        handle = self.fleet.handle(browser_id)
        if kind == "kill_actor":
            # The actor SIGKILLs its own process (on any node), as a crash or the OOM killer would; the call
            # never answers, so it is not awaited here (its error is collected in the background).
            self._spawn(collect(handle.inject_fault.remote(kind)))
            return {"fault": kind, "browser_id": browser_id}
        # Leased like a request while it runs: a fault that is work in the page (exhaust_memory allocates for
        # seconds on a loaded machine) must not be met half-done by a health check, whose timeout would then
        # end the page's script and leave a different fault than the one asked for.
        with self.fleet.lease(browser_id):
            return await handle.inject_fault.remote(kind, **options)

    async def get_state(self) -> PoolState:
        await self._ensure_log()
        return self.state

    async def get_recovery_statistics(self) -> dict[str, Any]:
        await self._ensure_log()
        return recovery_statistics(self.state)

    async def recent_events(self, n: int = 100) -> list[dict[str, Any]]:
        await self._ensure_log()
        return await self.log.recent(n)

    async def events_since(self, seq: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Long poll: the log's events after ``seq`` (``recent_events``' shape), waiting up to ``timeout`` for
        the first; ``[]`` if none came. Call again with the last one's seq to follow the pool as it works: a
        call per batch of events, where polling ``get_state`` copies the whole projection each time (at
        100 calls/s that took CPU from the generation a test was watching)."""
        await self._ensure_log()
        return await self.log.follow(seq + 1, timeout)

    async def pid(self) -> int:
        """This pool's process id (a fault to inject: kill it and Ray restarts the pool, which rebuilds)."""
        return os.getpid()

    async def probes(self) -> dict[str, Any]:
        """What the reconcile loop's probes of the browsers' actors see now (see Reconciler.probe_view)."""
        return self.reconciler.probe_view()

    async def node_id(self) -> str:
        """The Ray node this incarnation of the pool runs on."""
        return ray.get_runtime_context().get_node_id()

    async def browser_handle(self, browser_id: str) -> Any:
        """The actor handle of a browser (tests and fault injection use it)."""
        return self.fleet.handle(browser_id)

    async def until_closed(self) -> None:
        """Answers once the pool has shut down. Each browser actor keeps one such call open: a pool killed for
        good (not restarted by Ray) fails it, and the browser, which outlives only a restart, then ends itself."""
        await self._shut_down.wait()

    async def shutdown(self) -> None:
        """Close every browser (removing its files) and retire it in the log."""
        self._closed = self.reconciler.closed = self.router.closed = True
        self._shut_down.set()
        for task in list(self._background):
            task.cancel()
        self.fleet.discard_prepared()
        if not self._started:
            return
        await self.fleet.close_all()
        self.sessions.close()


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ResourcePool(PoolCore):
    """The pool as a Ray actor: ``ray.get(pool.infer.remote(model, inputs))`` from any driver.

    Ray restarts it whenever its process dies (on another node if its own is gone) and retries the
    calls that were in flight; the new incarnation rebuilds from its log (``ended_by_restart``) and
    runs them again. A call is therefore run at least once; each run is its own recorded operation.
    """
