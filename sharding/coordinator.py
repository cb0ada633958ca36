"""Generation through a chain of llama shards, each a model loaded in one browser.

Each shard keeps its own KV cache in its page, under the generation's session id (the page's
``state``), so per step only token ids and hidden states cross Ray (as base64 float32 in the
page call, ndarray between actors). The caller records every new token (TokensAppended), which is
what lets a replacement shard rebuild its cache by re-running the token prefix.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sharding.models.registry import ModelArtifact
from sharding.sampling import sample_next


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


RecoverStage = Callable[[int, ShardStage, BaseException], Awaitable[ShardStage]]
# Runs a replay call as the caller sees fit (the pool records it as an operation).
RunReplay = Callable[[ShardStage, Callable[[], Awaitable[dict[str, Any]]]], Awaitable[dict[str, Any]]]


class ShardChain:
    """The shards of one generation session, with the input history that can rebuild any of them.

    Like Petals' client, the chain keeps every input each shard has received (token ids for the
    first, hidden states for the others). When a shard's browser fails, ``recover`` supplies a
    replacement stage holding the same artifact; the chain re-runs that shard's input history on it
    in one call, rebuilding its KV cache, then goes on. The other shards are not touched.
    """

    def __init__(self, stages: list[ShardStage], session_id: str, timeout: float = 60.0,
                 recover: RecoverStage | None = None, run_replay: RunReplay | None = None,
                 max_replacements: int = 3) -> None:
        self.stages = list(stages)
        self.session_id = session_id
        self.timeout = timeout
        self.recover = recover
        self.run_replay = run_replay
        self.max_replacements = max_replacements
        self.history: list[list[np.ndarray]] = [[] for _ in stages]
        self.replays: list[dict[str, Any]] = []
        self.page_ms = 0.0
        # Per stage, summed over the calls since reset_timings(): in-page compute, and the rest of the call
        # (Ray, evaluate, base64), which is the cost of crossing into that stage (the analyzer's hop).
        self.compute_ms = [0.0] * len(stages)
        self.call_ms = [0.0] * len(stages)

    def reset_timings(self) -> None:
        """Start the per-stage sums afresh (the decode figures leave the prefill out)."""
        self.compute_ms = [0.0] * len(self.stages)
        self.call_ms = [0.0] * len(self.stages)

    async def _run(self, i: int, x: dict[str, np.ndarray], fresh: bool) -> dict[str, Any]:
        stage = self.stages[i]
        result = await stage.handle.run.remote(
            stage.artifact.key, x,
            fetch=["topk_values", "topk_indices"] if stage.last else ["hidden_out"],
            state=stage.state_id(self.session_id),
            state_pairs=[tuple(p) for p in stage.artifact.meta["state"]],
            initial_state=stage.initial_state() if fresh else None,
            timeout=self.timeout,
        )
        self.page_ms += result["ms"]
        return result["outputs"]

    async def _step_stage(self, i: int, x: dict[str, np.ndarray]) -> dict[str, Any]:
        replacements = 0
        while True:
            fresh = not self.history[i]
            try:
                t0 = time.perf_counter()
                page_before = self.page_ms
                out = await self._run(i, x, fresh)
                page = self.page_ms - page_before
                self.compute_ms[i] += page
                self.call_ms[i] += max((time.perf_counter() - t0) * 1000 - page, 0.0)
                self.history[i].append(next(iter(x.values())))
                return out
            except Exception as exc:
                if self.recover is None or replacements >= self.max_replacements:
                    raise
                replacements += 1
                failed = self.stages[i]
                self.stages[i] = await self.recover(i, failed, exc)
                await self._replay(i, failed)

    async def _replay(self, i: int, failed: ShardStage) -> None:
        """Rebuild shard ``i``'s cache on its replacement from the inputs it has seen so far."""
        if not self.history[i]:
            return
        t0 = time.perf_counter()
        stage = self.stages[i]
        name = "input_ids" if stage.first else "hidden_in"
        prefix = np.concatenate(self.history[i], axis=1)
        info = {"shard": i, "failed_browser": failed.browser_id, "replacement": stage.browser_id,
                "prefix_tokens": int(prefix.shape[1])}

        async def call() -> dict[str, Any]:
            await stage.handle.drop_state.remote(stage.state_id(self.session_id))
            await self._run(i, {name: prefix}, fresh=True)
            return {"metrics": dict(info)}

        await (self.run_replay(stage, call) if self.run_replay else call())
        self.replays.append(info | {"ms": (time.perf_counter() - t0) * 1000})

    async def forward(self, token_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Run ``token_ids`` through all shards (extending each cache); returns the top-K of the last position."""
        x: dict[str, np.ndarray] = {"input_ids": np.asarray([token_ids], dtype=np.int64)}
        for i, stage in enumerate(self.stages):
            out = await self._step_stage(i, x)
            if not stage.last:
                x = {"hidden_in": out["hidden_out"]}
        return out["topk_values"][0], out["topk_indices"][0]


async def generate_tokens(stages: list[ShardStage], session_id: str, prompt_ids: list[int], max_new_tokens: int,
                          eos_id: int | None, temperature: float = 0.0, top_p: float = 1.0,
                          seed: int | None = None,
                          on_token: Callable[[int], Awaitable[None]] | None = None,
                          timeout: float = 60.0, recover: RecoverStage | None = None,
                          run_replay: RunReplay | None = None) -> dict[str, Any]:
    """Prefill ``prompt_ids`` then decode up to ``max_new_tokens``; stops after ``eos_id``.

    With ``recover``, a shard whose browser fails mid-generation is replaced and its cache rebuilt
    from the chain's input history, so the output is what it would have been without the failure.
    """
    chain = ShardChain(stages, session_id, timeout, recover, run_replay)
    rng = np.random.default_rng(seed) if temperature > 0 else None
    new_ids: list[int] = []
    t0 = time.perf_counter()
    values, indices = await chain.forward(prompt_ids)
    prefill_ms = (time.perf_counter() - t0) * 1000
    chain.reset_timings()
    t1 = time.perf_counter()
    while True:
        token = sample_next(values, indices, temperature, top_p, rng)
        new_ids.append(token)
        if on_token is not None:
            await on_token(token)
        if token == eos_id or len(new_ids) >= max_new_tokens:
            break
        values, indices = await chain.forward([token])
    decode_s = time.perf_counter() - t1
    decode_steps = len(new_ids) - 1
    per_token = 1 / decode_steps if decode_steps else 0.0
    return {
        "token_ids": new_ids,
        "browser_ids": [s.browser_id for s in chain.stages],
        "replays": chain.replays,
        "metrics": {
            "prefill_ms": prefill_ms,
            "decode_ms_per_token": decode_s * 1000 / decode_steps if decode_steps else None,
            "decode_tokens_per_s": decode_steps / decode_s if decode_steps and decode_s > 0 else None,
            "page_ms": chain.page_ms,
            "shards": len(chain.stages),
            "tokens": len(new_ids),
            "replays": len(chain.replays),
            "session_id": session_id,
            # Per decoded token, as sharding/analyzer.py reads them from the log: compute in each shard's
            # page, and each boundary's hop (the call into the next shard beyond its compute).
            "shard_compute_ms": [ms * per_token for ms in chain.compute_ms],
            "hop_ms": [ms * per_token for ms in chain.call_ms[1:]],
        },
    }
