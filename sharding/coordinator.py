"""Generation through a chain of llama shards, each a model loaded in one browser.

Each shard keeps its own KV cache in its page, under the generation's session id (the page's
``state``), so per step only token ids and hidden states cross Ray (as base64 float32 in the
page call, ndarray between actors).

``ShardCoordinator`` (a Ray actor, one per sharded model) runs the sessions, so hidden states go
browser -> coordinator -> browser and never through the pool. It keeps nothing in memory that a
session needs to survive it: the prompt and sampling parameters are in the session's SessionOpened
event, every new token is a TokensAppended event acknowledged before the next step. When its
process dies, Ray restarts it and retries the call; the new coordinator reads the logged tokens
(through the pool), rebuilds every shard's cache by running prompt + tokens through the chain once,
and samples on exactly as the dead one would have (greedy, or one seeded generator per position).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from actors import logs
from actors.cutoff import CutOffs
from actors.decisions.recovery import classify
from events.errors import ActorUnreachable, InputError
from sharding.models.registry import ModelArtifact
from sharding.sampling import sample_next, token_rng

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardStage:
    browser_id: str
    handle: Any                 # BrowserActor handle
    artifact: ModelArtifact

    @property
    def first(self) -> bool:
        return bool(self.artifact.meta["first"])

    @property
    def last(self) -> bool:
        return bool(self.artifact.meta["last"])

    def state_id(self, session_id: str) -> str:
        """The page-side KV state of this shard in a session (a browser may hold several shards)."""
        return f"{session_id}/{self.artifact.key}"

    def initial_state(self) -> dict[str, np.ndarray]:
        """Empty KV cache (past length 0) for every layer of this shard."""
        shape = tuple(self.artifact.meta["kv_shape"])
        return {past: np.zeros(shape, np.float32) for _present, past in self.artifact.meta["state"]}


# A shard's browser failed (stage index, the stage, what was raised): return a stage holding the same
# artifact on a live browser, or raise.
RecoverStage = Callable[[int, ShardStage, BaseException], Awaitable[ShardStage]]
# Rebuilds a replacement's cache from the inputs its shard has seen (the pool records it as an operation).
RunReplay = Callable[[ShardStage, dict[str, np.ndarray], dict[str, Any]], Awaitable[Any]]
# A browser the chain went on without (shard index, the failed stage, what was raised, the shadow that took
# over or None when the failed one was itself the shadow): the caller records it and recovers the browser.
LostBrowser = Callable[[int, ShardStage, BaseException, ShardStage | None], Awaitable[None]]


async def run_stage(stage: ShardStage, session_id: str, x: dict[str, np.ndarray], fresh: bool,
                    timeout: float, cutoffs: CutOffs | None = None) -> dict[str, Any]:
    """One forward of a shard in its page, extending the session's cache (``fresh``: replacing it with an
    empty one first). With ``cutoffs``, the call ends at once if the shard's browser is cut off."""
    ref = stage.handle.run.remote(
        stage.artifact.key, x,
        fetch=["topk_values", "topk_indices"] if stage.last else ["hidden_out"],
        state=stage.state_id(session_id),
        state_pairs=[tuple(p) for p in stage.artifact.meta["state"]],
        initial_state=stage.initial_state() if fresh else None,
        timeout=timeout,
    )
    return await (ref if cutoffs is None else cutoffs.call(stage.browser_id, ref))


async def replay_stage(stage: ShardStage, session_id: str, inputs: dict[str, np.ndarray], timeout: float,
                       cutoffs: CutOffs | None = None) -> None:
    """Build a shard's cache for a session afresh from all its inputs so far, in one call."""
    await run_stage(stage, session_id, inputs, True, timeout, cutoffs)


