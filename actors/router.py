"""The router: where a request runs and how. It places requests on browsers (growing the pool in the
background), runs each as recorded operations, retries through the reconcile loop's recovery, and at the
levels that ask for it hedges (high) or votes (critical). The pool actor (actors/pool.py) admits requests
and hands them here; generation sessions (actors/sessions.py) use its placement and operations.

Guarantees:
- Every OperationStarted is followed by exactly one OperationCompleted or OperationFailed.
- A failure of the browser's side (a BrowserFailure, a dead or cut-off actor, a time budget, an error of no
  documented type) is recorded, reported to the reconcile loop and recovered; the request runs again at
  most ``max_recovery_attempts`` times, with backoff, then ends in NoBrowserAvailableError. The caller's
  input errors and the pool's own errors reach the caller unchanged.
- A caller gets one answer, computed in full by one page run of its own inputs (hedged copies and batches
  never mix another caller's rows into it).
- Placement never waits on a browser's start while holding its lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from actors.batching import Batcher
from actors.constants import BUSY_THRESHOLD
from actors.decisions import adaptive, batching, hedging, placement, validation
from actors.decisions.reconcile import warm_keys_on
from actors.decisions.recovery import FaultToleranceConfig, classify, retry_delay
from actors.decisions.voting import NoMajorityError, to_quarantine, vote_embeddings
from actors.fleet import Fleet, KeyedLocks
from actors.reconcile import Reconciler
from actors.sessions import digest
from events import schema as ev
from events.errors import BrowserFailure, InputError, NoBrowserAvailableError, WebpoolError, describe
from events.state import ALIVE_STATUSES, browsers_alive
from sharding.models import minilm
from sharding.models.registry import ModelArtifact, ModelSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Embedding:
    """One embedding request, tokenized: what a batch is made of."""

    request: validation.EmbeddingRequest
    feeds: dict[str, Any]
    digest: str
    # The page runs that carried it, in order (its own, a hedge's copy, a rerun after a recovery).
    runs: list[hedging.PageRun] = dataclasses.field(default_factory=list, compare=False)


class Router:
    def __init__(self, fleet: Fleet, reconciler: Reconciler, config: FaultToleranceConfig, locks: KeyedLocks,
                 spawn: Callable[[Awaitable[Any]], asyncio.Future], *, browser_preferences: dict[str, str],
                 request_timeout: float, max_connections: int, max_batch_size: int, batch_wait_ms: float) -> None:
        self.fleet = fleet
        self.log = fleet.log
        self.reconciler = reconciler
        self.ft = config
        self.locks = locks
        self._spawn = spawn
        self.browser_preferences = browser_preferences
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.closed = False
        self._growing: set[asyncio.Future] = set()       # browsers starting for placement (see _grow)
        # Level high: how many slow requests may be hedged.
        self.hedge_budget = hedging.Budget(config.hedge_budget, now=time.monotonic())
        self.page_runs = hedging.PageRuns()                # embedding runs in flight (when to hedge)
        # Embedding requests that queue for a model run together (max_batch_size 1: each runs alone).
        self.batcher = None if max_batch_size == 1 else Batcher(
            self._embed_batch, self._batch_slots, max_batch_size, batch_wait_ms / 1000, spawn)

    def _batch_slots(self) -> int:
        """Batches of a model in flight at once: per browser the pool may use, as many as this machine's free
        cores allow (``batching.batches_per_browser``; the pages counted are the serving ones on the pool's
        own node, which share its cores)."""
        own = self.fleet.own_node_id()
        here = sum(1 for b in browsers_alive(self.log.state) if not b.standby and b.node_id in ("", own))
        return self.max_connections * batching.batches_per_browser(here, os.cpu_count() or 1)

    # ----- placement ----------------------------------------------------------------------------------
    def browser_type(self, task: str) -> str:
        return self.fleet.browser_type(self.browser_preferences.get(task, "chromium"))

    def _views(self, model: str | None = None) -> list[placement.BrowserView]:
        """Browsers that take traffic (alive, not standby, not draining), with their expected cost for
        ``model`` from the performance history."""
        state = self.log.state
        return [
            placement.BrowserView(b.browser_id, b.browser_type, self.fleet.keys_on(b.browser_id),
                                  self.fleet.leased(b.browser_id),
                                  adaptive.expected_cost(state.perf.get((b.browser_id, model))) if model else None)
            for b in browsers_alive(state) if not b.standby and not b.draining
        ]

    async def place(self, art: ModelArtifact, task: str, avoid: frozenset[str] = frozenset(),
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
                browser_type = self.browser_type(task)
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
            self.fleet.stage(art)
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
    async def run_op(self, browser_id: str, model: str, kind: str, input_digest: str,
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
        for slow in adaptive.degraded_browsers(self.log.state, model):
            async with self.locks(f"failed:{slow.browser_id}"):
                state = self.log.state.browsers.get(slow.browser_id)
                if state is None or state.draining or state.status not in ALIVE_STATUSES:
                    continue
                log.warning("draining a degraded browser", extra={"browser_id": slow.browser_id,
                                                                 "model": model, "reason": slow.reason})
                await self.log.record(ev.BrowserDraining(browser_id=slow.browser_id, reason=slow.reason))
            self._spawn(self._drain(slow.browser_id))

    async def _drain(self, browser_id: str) -> None:
        needed = await self.fleet.artifacts_on(browser_id)
        browser_type = self.log.state.browsers[browser_id].browser_type
        deadline = time.monotonic() + self.request_timeout * 2
        while self.fleet.leased(browser_id) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.fleet.retire(browser_id, "drained: slower than its peers")
        if self.closed or not needed:
            return
        async with self.locks("placement"):
            if len(self._views()) + len(self._growing) >= self.max_connections:
                return
            # Started outside the lock, counted as growing meanwhile (as placement's own launches are).
            starting = self._grow(needed[0], browser_type, frozenset({browser_id}))
        replacement = await starting
        for art in needed[1:]:
            await self.fleet.load(replacement, art)

    async def with_recovery(self, attempt: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
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

    async def voted(self, art: ModelArtifact, task: str, on: Callable[[str], Awaitable[dict[str, Any]]],
                    vote: Callable[[dict[str, dict[str, Any]], int], Any]) -> dict[str, Any]:
        """Level critical: run on ``vote_k`` distinct browsers, answer by a majority of all ``vote_k`` (a
        voter that failed counts against the majority), quarantine every browser a dissenting answer came from
        (``to_quarantine``: a sharded voter's whole chain). Fewer than ``vote_k``
        browsers available is a NoBrowserAvailableError, never a smaller vote."""
        k = self.ft.vote_k
        chosen: list[str] = []
        for _ in range(k):
            try:
                chosen.append(await self.place(art, task, avoid=frozenset(chosen)))
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
        chains = {b: answer.get("browser_ids") or [b] for b, answer in answers.items()}
        for browser_id in to_quarantine(result, chains):
            voter = next(v for v in result.dissenting if browser_id in chains[v])
            log.warning("browser outvoted", extra={"browser_id": browser_id, "agreeing": result.agreeing})
            chain = (f" (shard {chains[voter].index(browser_id) + 1} of {len(chains[voter])} that gave the "
                     f"dissenting answer)" if len(chains[voter]) > 1 else "")
            await self.fleet.quarantine(browser_id, f"outvoted by {', '.join(result.agreeing)}{chain}")
        for failure in failures:
            self.reconciler.report_soon(failure)
        winner = answers[result.agreeing[0]]
        return winner | {"votes": {"agreeing": list(result.agreeing), "dissenting": list(result.dissenting),
                                   "failed": [f.browser_id for f in failures]}}

    async def embed(self, spec: ModelSpec, request: validation.EmbeddingRequest) -> dict[str, Any]:
        """An embedding request, run as the level says: voted (critical), hedged (high), else plain; each
        attempt batched with others when batching is on, and retried through recovery."""
        feeds = minilm.tokenize(request.texts)
        job = _Embedding(request, feeds, digest(*feeds.values()))
        [art] = await self.fleet.artifacts_for(spec.name)

        async def on(browser_id: str) -> dict[str, Any]:
            [answer] = await self._embed_on(browser_id, art, [job])
            return answer

        async def run() -> dict[str, Any]:
            if self.batcher is not None:
                return await self.batcher.submit(art.key, (art, job), len(request.texts))
            return await on(await self.place(art, spec.task, grow_meanwhile=True))

        async def attempt() -> dict[str, Any]:
            if self.ft.votes:
                return await self.voted(art, spec.task, on, lambda answers, voters: vote_embeddings(
                    {b: r["embedding"] for b, r in answers.items()}, self.ft.vote_cosine, voters))
            if self.ft.hedges:
                return await self._hedged(art, job, run, on)
            return await run()

        if self.ft.hedges:
            self.hedge_budget.on_request(time.monotonic())
        return await self.with_recovery(attempt)

    def _row_ms(self, model: str) -> list[float]:
        """Recent per-row page times of ``model`` on every live browser (the history's windows)."""
        alive = {b.browser_id for b in browsers_alive(self.log.state)}
        return [ms for (b, m), w in self.log.state.perf.items() if m == model and b in alive for ms in w.recent_ms]

    def _hedge_target(self, art: ModelArtifact) -> str | None:
        return hedging.pick_target([
            hedging.Candidate(b.browser_id,
                              art.key in (warm_keys_on(self.log.state, b.browser_id) if b.standby
                                          else self.fleet.keys_on(b.browser_id)),
                              self.fleet.leased(b.browser_id), b.standby,
                              adaptive.expected_cost(self.log.state.perf.get((b.browser_id, art.model))))
            for b in browsers_alive(self.log.state) if not b.draining])

    async def _hedged(self, art: ModelArtifact, job: _Embedding, run: Callable[[], Awaitable[dict[str, Any]]],
                      on: Callable[[str], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """Level high: ``run()`` answers the request; if it has not once the page run it waits for is slow
        (``hedging.hedge_at``), a copy runs ``on`` an idle browser holding the model (budget permitting) and
        the first answer is the request's.

        Guarantees: the caller gets one answer, computed in full by one page run of its own inputs (a copy
        is its own operation, never mixed with another run's rows). The run that loses goes on: its
        operation ends in the log as any does, and a browser failure it meets is reported for recovery.
        Both failing raises the first run's error (a BrowserFailure is recovered and retried as always).
        """
        rows, row_ms = len(job.request.texts), self._row_ms(art.model)
        submitted, earlier_runs = time.monotonic(), len(job.runs)    # runs of earlier attempts (a retry)
        first = asyncio.ensure_future(run())
        while True:
            # Looked at again whenever the time set comes: the run it waits for may have changed meanwhile
            # (its own has started, or the one ahead of it has ended).
            own = job.runs[earlier_runs] if len(job.runs) > earlier_runs else None
            at = hedging.hedge_at(submitted, rows, own, self.page_runs.of(art.model), row_ms)
            if at <= time.monotonic():
                break
            done, _ = await asyncio.wait({first}, timeout=at - time.monotonic())
            if done:
                return await first
        target = self._hedge_target(art)
        if target is None or not self.hedge_budget.try_spend(time.monotonic()):
            return await first
        after_ms = (time.monotonic() - submitted) * 1000
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
        browser_id = await self.place(art, "text_embedding", busy_at=1, grow_meanwhile=True)
        return await self._embed_on(browser_id, art, [job for _, job in payloads])

    async def _embed_on(self, browser_id: str, art: ModelArtifact, jobs: list[_Embedding]) -> list[dict[str, Any]]:
        """Embedding requests run on a browser in one page run, each its own recorded operation; one answer
        per request, with its own rows. A request's ``page_ms`` is its rows' share of the run's, and its
        ``rows`` how many texts it had."""
        handle = self.fleet.handle(browser_id)
        rows = [len(j.request.texts) for j in jobs]
        total = sum(rows)

        standby = self.log.state.browsers[browser_id].standby      # a hedge's copy (actors/browser.py: run)

        async def call(_op_ids: list[str]) -> dict[str, Any]:
            out = await self.fleet.call(browser_id, handle.run.remote(
                art.key, minilm.join([j.feeds for j in jobs]), fetch=["embedding"], timeout=self.request_timeout,
                standby=standby))
            batch = {} if len(jobs) == 1 else {"batch_requests": len(jobs), "batch_rows": total,
                                               "batch_page_ms": out["ms"]}
            return {"embedding": out["outputs"]["embedding"], "metrics": batch,
                    "op_metrics": [{"page_ms": out["ms"] * n / total, "rows": n} for n in rows]}

        run = self.page_runs.begin(art.model, browser_id, total, time.monotonic())
        for job in jobs:
            job.runs.append(run)
        try:
            result = await self._run_ops(browser_id, art.model, "infer", [j.digest for j in jobs], call)
        finally:
            self.page_runs.end(art.model, run, time.monotonic())
        backend = self.log.state.browsers[browser_id].backend
        answers, at = [], 0
        for job, n, own in zip(jobs, rows, result["op_metrics"], strict=True):
            emb = result["embedding"][at:at + n]
            at += n
            answers.append({"embedding": emb[0] if job.request.single else emb, "metrics": result["metrics"] | own,
                            "model": art.model, "browser_id": browser_id, "backend": backend})
        return answers
