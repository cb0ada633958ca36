"""Generation sessions: a request's shard stages placed on browsers, run by the model's ShardCoordinator,
and the coordinator's calls back into the pool (begin, tokens, a lost or replaced shard, a replay).

Guarantees:
- A session is in the log from its first step: SessionOpened is recorded when a coordinator begins it
  (with the plan and the operation's id), SessionResumed when a successor coordinator takes it over,
  every token as TokensAppended (once, however often a step is retried), SessionClosed when the
  request ends. Whether a begin is a first one or a take-over is read from the log, not from memory.
- A browser a session goes on without (a shadow took over) is recorded failed with its recovery
  deferred (BrowserRecoveryDeferred); the reconcile loop recovers it once the session closes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.decisions import validation
from actors.decisions.recovery import FaultToleranceConfig
from actors.decisions.voting import vote_tokens
from actors.fleet import Fleet, KeyedLocks
from actors.reconcile import Reconciler
from events import schema as ev
from events.errors import ActorUnreachable, BrowserFailure, InputError, NoBrowserAvailableError
from events.state import ALIVE_STATUSES
from sharding import coordinator
from sharding.models.registry import ModelArtifact, ModelSpec, get_spec, llama_model
from sharding.plan import even_layer_ranges

log = logging.getLogger(__name__)

# (browser_id, model, kind, input digest, call(op_id)) -> the call's result, as one recorded operation
RunOp = Callable[[str, str, str, str, Callable[[str], Awaitable[dict[str, Any]]]], Awaitable[dict[str, Any]]]
Place = Callable[..., Awaitable[str]]


def digest(*parts: Any) -> str:
    """A short content digest of a request's inputs (OperationStarted.input_digest)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class _Voters:
    """The voters of one request at level critical: the browsers their chains have taken, and the lock
    that places one voter's chain at a time, so that no two voters share a browser."""

    firsts: set[str] = dataclasses.field(default_factory=set)     # each voter's first-shard browser
    taken: set[str] = dataclasses.field(default_factory=set)      # every browser a voter's chain uses
    placing: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    def run(self, on: Callable[..., Awaitable[dict[str, Any]]]) -> Callable[[str], Awaitable[dict[str, Any]]]:
        """What the vote calls per voter: ``on`` with this voter's first browser. Every voter's first
        browser is known before any chain is placed (the vote makes all the calls before awaiting one)."""
        def voter(first: str) -> Awaitable[dict[str, Any]]:
            self.firsts.add(first)
            return on(self, first)
        return voter