class ShardChain:
    """The shards of one generation session, with the input history that can rebuild any of them.

    Like Petals' client, the chain keeps every input each shard has received (token ids for the
    first, hidden states for the others). When a shard's browser fails, ``recover`` supplies a
    replacement stage holding the same artifact; the chain re-runs that shard's input history on it
    in one call, rebuilding its KV cache, then goes on. The other shards are not touched.

    A shard may have a shadow (``shadows[i]``): another browser holding the same artifact that runs
    every step of the shard on the same input, so its cache is always identical. When the primary
    fails, the shadow's answer to that very step is used and the shadow becomes the primary: no
    replay. The cost is a second forward per shard per step, run concurrently with the first.
    """

    def __init__(self, stages: list[ShardStage], session_id: str, timeout: float = 60.0,
                 recover: RecoverStage | None = None, run_replay: RunReplay | None = None,
                 max_replacements: int = 3, shadows: list[ShardStage | None] | None = None,
                 on_lost: LostBrowser | None = None, cutoffs: CutOffs | None = None) -> None:
        self.stages = list(stages)
        self.cutoffs = cutoffs          # browsers found unreachable: a call to one ends at once
        self.shadows: list[ShardStage | None] = list(shadows) if shadows else [None] * len(stages)
        if len(self.shadows) != len(self.stages):
            raise ValueError(f"{len(self.shadows)} shadows for {len(self.stages)} shards")
        self.on_lost = on_lost
        self.promotions: list[dict[str, Any]] = []
        self.session_id = session_id
        self.timeout = timeout
        self.recover = recover
        self.run_replay = run_replay
        self.max_replacements = max_replacements
        self.history: list[list[np.ndarray]] = [[] for _ in stages]
        self.replays: list[dict[str, Any]] = []
        self.page_ms = 0.0
        # Time lost to failures: failed calls, replacing the shard, replaying its cache; the decode speed
        # leaves it out (a run that recovered decodes as fast as one that did not, and says how long it lost).
        self.recovery_ms = 0.0
        # Per stage, summed over the calls since reset_timings(): in-page compute, and the rest of the call
        # (Ray, evaluate, base64), which is the cost of crossing into that stage (the analyzer's hop).
        self.compute_ms = [0.0] * len(stages)
        self.call_ms = [0.0] * len(stages)

    def reset_timings(self) -> None:
        """Start the per-stage sums afresh (the decode figures leave the prefill out)."""
        self.compute_ms = [0.0] * len(self.stages)
        self.call_ms = [0.0] * len(self.stages)

    async def _step_stage(self, i: int, x: dict[str, np.ndarray]) -> dict[str, Any]:
        replacements = 0
        replay_from: ShardStage | None = None      # the failed stage whose cache the current one must rebuild
        t_first = time.perf_counter()
        while True:
            try:
                if replay_from is not None:
                    await self._replay(i, replay_from)
                    replay_from = None
                t0 = time.perf_counter()
                result = await self._run_with_shadow(i, x)
                t1 = time.perf_counter()
                self.page_ms += result["ms"]
                self.compute_ms[i] += result["ms"]
                self.call_ms[i] += max((t1 - t0) * 1000 - result["ms"], 0.0)
                if replacements:                              # an attempt failed before this one
                    self.recovery_ms += (t0 - t_first) * 1000
                self.history[i].append(next(iter(x.values())))
                return result["outputs"]
            except Exception as exc:
                # A replacement that fails too (during its replay or after) is replaced in turn, up to a bound.
                if self.recover is None or replacements >= self.max_replacements:
                    cause = getattr(exc, "cause", None) or exc
                    if isinstance(cause, InputError):
                        raise cause from None
                    # Typed, and naming this shard's browser: the pool must not blame the session's first one.
                    raise classify(exc, self.stages[i].browser_id) from None
                replacements += 1
                failed = self.stages[i]
                self.stages[i] = await self.recover(i, failed, exc)
                replay_from = failed

    async def _run_with_shadow(self, i: int, x: dict[str, np.ndarray]) -> dict[str, Any]:
        fresh = not self.history[i]
        primary, shadow = self.stages[i], self.shadows[i]
        if shadow is None:
            return await run_stage(primary, self.session_id, x, fresh, self.timeout, self.cutoffs)
        t0 = time.perf_counter()
        first, second = await asyncio.gather(run_stage(primary, self.session_id, x, fresh, self.timeout, self.cutoffs),
                                             run_stage(shadow, self.session_id, x, fresh, self.timeout, self.cutoffs),
                                             return_exceptions=True)
        for outcome in (first, second):
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome                         # cancellation and the like are not browser failures
        if isinstance(second, BaseException):         # the shadow is gone: the shard goes on without one
            self.shadows[i] = None
            if self.on_lost is not None:
                await self.on_lost(i, shadow, second, None)
        if not isinstance(first, BaseException):
            return first
        if isinstance(second, BaseException):
            raise first                               # both failed: replace the primary (with a replay)
        # The shadow holds the same cache and has answered this step: it takes over, nothing is re-run.
        self.stages[i], self.shadows[i] = shadow, None
        if self.on_lost is not None:
            await self.on_lost(i, primary, first, shadow)
        # step_ms: the whole step in which the primary failed, from its start to the shadow's answer in use.
        self.promotions.append({"shard": i, "failed_browser": primary.browser_id,
                                "shadow_browser": shadow.browser_id, "step_ms": (time.perf_counter() - t0) * 1000})
        return second

    async def _replay(self, i: int, failed: ShardStage) -> None:
        """Rebuild shard ``i``'s cache on its replacement from the inputs it has seen so far."""
        if not self.history[i]:
            return
        t0 = time.perf_counter()
        stage = self.stages[i]
        prefix = np.concatenate(self.history[i], axis=1)
        inputs = {"input_ids" if stage.first else "hidden_in": prefix}
        info = {"shard": i, "failed_browser": failed.browser_id, "replacement": stage.browser_id,
                "prefix_tokens": int(prefix.shape[1])}
        if self.run_replay is not None:
            await self.run_replay(stage, inputs, info)
        else:
            await replay_stage(stage, self.session_id, inputs, self.timeout, self.cutoffs)
        self.replays.append(info | {"ms": (time.perf_counter() - t0) * 1000})

    async def forward(self, token_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Run ``token_ids`` through all shards (extending each cache); returns the top-K of the last position."""
        x: dict[str, np.ndarray] = {"input_ids": np.asarray([token_ids], dtype=np.int64)}
        for i, stage in enumerate(self.stages):
            out = await self._step_stage(i, x)
            if not stage.last:
                x = {"hidden_in": out["hidden_out"]}
        return out["topk_values"][0], out["topk_indices"][0]

    async def drop_states(self) -> None:
        """Free this session's caches in every page (best effort: a dead browser has nothing to free)."""
        live = [*self.stages, *(s for s in self.shadows if s is not None)]
        await asyncio.gather(*(s.handle.drop_state.remote(s.state_id(self.session_id)) for s in live),
                             return_exceptions=True)


def after_promotions(stages: list[ShardStage], shadows: list[ShardStage | None],
                     promoted: list[int]) -> tuple[list[ShardStage], list[ShardStage | None]]:
    """The session's stages and shadows once the shadows of ``promoted`` shards have taken over."""
    stages, shadows = list(stages), list(shadows)
    for i in promoted:
        if shadows[i] is not None:
            stages[i], shadows[i] = shadows[i], None
    return stages, shadows


async def generate_tokens(chain: ShardChain, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None,
                          temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                          on_token: Callable[[int, int], Awaitable[None]] | None = None,
                          logged: tuple[int, ...] = ()) -> dict[str, Any]:
    """Prefill ``prompt_ids`` then decode up to ``max_new_tokens`` through ``chain``; stops after ``eos_id``.

    ``on_token(position, token)`` is awaited for each new token before the next step (the caller logs it).
    ``logged``: tokens an earlier coordinator already produced and logged for this session. They are
    prefilled with the prompt (the chain's caches must be empty) and not produced again, so the result
    is what one uninterrupted run gives. A shard whose browser fails is replaced by the chain.
    """
    new_ids = list(logged)
    finished = bool(new_ids) and (new_ids[-1] == eos_id or len(new_ids) >= max_new_tokens)
    t0 = time.perf_counter()
    if not finished:
        values, indices = await chain.forward(list(prompt_ids) + new_ids)
    prefill_ms = (time.perf_counter() - t0) * 1000
    chain.reset_timings()
    t1 = time.perf_counter()
    recovery_before_decode = chain.recovery_ms
    decoded = 0
    while not finished:
        rng = token_rng(seed, len(new_ids)) if temperature > 0 else None
        token = sample_next(values, indices, temperature, top_p, rng)
        if on_token is not None:
            await on_token(len(new_ids), token)
        new_ids.append(token)
        if token == eos_id or len(new_ids) >= max_new_tokens:
            break
        values, indices = await chain.forward([token])
        decoded += 1
    decode_s = time.perf_counter() - t1 - (chain.recovery_ms - recovery_before_decode) / 1000
    per_token = 1 / decoded if decoded else 0.0
    return {
        "token_ids": new_ids,
        "browser_ids": [s.browser_id for s in chain.stages],
        "replays": chain.replays,
        "promotions": chain.promotions,
        "metrics": {
            "prefill_ms": prefill_ms,
            # Decode figures leave out recovery_ms (failed calls, replacements, replays): see ShardChain.
            "recovery_ms": chain.recovery_ms,
            "decode_ms_per_token": decode_s * 1000 / decoded if decoded else None,
            "decode_tokens_per_s": decoded / decode_s if decoded and decode_s > 0 else None,
            "page_ms": chain.page_ms,
            "shards": len(chain.stages),
            "tokens": len(new_ids),
            "resumed_from_tokens": len(logged),
            "replays": len(chain.replays),
            "promotions": len(chain.promotions),
            "shadows": sum(s is not None for s in chain.shadows),
            "session_id": chain.session_id,
            # Per decoded token, as sharding/analyzer.py reads them from the log: compute in each shard's
            # page, and each boundary's hop (the call into the next shard beyond its compute).
            "shard_compute_ms": [ms * per_token for ms in chain.compute_ms],
            "hop_ms": [ms * per_token for ms in chain.call_ms[1:]],
        },
    }


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ShardCoordinator:
    """Runs the generation sessions of one sharded model for a pool (``pool`` is its actor handle).

    Guarantees: every token is logged (TokensAppended, through the pool) before the next step runs;
    a call retried by Ray after this actor's process died goes on from the logged tokens and returns
    what an uninterrupted run returns; a shard whose browser fails is replaced through the pool and
    its cache rebuilt from the session's inputs (the other shards are not touched).
    """

    def __init__(self, pool: Any, model: str) -> None:
        logs.configure()
        self.pool = pool
        self.model = model
        self._background: set[asyncio.Task[Any]] = set()
        self.cutoffs = CutOffs()       # shard browsers the pool found unreachable (``cut_off``)

    def pid(self) -> int:
        """This coordinator's process id (for fault injection: kill it and Ray starts another)."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this coordinator runs on."""
        return ray.get_runtime_context().get_node_id()

    async def cut_off(self, failure: ActorUnreachable) -> None:
        """The pool found this browser's actor silent (its node gone): a session's call to it ends now with
        ``failure`` (and the shard is replaced), instead of waiting for Ray's verdict on the node."""
        self.cutoffs.cut(failure.browser_id, failure)

    async def generate(self, session_id: str, stages: list[ShardStage], shadows: list[ShardStage | None],
                       prompt_ids: list[int], max_new_tokens: int, eos_id: int | None, temperature: float,
                       top_p: float, seed: int | None, timeout: float, plan: dict[str, Any]) -> dict[str, Any]:
        # None on the first call for a session (the pool records it opened, with ``plan``); on a retry (the
        # coordinator running it died) what the log says of it: the tokens so far, and the shards whose
        # shadow had already taken over.
        resumed = await self.pool.session_begin.remote(session_id, self.model, plan) or {"tokens": [], "promoted": []}
        stages, shadows = after_promotions(stages, shadows, resumed["promoted"])

        async def recover(i: int, failed: ShardStage, exc: BaseException) -> ShardStage:
            cause = getattr(exc, "cause", None) or exc
            if isinstance(cause, InputError):
                raise cause
            failure = classify(exc, failed.browser_id)
            # Not onto a browser the session already uses (another shard, or a shadow).
            others = [s.browser_id for j, s in enumerate(chain.stages) if j != i]
            others += [s.browser_id for s in chain.shadows if s is not None]
            replacement = await self.pool.shard_replace.remote(failure, failed.artifact.key, others)
            if replacement is None:       # this pool does not recover (level none)
                raise failure
            self.cutoffs.reset(replacement.browser_id)     # a restart under the same id answers again
            log.info("shard replaced", extra={"session_id": session_id, "shard": i,
                                              "failed_browser": failed.browser_id,
                                              "replacement": replacement.browser_id})
            return replacement

        async def run_replay(stage: ShardStage, inputs: dict[str, np.ndarray], info: dict[str, Any]) -> None:
            await self.pool.shard_replay.remote(session_id, self.model, stage, inputs, info, timeout)

        async def on_token(position: int, token: int) -> None:
            await self.pool.session_append.remote(session_id, position, [token])

        async def on_lost(i: int, failed: ShardStage, exc: BaseException, shadow: ShardStage | None) -> None:
            log.info("shard browser lost, session goes on", extra={
                "session_id": session_id, "shard": i, "failed_browser": failed.browser_id,
                "shadow_browser": shadow.browser_id if shadow else None})
            await self.pool.shard_lost.remote(session_id, i, classify(exc, failed.browser_id),
                                              shadow.browser_id if shadow else None)

        # A retry's chain starts with empty histories, so its first forward replaces every cache the dead
        # coordinator may have left half-extended: the caches are rebuilt from the log, not trusted.
        chain = ShardChain(stages, session_id, timeout, recover, run_replay, shadows=shadows, on_lost=on_lost,
                           cutoffs=self.cutoffs)
        try:
            return await generate_tokens(chain, prompt_ids, max_new_tokens, eos_id, temperature, top_p, seed,
                                         on_token, tuple(resumed["tokens"]))
        finally:
            self._spawn(chain.drop_states())

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)          # held until done: the loop keeps only weak references
        task.add_done_callback(self._background.discard)
