"""ResourcePool: the front door. Validates and admits requests, places models on browsers, runs requests as
recorded operations, and answers by vote at level critical.

The pool is a thin shell over four parts, each the one owner of its thing:
- ``PoolLog`` (actors/pool_log.py): the projection of the event log, and the one way to change it;
- ``Fleet`` (actors/fleet.py): browser actor handles, model bytes, leases;
- ``Reconciler`` (actors/reconcile.py): the one control loop and the one entry into recovery;
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
import collections
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import ray

from actors.batching import Batcher
from actors.constants import (
    ANSWER_RATE_WINDOW_S,
    BATCHES_PER_BROWSER,
    BUSY_THRESHOLD,
    DEFAULT_BATCH_WAIT_MS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_MAX_QUEUED_ROWS,
    DEFAULT_NUM_THREADS,
    HEALTH_INTERVAL,
    RUN_TIMEOUT,
    SCALE_DOWN_IDLE_S,
)
from actors.decisions import adaptive, batching, hedging, placement, validation
from actors.decisions.reconcile import ended_by_restart, in_open_session, warm_keys_on
from actors.decisions.recovery import (
    FaultToleranceConfig,
    FaultToleranceLevel,
    RecoveryStrategy,
    classify,
    retry_delay,
)
from actors.decisions.voting import vote_embeddings
from actors.fleet import Fleet, KeyedLocks
from actors.pool_log import PoolLog
from actors.reconcile import Reconciler
from actors.sessions import Sessions, digest
from events import schema as ev
from events.errors import (
    ActorUnreachable,
    BrowserFailure,
    FailureCategory,
    InputError,
    NoBrowserAvailableError,
    NoMajorityError,
    PoolBusyError,
    WebpoolError,
    describe,
    show,
)
from events.state import ALIVE_STATUSES, PoolState, browsers_alive, recovery_statistics
from sharding.models import minilm
from sharding.models.cache import cache_dir
from sharding.models.registry import ModelArtifact, ModelSpec, get_spec

log = logging.getLogger(__name__)

TASK_FAMILIES = ("text_embedding", "text_generation")


class _AnswerRate:
    """Rows answered per second over the last ``ANSWER_RATE_WINDOW_S``: what a refused client's retry
    hint is computed from (an observation of this process, like the admitted counts; not pool state)."""

    def __init__(self) -> None:
        self._answers: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, rows: int) -> None:
        self._answers.append((time.monotonic(), rows))

    def rows_per_s(self) -> float | None:
        now = time.monotonic()
        while self._answers and self._answers[0][0] < now - ANSWER_RATE_WINDOW_S:
            self._answers.popleft()
        if not self._answers:
            return None
        return sum(rows for _, rows in self._answers) / max(now - self._answers[0][0], 0.1)


@dataclasses.dataclass(frozen=True)
class _Embedding:
    """One embedding request, tokenized: what a batch is made of."""

    request: validation.EmbeddingRequest
    feeds: dict[str, Any]
    digest: str


def _own_handle() -> Any:
    """This pool's actor handle, for its browsers to report to; None when the pool runs in-process."""
    try:
        return ray.get_runtime_context().current_actor
    except RuntimeError:
        return None