class Sessions:
    def __init__(self, fleet: Fleet, reconciler: Reconciler, config: FaultToleranceConfig, locks: KeyedLocks,
                 run_op: RunOp, place: Place, request_timeout: float, max_connections: int) -> None:
        self.fleet = fleet
        self.log = fleet.log
        self.reconciler = reconciler
        self.config = config
        self.locks = locks
        self._run_op = run_op
        self._place = place
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._coordinators: dict[str, Any] = {}          # model -> its ShardCoordinator actor

    # ----- a generation request ----------------------------------------------------------------------
    async def generate(self, spec: ModelSpec, req: validation.GenerationRequest,
                       voted: Callable[..., Awaitable[dict[str, Any]]],
                       with_recovery: Callable[[Callable[[], Awaitable[dict[str, Any]]]], Awaitable[dict[str, Any]]]
                       ) -> dict[str, Any]:
        model = await asyncio.to_thread(llama_model, spec.name)
        prompt_ids = model.encode(req.prompt)
        validation.check_context(len(prompt_ids), req.max_new_tokens, model.config.max_context)
        validation.check_shards(req.shards, model.config.n_layers)
        ranges = even_layer_ranges(model.config.n_layers, req.shards)
        self.config.check_voters(self.max_connections, req.shards, field="shards")
        arts = await self.fleet.artifacts_for(spec.name, ranges if req.shards > 1 else None)

        async def on(voters: _Voters | None = None, first: str | None = None) -> dict[str, Any]:
            """One run of the generation. As one of ``voters``, its first shard runs on ``first`` (the browser
            the vote placed) and its other shards on browsers no other voter uses."""
            used: set[str] = set()

            async def stage_apart(art: ModelArtifact) -> coordinator.ShardStage:
                """``art`` on a browser no other stage of this request (nor of another voter) uses."""
                avoid = used | (voters.taken | voters.firsts if voters else set())
                browser_id = await self._place(art, spec.task, avoid=frozenset(avoid))
                used.add(browser_id)
                return coordinator.ShardStage(browser_id, self.fleet.handle(browser_id), art)

            if voters is None or first is None:
                stages = [await stage_apart(art) for art in arts]
            else:
                used.add(first)
                async with voters.placing:
                    stages = [coordinator.ShardStage(first, self.fleet.handle(first), arts[0])]
                    stages += [await stage_apart(art) for art in arts[1:]]
                    voters.taken.update(s.browser_id for s in stages)
            shadows: list[coordinator.ShardStage | None] = []
            for art in arts if self.config.shadows(req.shards) else []:
                try:
                    shadows.append(await stage_apart(art))
                except NoBrowserAvailableError:     # no room (max_connections): that shard runs unshadowed
                    shadows.append(None)
            return await self._run(spec.name, stages, shadows, prompt_ids, req, model.config.eos_id)

        async def attempt() -> dict[str, Any]:
            if self.config.votes:
                # Each voter runs the whole generation (greedy, or sampled with the request's seed: the same
                # tokens either way) on browsers of its own; the first shard's browser is the one voted on.
                voters = _Voters()
                return await voted(arts[0], spec.task, voters.run(on),
                                   lambda answers, k: vote_tokens({b: r["token_ids"] for b, r in answers.items()}, k))
            return await on()

        result = await with_recovery(attempt)
        return result | {"model": spec.name, "text": model.decode(result["token_ids"]),
                         "prompt_token_ids": prompt_ids}

    async def _run(self, model: str, stages: list[coordinator.ShardStage],
                   shadows: list[coordinator.ShardStage | None], prompt_ids: list[int],
                   req: validation.GenerationRequest, eos_id: int | None) -> dict[str, Any]:
        # The operation is recorded against the first shard's browser, which the operation leases. The
        # session's other browsers are leased too: the health check must not probe them (nor scale-down
        # retire them) mid-session; a failure there is the coordinator's to handle (replay, or its shadow).
        others = {s.browser_id for s in [*stages, *shadows] if s is not None} - {stages[0].browser_id}
        session_id = uuid.uuid4().hex
        shard_coordinator = await self.coordinator(model)

        async def call(op_id: str) -> dict[str, Any]:
            plan = {
                "op_id": op_id,
                "shards": [{"browser_id": s.browser_id, "artifact": s.artifact.key,
                            "layers": s.artifact.meta["layer_range"]} for s in stages],
                "shadows": [s.browser_id if s else None for s in shadows],
                "prompt_ids": prompt_ids, "max_new_tokens": req.max_new_tokens,
                "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}
            # Ray retries this call on a restarted coordinator if its process dies; the retry resumes from the log.
            return await shard_coordinator.generate.remote(
                session_id, stages, shadows, prompt_ids, req.max_new_tokens, eos_id, req.temperature, req.top_p,
                req.seed, self.request_timeout, plan)

        reason = "failed"
        try:
            with self.fleet.lease(*others):
                result = await self._run_op(stages[0].browser_id, model, "generate", digest(prompt_ids, req), call)
            reason = "done"
        finally:
            if session_id in self.log.state.sessions:
                await self.log.record(ev.SessionClosed(session_id=session_id, reason=reason))
        return result | {"session_id": session_id, "browser_id": stages[0].browser_id}

    async def coordinator(self, model: str) -> Any:
        """The ShardCoordinator actor of ``model`` (one per sharded model), started on first use on the pool's node.

        Hard affinity: it lives and dies with the pool's node, never with a browser's (a soft one was seen
        placed on a worker node under load, so losing that node cost the session a take-over). A pool that
        loses its node is restarted elsewhere and starts coordinators of its own.
        """
        async with self.locks(f"coordinator:{model}"):
            if model not in self._coordinators:
                node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
                me = ray.get_runtime_context().current_actor
                self._coordinators[model] = coordinator.ShardCoordinator.options(
                    scheduling_strategy=node).remote(me, model)
            return self._coordinators[model]

    async def coordinator_of(self, model_name: str) -> Any:
        spec = get_spec(model_name)
        if spec.task != "text_generation":
            raise InputError("model_name", f"{spec.name} is a {spec.task} model; only generation has a coordinator")
        return await self.coordinator(spec.name)

    async def cut_off(self, failure: ActorUnreachable) -> None:
        """Tell every coordinator that a browser's actor is silent: a session's call to it ends at once."""
        await asyncio.gather(*(handle.cut_off.remote(failure) for handle in self._coordinators.values()),
                             return_exceptions=True)

    def close(self) -> None:
        for handle in self._coordinators.values():
            ray.kill(handle, no_restart=True)
        self._coordinators.clear()

    # ----- called by ShardCoordinator actors ----------------------------------------------------------
    async def begin(self, session_id: str, model: str, plan: dict[str, Any]) -> dict[str, list[int]] | None:
        """A coordinator starts running ``session_id``. The first time (the log has no such session) it is
        recorded as SessionOpened and the answer is None; a later call (the coordinator that ran it died
        and Ray retried the call) is recorded as SessionResumed and answered with what the log says of
        the session so far: ``tokens`` and ``promoted`` (shards whose shadow took over: the retry must not
        send them to the dead primary again)."""
        async with self.locks(f"session:{session_id}"):
            session = self.log.state.sessions.get(session_id)
            if session is None:
                await self.log.record(ev.SessionOpened(session_id=session_id, model=model, plan=plan))
                return None
            attempt = session.resumes + 2
            log.warning("session taken over by a new coordinator",
                        extra={"session_id": session_id, "tokens": len(session.tokens), "attempt": attempt})
            await self.log.record(ev.SessionResumed(session_id=session_id, tokens=len(session.tokens), attempt=attempt))
            return {"tokens": list(session.tokens), "promoted": list(session.promoted)}

    async def append(self, session_id: str, position: int, token_ids: list[int]) -> None:
        """Log ``token_ids`` as the session's tokens from ``position`` on; returns once they are in the log.

        Idempotent: a call a dead coordinator left in flight and its successor's retry of the same step
        log the tokens once. A different token at a logged position is refused (it would fork the session).
        """
        async with self.locks(f"session:{session_id}"):
            logged = self.log.state.sessions[session_id].tokens
            overlap = logged[position:position + len(token_ids)]
            if position > len(logged) or tuple(token_ids[:len(overlap)]) != overlap:
                raise RuntimeError(f"session {session_id}: tokens {token_ids} at {position} do not extend the "
                                   f"{len(logged)} logged ones")
            if fresh := token_ids[len(overlap):]:
                await self.log.record(ev.TokensAppended(session_id=session_id, token_ids=tuple(fresh)))

    async def replace(self, failure: BrowserFailure, artifact_key: str,
                      avoid: list[str]) -> coordinator.ShardStage | None:
        """A shard's browser failed mid-generation: recover it, or place its shard on another browser (not one
        in ``avoid``, the session's other shards). None when this pool does not recover (level none)."""
        if not self.config.recovers or self.reconciler.closed:
            return None
        artifact = await self.fleet.artifact_by_key(artifact_key)
        outcome = await self.reconciler.report(failure)
        serving = outcome["recovery_browser"]
        live = self.log.state.browsers.get(serving) if serving else None
        if live is None or live.status not in ALIVE_STATUSES \
                or artifact.key not in self.fleet.keys_on(serving):
            serving = await self._place(artifact, "text_generation", avoid=frozenset(avoid))
        return coordinator.ShardStage(serving, self.fleet.handle(serving), artifact)

    async def lost(self, session_id: str, shard: int, failure: BrowserFailure, promoted: str | None) -> None:
        """A session went on without a failed browser: its shadow took over (``promoted``), or the failed one
        was the shadow. Recorded now; the browser is recovered when the session closes (BrowserRecoveryDeferred).
        The session will not use it again, and recovering it meanwhile (a new browser, shard reloads) would
        only take CPU from the session (measured on 2 cores: the decode after a promotion ran ~1.5-3 s
        longer)."""
        if promoted is not None:
            await self.log.record(ev.ShardPromoted(session_id=session_id, shard=shard,
                                                   failed_browser=failure.browser_id, shadow_browser=promoted))
        await self.fleet.mark_failed(failure)
        state = self.log.state.browsers.get(failure.browser_id)
        if state is not None and state.status == "failed" and state.recover_after is None:
            await self.log.record(ev.BrowserRecoveryDeferred(browser_id=failure.browser_id, session_id=session_id))

    async def replay(self, session_id: str, model: str, stage: coordinator.ShardStage,
                     inputs: dict[str, np.ndarray], info: dict[str, Any], timeout: float) -> None:
        """Rebuild a replacement shard's cache from the session's inputs, recorded as a "replay" operation."""
        async def call(_op_id: str) -> dict[str, Any]:
            await coordinator.replay_stage(stage, session_id, inputs, timeout, self.fleet.cutoffs)
            return {"metrics": dict(info)}

        await self._run_op(stage.browser_id, model, "replay", session_id, call)