class PoolCore:
    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 browser_preferences: dict[str, str] | None = None,
                 fault_tolerance: dict[str, Any] | None = None,
                 backend: str = "auto", num_threads: int = DEFAULT_NUM_THREADS,
                 event_log: str | None = None, name: str | None = None,
                 request_timeout: float = RUN_TIMEOUT, memory_limit_mb: int | None = None,
                 health_interval: float = HEALTH_INTERVAL,
                 max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
                 max_queued_rows: int = DEFAULT_MAX_QUEUED_ROWS,
                 adaptive_scaling: bool = False, scale_down_idle_s: float = SCALE_DOWN_IDLE_S,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS) -> None:
        for field, value in (("max_connections", max_connections), ("max_queued_requests", max_queued_requests),
                             ("max_queued_rows", max_queued_rows), ("max_batch_size", max_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(field, f"must be a positive int, got {show(value)}")
        if not isinstance(adaptive_scaling, bool):
            raise InputError("adaptive_scaling", f"must be a bool, got {show(adaptive_scaling)}")
        if isinstance(scale_down_idle_s, bool) or not isinstance(scale_down_idle_s, int | float) \
                or not scale_down_idle_s > 0:
            raise InputError("scale_down_idle_s",
                             f"must be a positive number, got {show(scale_down_idle_s)}")
        if isinstance(batch_wait_ms, bool) or not isinstance(batch_wait_ms, int | float) or not batch_wait_ms >= 0:
            raise InputError("batch_wait_ms", f"must be a number >= 0, got {show(batch_wait_ms)}")
        self.max_connections = max_connections
        self.max_queued_requests = max_queued_requests
        self.max_queued_rows = max_queued_rows
        self.browser_preferences = {t: "chromium" for t in TASK_FAMILIES} | dict(browser_preferences or {})
        self.ft = FaultToleranceConfig.from_options(fault_tolerance)
        self.ft.check_voters(max_connections)
        self.request_timeout = request_timeout
        self.name = name or f"webpool-{uuid.uuid4().hex[:8]}"
        self._options = {"backend": backend, "num_threads": num_threads, "memory_limit_mb": memory_limit_mb,
                         "health_interval": health_interval, "adaptive_scaling": adaptive_scaling,
                         "scale_down_idle_s": scale_down_idle_s, "max_batch_size": max_batch_size,
                         "batch_wait_ms": batch_wait_ms}    # the rest of what PoolConfigured records
        self._admitted = 0                               # requests inside infer/generate right now
        self._admitted_rows = 0                          # their rows (texts; a generation counts one)
        self._no_requests = asyncio.Event()              # set while no request is admitted
        self._no_requests.set()
        self._answer_rate = _AnswerRate()
        self._background: set[asyncio.Future] = set()
        self._growing: set[asyncio.Future] = set()       # browsers starting for placement (see _grow)
        self._closed = False
        self._started = False
        self.locks = KeyedLocks()
        self.log = PoolLog(self.name, event_log or str(cache_dir() / "events" / self.name))
        self.fleet = Fleet(self.log, self.locks, self._spawn, num_threads=num_threads,
                           memory_limit_mb=memory_limit_mb, backend=backend, reporter=_own_handle())
        self.reconciler = Reconciler(self.fleet, self.ft, self.locks, self._spawn, health_interval=health_interval,
                                     adaptive_scaling=adaptive_scaling, scale_down_idle_s=float(scale_down_idle_s),
                                     standby_type=lambda: self._browser_type("text_embedding"),
                                     until_no_requests=self._until_no_requests)
        # Level high: how many slow requests may be hedged.
        self.hedge_budget = hedging.Budget(self.ft.hedge_budget, now=time.monotonic())
        # Embedding requests that queue for a model run together (max_batch_size 1: each runs alone).
        self.batcher = None if max_batch_size == 1 else Batcher(
            self._embed_batch, lambda: self.max_connections * BATCHES_PER_BROWSER, max_batch_size,
            batch_wait_ms / 1000, self._spawn)
        self.sessions = Sessions(self.fleet, self.reconciler, self.ft, self.locks, self._run_op, self._place,
                                 request_timeout, max_connections)

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
            # What an earlier incarnation of this pool left open died with it (browsers, coordinators and
            # their work are its children): the log says so before anything new starts.
            if ended := ended_by_restart(self.state):
                log.warning("pool rebuilt from its log", extra={"pool": self.name, "last_seq": self.state.last_seq,
                                                                "closed": len(ended)})
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
        error says when to retry: the rows ahead at the pool's recent answer rate.

        The check and the count happen with no await between them, so the bounds are exact.
        """
        over_rows = self._admitted and self._admitted_rows + rows > self.max_queued_rows
        if self._admitted >= self.max_queued_requests or over_rows:
            admitted, admitted_rows = self._admitted, self._admitted_rows
            retry = batching.retry_after_s(admitted_rows, self._answer_rate.rows_per_s())
            rejected = (ev.RequestRejected(model=model, reason="busy_rows", admitted=admitted_rows,
                                           limit=self.max_queued_rows) if over_rows else
                        ev.RequestRejected(model=model, reason="busy", admitted=admitted,
                                           limit=self.max_queued_requests))
            await self._ensure_log()
            await self.log.record(rejected)
            raise PoolBusyError(f"pool busy: {admitted} requests ({admitted_rows} rows) in progress "
                                f"(max_queued_requests={self.max_queued_requests}, max_queued_rows="
                                f"{self.max_queued_rows}); retry in {retry:.2f} s", retry_after_s=retry)
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
    def _browser_type(self, task: str) -> str:
        return self.fleet.browser_type(self.browser_preferences.get(task, "chromium"))

    def _live_ids(self) -> list[str]:
        return [b.browser_id for b in browsers_alive(self.state)]

    def _views(self, model: str | None = None) -> list[placement.BrowserView]:
        """Browsers that take traffic (alive, not standby, not draining), with their expected cost for
        ``model`` from the performance history."""
        return [
            placement.BrowserView(b.browser_id, b.browser_type, self.fleet.keys_on(b.browser_id),
                                  self.fleet.leased(b.browser_id),
                                  adaptive.expected_cost(self.state.perf.get((b.browser_id, model))) if model else None)
            for b in browsers_alive(self.state) if not b.standby and not b.draining
        ]

    async def _place(self, art: ModelArtifact, task: str, avoid: frozenset[str] = frozenset(),
                     busy_at: int = BUSY_THRESHOLD, grow_meanwhile: bool = False) -> str:
        """A live browser holding ``art``: found, or made so by loading it (launching if allowed);
        ``busy_at`` and ``grow_meanwhile`` as in ``placement.place``.

        A new browser starts outside the placement lock (it takes seconds): meanwhile other requests are
        placed on the browsers there are, the starting ones counted towards ``max_connections``.

        When no live browser holding ``art`` is free but one that held it is being recovered, the
        request first waits for that recovery (at most its own time budget): the recovery brings the
        model back (a reconnect takes ~50 ms), where loading it elsewhere takes seconds and may take
        a browser more.
        """
        waited = False
        recovery = self.reconciler.recovery
        reservation = contextlib.ExitStack()
        while True:
            new: asyncio.Future | None = None
            async with self.locks("placement"):
                browser_type = self._browser_type(task)
                views = self._views(art.model)
                if avoid and len(views) >= self.max_connections and all(v.browser_id in avoid for v in views):
                    raise NoBrowserAvailableError(f"no browser outside {sorted(avoid)} for {art.key} "
                                                  f"(max_connections={self.max_connections})")
                decision = placement.place(art.key, views, self.max_connections, browser_type, avoid, busy_at,
                                           launching=len(self._growing), grow_meanwhile=grow_meanwhile)
                recovering = [] if waited or decision.action == "use" else recovery.restoring(art.key, avoid)
                if not recovering and decision.action == "wait":
                    recovering = list(self._growing)
                elif not recovering:
                    browser_id = decision.browser_id
                    if decision.action == "launch":
                        busy = sum(v.in_flight for v in views)
                        await self.log.record(ev.PoolScaled(direction="up", browsers=len(views) + 1, reason=(
                            f"{busy} request(s) in flight on {len(views)} browser(s) for {art.key}" if views
                            else f"no browser yet for {art.key}")))
                        new = self._grow(art, browser_type, avoid)
                    if browser_id is not None:
                        # Leased before the lock is released: the next placement sees this browser busy.
                        reservation.enter_context(self.fleet.lease(browser_id))
                        break
            if new is not None:
                browser_id = await new        # a failure to start is this request's, as it was its launch
                reservation.enter_context(self.fleet.lease(browser_id))
                break
            waited = True
            await asyncio.wait(recovering, timeout=self.request_timeout)
        with reservation:
            await self.fleet.ensure_loaded(browser_id, art)
        return browser_id

    def _grow(self, art: ModelArtifact, browser_type: str, avoid: frozenset[str]) -> asyncio.Future:
        """Start a browser holding ``art``, in the background; counted in ``_growing`` until it is up. A
        failure nobody awaits is logged (the fleet has recorded it)."""
        async def grow() -> str:
            browser_id = await self.fleet.launch(browser_type, avoid=avoid)
            await self.fleet.ensure_loaded(browser_id, art)
            return browser_id

        def done(task: asyncio.Future) -> None:
            self._growing.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.warning("growing the pool failed", extra={"model": art.model, "error": describe(task.exception())})

        task = self._spawn(grow())
        self._growing.add(task)
        task.add_done_callback(done)
        return task

    # ----- operations ---------------------------------------------------------------------------------
    async def _run_op(self, browser_id: str, model: str, kind: str, input_digest: str,
                      call: Callable[[str], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Run ``call(op_id)`` on a browser as one recorded operation (see ``_run_ops``)."""
        return await self._run_ops(browser_id, model, kind, [input_digest], lambda op_ids: call(op_ids[0]))

    async def _run_ops(self, browser_id: str, model: str, kind: str, input_digests: Sequence[str],
                       call: Callable[[list[str]], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Run ``call(op_ids)`` on a browser as one recorded operation per input (started -> completed |
        failed): several when a batch of requests shares one page run. Their starts are appended together,
        and so are their ends; each end's metrics are the call's ``metrics`` and its ``op_metrics[i]``.

        Any browser-side failure is classified, recorded (OperationFailed, BrowserFailed) and raised
        as BrowserFailure; so is an error of no documented type (a Playwright or runtime error), which a
        caller must never see raw. Input errors and the pool's own errors go to the caller unchanged.
        """
        op_ids = [uuid.uuid4().hex for _ in input_digests]
        # Leased before the first await: placement must see this browser busy from the moment it was chosen.
        with self.fleet.lease(browser_id):
            # The starts are appended while the browser works: nothing is answered from these operations
            # until their starts are acknowledged, and their ends are appended only after that (Ray does not
            # order calls to the log, so an end must not race its start).
            started = asyncio.ensure_future(self.log.record(*(ev.OperationStarted(
                op_id=op_id, model=model, browser_id=browser_id, kind=kind, input_digest=input_digest)
                for op_id, input_digest in zip(op_ids, input_digests, strict=True))))
            t0 = time.perf_counter()
            try:
                result = await call(op_ids)
            except BaseException as exc:
                await started
                cause = getattr(exc, "cause", None) or exc
                if (isinstance(cause, InputError | WebpoolError) and not isinstance(cause, BrowserFailure)) \
                        or not isinstance(exc, Exception):
                    # The caller's input, the pool's own answer (no browser, busy, no majority), or a
                    # cancellation: the browser is fine, and the error goes to the caller as it is.
                    await self.log.record(*(ev.OperationFailed(op_id=op_id, category="unknown",
                                                               error=describe(exc)) for op_id in op_ids))
                    raise
                # Anything else the browser's side raised (a BrowserFailure, a dead actor, a time budget,
                # or an error of no documented type) is the browser failing: recorded, and recovered.
                failure = classify(exc, browser_id)
                await self.log.record(*(ev.OperationFailed(op_id=op_id, category=failure.category.value,
                                                           error=str(failure)[:500]) for op_id in op_ids))
                await self.fleet.mark_failed(failure)
                raise failure from None
            duration_ms = (time.perf_counter() - t0) * 1000
            await started
        metrics = result.get("metrics", {})
        own = result.get("op_metrics") or [{}] * len(op_ids)
        await self.log.record(*(ev.OperationCompleted(op_id=op_id, duration_ms=duration_ms, metrics=metrics | m)
                                for op_id, m in zip(op_ids, own, strict=True)))
        await self._drain_degraded(model)
        result.setdefault("metrics", {})["duration_ms"] = duration_ms
        return result

    async def _drain_degraded(self, model: str) -> None:
        """A browser much slower than its peers for ``model`` takes no new requests; once idle it is retired
        and a fresh browser takes over its models (each step an event)."""
        for slow in adaptive.degraded_browsers(self.state, model):
            async with self.locks(f"failed:{slow.browser_id}"):
                state = self.state.browsers.get(slow.browser_id)
                if state is None or state.draining or state.status not in ALIVE_STATUSES:
                    continue
                log.warning("draining a degraded browser", extra={"browser_id": slow.browser_id,
                                                                 "model": model, "reason": slow.reason})
                await self.log.record(ev.BrowserDraining(browser_id=slow.browser_id, reason=slow.reason))
            self._spawn(self._drain(slow.browser_id))

    async def _drain(self, browser_id: str) -> None:
        needed = await self.fleet.artifacts_on(browser_id)
        browser_type = self.state.browsers[browser_id].browser_type
        deadline = time.monotonic() + self.request_timeout * 2
        while self.fleet.leased(browser_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.fleet.retire(browser_id, "drained: slower than its peers")
        if self._closed:
            return
        async with self.locks("placement"):
            if len(self._views()) >= self.max_connections:
                return
            replacement = await self.fleet.launch(browser_type, avoid=frozenset({browser_id}))
        for art in needed:
            await self.fleet.load(replacement, art)

    async def _with_recovery(self, attempt: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Run ``attempt``; on a browser failure report it to the reconcile loop, await its recovery and try
        again (levels >= low)."""
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
                outcome = await self.reconciler.report(failure)
                if not outcome["success"]:
                    log.warning("recovery failed", extra={"browser_id": failure.browser_id,
                                                         "error": outcome["error"]})
                delay = retry_delay(len(failures), outcome["success"], self.ft.backoff_s)
                if delay:
                    await asyncio.sleep(delay)
                continue
            if failures:
                result["recovered"] = True
                result["original_error"] = str(failures[0])
                result["recovery_attempts"] = len(failures)
            return result

    async def _voted(self, art: ModelArtifact, task: str, on: Callable[[str], Awaitable[dict[str, Any]]],
                     vote: Callable[[dict[str, dict[str, Any]], int], Any]) -> dict[str, Any]:
        """Level critical: run on ``vote_k`` distinct browsers, answer by a majority of all ``vote_k`` (a
        voter that failed counts against the majority), quarantine dissenters. Fewer than ``vote_k``
        browsers available is a NoBrowserAvailableError, never a smaller vote."""
        k = self.ft.vote_k
        chosen: list[str] = []
        for _ in range(k):
            try:
                chosen.append(await self._place(art, task, avoid=frozenset(chosen)))
            except NoBrowserAvailableError as exc:
                raise NoBrowserAvailableError(f"level critical needs {k} browsers to vote; {len(chosen)} could "
                                              f"take the request: {exc}") from None
        outcomes = await asyncio.gather(*(on(b) for b in chosen), return_exceptions=True)
        answers = {b: o for b, o in zip(chosen, outcomes, strict=True) if not isinstance(o, BaseException)}
        failures = [o for o in outcomes if isinstance(o, BrowserFailure)]
        others = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, BrowserFailure)]
        if not answers:
            raise failures[0] if failures else others[0]
        try:
            result = vote(answers, k)
        except NoMajorityError:
            if failures:
                raise failures[0] from None   # recover the failed browser, then vote again
            if others:
                raise others[0] from None     # e.g. no browser for a voter's other shards
            raise
        for dissenter in result.dissenting:
            log.warning("browser outvoted", extra={"browser_id": dissenter, "agreeing": result.agreeing})
            await self.fleet.quarantine(dissenter, f"outvoted by {', '.join(result.agreeing)}")
        for failure in failures:
            self.reconciler.report_soon(failure)
        winner = answers[result.agreeing[0]]
        return winner | {"votes": {"agreeing": list(result.agreeing), "dissenting": list(result.dissenting),
                                   "failed": [f.browser_id for f in failures]}}

    # ----- requests -----------------------------------------------------------------------------------
    async def infer(self, model_name: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """Embed ``{"text": str}`` (one vector) or ``{"texts": [str, ...]}`` (a matrix)."""
        spec, request = validation.embedding_request(model_name, inputs)
        return await self._detached(spec.name, lambda: self._infer(spec, request), rows=len(request.texts))

    async def _infer(self, spec: ModelSpec, request: validation.EmbeddingRequest) -> dict[str, Any]:
        feeds = minilm.tokenize(request.texts)
        job = _Embedding(request, feeds, digest(*feeds.values()))
        await self._ensure_log()
        [art] = await self.fleet.artifacts_for(spec.name)

        async def on(browser_id: str) -> dict[str, Any]:
            [answer] = await self._embed_on(browser_id, art, [job])
            return answer

        async def run() -> dict[str, Any]:
            if self.batcher is not None:
                return await self.batcher.submit(art.key, (art, job), len(request.texts))
            return await on(await self._place(art, spec.task, grow_meanwhile=True))

        async def attempt() -> dict[str, Any]:
            if self.ft.votes:
                return await self._voted(art, spec.task, on, lambda answers, voters: vote_embeddings(
                    {b: r["embedding"] for b, r in answers.items()}, self.ft.vote_cosine, voters))
            if self.ft.hedges:
                return await self._hedged(art, job, run, on)
            return await run()

        if self.ft.hedges:
            self.hedge_budget.on_request(time.monotonic())
        return await self._with_recovery(attempt)

    def _row_ms(self, model: str) -> list[float]:
        """Recent per-row page times of ``model`` on every live browser (the history's windows)."""
        alive = {b.browser_id for b in browsers_alive(self.state)}
        return [ms for (b, m), w in self.state.perf.items() if m == model and b in alive for ms in w.recent_ms]

    def _hedge_target(self, art: ModelArtifact) -> str | None:
        return hedging.pick_target([
            hedging.Candidate(b.browser_id,
                              art.key in (warm_keys_on(self.state, b.browser_id) if b.standby
                                          else self.fleet.keys_on(b.browser_id)),
                              self.fleet.leased(b.browser_id), b.standby,
                              adaptive.expected_cost(self.state.perf.get((b.browser_id, art.model))))
            for b in browsers_alive(self.state) if not b.draining])

    async def _hedged(self, art: ModelArtifact, job: _Embedding, run: Callable[[], Awaitable[dict[str, Any]]],
                      on: Callable[[str], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Level high: ``run()`` answers the request; if it has not after ``hedging.delay_ms``, a copy runs
        ``on`` an idle browser holding the model (budget permitting) and the first answer is the request's.

        Guarantees: the caller gets one answer, computed in full by one page run of its own inputs (a copy
        is its own operation, never mixed with another run's rows). The run that loses goes on: its
        operation ends in the log as any does, and a browser failure it meets is reported for recovery.
        Both failing raises the first run's error (a BrowserFailure is recovered and retried as always).
        """
        rows = len(job.request.texts)
        after_ms = hedging.delay_ms(self._row_ms(art.model), rows)
        first = asyncio.ensure_future(run())
        done, _ = await asyncio.wait({first}, timeout=after_ms / 1000)
        target = None if done else self._hedge_target(art)
        if target is None or not self.hedge_budget.try_spend(time.monotonic()):
            return await first
        hedge_id = uuid.uuid4().hex[:12]
        copy = asyncio.ensure_future(on(target))
        runs = (first, copy)
        await self.log.record(ev.HedgeSent(hedge_id=hedge_id, browser_id=target, model=art.model, rows=rows,
                                           after_ms=after_ms))
        winner: asyncio.Future | None = None
        pending = set(runs)
        try:
            while pending and winner is None:
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                winner = next((t for t in runs if t in finished and t.exception() is None), None)
        except BaseException:          # the caller went away: both runs go on unobserved
            for task in runs:
                task.add_done_callback(self._report_loser)
            raise
        for task in runs:
            if task is not winner and (winner is not None or task is copy):
                task.add_done_callback(self._report_loser)    # with no winner, the first run's error is raised
        if winner is None:
            return first.result()          # raises the first run's error
        result = winner.result()
        won = winner is copy
        if won:
            await self.log.record(ev.HedgeWon(hedge_id=hedge_id, browser_id=target, model=art.model))
        return result | {"hedge": {"hedge_id": hedge_id, "browser_id": target, "after_ms": after_ms, "won": won}}

    def _report_loser(self, task: asyncio.Future) -> None:
        """A run nobody awaits any more: a browser failure it met is recovered; anything else is dropped."""
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, BrowserFailure):
            self.reconciler.report_soon(exc)

    async def _embed_batch(self, payloads: Sequence[tuple[ModelArtifact, _Embedding]]) -> list[dict[str, Any]]:
        """The batcher's run: one batch of one model's requests, placed as one request would be."""
        art = payloads[0][0]
        browser_id = await self._place(art, "text_embedding", busy_at=1, grow_meanwhile=True)
        return await self._embed_on(browser_id, art, [job for _, job in payloads])

    async def _embed_on(self, browser_id: str, art: ModelArtifact, jobs: list[_Embedding]) -> list[dict[str, Any]]:
        """Embedding requests run on a browser in one page run, each its own recorded operation; one answer
        per request, with its own rows. A request's ``page_ms`` is its rows' share of the run's, and its
        ``rows`` how many texts it had."""
        handle = self.fleet.handle(browser_id)
        rows = [len(j.request.texts) for j in jobs]
        total = sum(rows)

        async def call(_op_ids: list[str]) -> dict[str, Any]:
            out = await self.fleet.call(browser_id, handle.run.remote(
                art.key, minilm.join([j.feeds for j in jobs]), fetch=["embedding"], timeout=self.request_timeout))
            batch = {} if len(jobs) == 1 else {"batch_requests": len(jobs), "batch_rows": total,
                                               "batch_page_ms": out["ms"]}
            return {"embedding": out["outputs"]["embedding"], "metrics": batch,
                    "op_metrics": [{"page_ms": out["ms"] * n / total, "rows": n} for n in rows]}

        result = await self._run_ops(browser_id, art.model, "infer", [j.digest for j in jobs], call)
        backend = self.state.browsers[browser_id].backend
        answers, at = [], 0
        for job, n, own in zip(jobs, rows, result["op_metrics"], strict=True):
            emb = result["embedding"][at:at + n]
            at += n
            answers.append({"embedding": emb[0] if job.request.single else emb, "metrics": result["metrics"] | own,
                            "model": art.model, "browser_id": browser_id, "backend": backend})
        return answers

    async def generate(self, model_name: str, prompt: str, max_new_tokens: int = 16, shards: int = 1,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> dict[str, Any]:
        """Generate text with a llama model split over ``shards`` browsers (greedy unless temperature > 0)."""
        spec, req = validation.generation_request(model_name, prompt, max_new_tokens, shards, temperature,
                                                  top_p, seed)

        async def work() -> dict[str, Any]:
            await self._ensure_log()
            return await self.sessions.generate(spec, req, self._voted, self._with_recovery)

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

    async def browser_failed(self, browser_id: str, category: str, detail: str) -> None:
        """A browser actor saw its browser fail (process exit, page crash, lost connection): recovered now,
        not when the next request or health check meets the dead browser. Ignored at level none (a failure
        is then the error of the request that meets it, for its caller to handle), when the pool knows of
        the failure already (the browser is not alive in the log), when an open generation session uses
        the browser (the session handles its shards' failures), and when a recovery revived it since."""
        await self._ensure_log()
        state = self.state.browsers.get(browser_id)
        if not self.ft.recovers or self._closed or state is None or state.status not in ALIVE_STATUSES \
                or in_open_session(self.state, browser_id) or not self.fleet.has_handle(browser_id):
            return
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
        browser_id = await self._place(art, spec.task)
        state = self.state.browsers[browser_id]
        return {"browser_id": browser_id, "browser_type": state.browser_type, "backend": state.backend}

    async def inject_fault(self, browser_id: str, kind: str, **options: Any) -> dict[str, Any]:
        """Make a real fault happen in a browser (tests, benchmarks, the CLI). ``kill_actor`` kills its process."""
        handle = self.fleet.handle(browser_id)
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
        return await self.log.recent(n)

    async def pid(self) -> int:
        """This pool's process id (a fault to inject: kill it and Ray restarts the pool, which rebuilds)."""
        return os.getpid()

    async def node_id(self) -> str:
        """The Ray node this incarnation of the pool runs on."""
        return ray.get_runtime_context().get_node_id()

    async def browser_handle(self, browser_id: str) -> Any:
        """The actor handle of a browser (tests and fault injection use it)."""
        return self.fleet.handle(browser_id)

    async def shutdown(self) -> None:
        """Close every browser (removing its files) and retire it in the log."""
        self._closed = self.reconciler.closed = True
        for task in list(self._background):
            task.cancel()
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
