"""Generation through a chain of llama shards, each a model loaded in one browser.

Each shard keeps its own KV cache in its page, under the generation's session id (the page's
``state``), so per step only token ids and hidden states cross Ray (as base64 float32 in the
page call, ndarray between actors). The caller records every new token (TokensAppended), which is
what lets a replacement shard rebuild its cache by re-running the token prefix.
"""

from __future__ import annotations

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

    def initial_state(self) -> dict[str, np.ndarray]:
        """Empty KV cache (past length 0) for every layer of this shard."""
        shape = tuple(self.artifact.meta["kv_shape"])
        return {past: np.zeros(shape, np.float32) for _present, past in self.artifact.meta["state"]}


async def forward(stages: list[ShardStage], session_id: str, token_ids: list[int],
                  fresh: bool, timeout: float = 60.0) -> tuple[np.ndarray, np.ndarray, float]:
    """Run ``token_ids`` through all shards (extending each shard's cache); returns top-K and page ms."""
    x: dict[str, np.ndarray] = {"input_ids": np.asarray([token_ids], dtype=np.int64)}
    page_ms = 0.0
    for stage in stages:
        result = await stage.handle.run.remote(
            stage.artifact.key, x,
            fetch=["topk_values", "topk_indices"] if stage.last else ["hidden_out"],
            state=session_id,
            state_pairs=[tuple(p) for p in stage.artifact.meta["state"]],
            initial_state=stage.initial_state() if fresh else None,
            timeout=timeout,
        )
        page_ms += result["ms"]
        if not stage.last:
            x = {"hidden_in": result["outputs"]["hidden_out"]}
    out = result["outputs"]
    return out["topk_values"][0], out["topk_indices"][0], page_ms


async def generate_tokens(stages: list[ShardStage], session_id: str, prompt_ids: list[int], max_new_tokens: int,
                          eos_id: int | None, temperature: float = 0.0, top_p: float = 1.0,
                          seed: int | None = None,
                          on_token: Callable[[int], Awaitable[None]] | None = None,
                          timeout: float = 60.0) -> dict[str, Any]:
    """Prefill ``prompt_ids`` then decode up to ``max_new_tokens``; stops after ``eos_id``."""
    import time

    rng = np.random.default_rng(seed) if temperature > 0 else None
    new_ids: list[int] = []
    t0 = time.perf_counter()
    values, indices, page_ms = await forward(stages, session_id, prompt_ids, fresh=True, timeout=timeout)
    prefill_ms = (time.perf_counter() - t0) * 1000
    t1 = time.perf_counter()
    while True:
        token = sample_next(values, indices, temperature, top_p, rng)
        new_ids.append(token)
        if on_token is not None:
            await on_token(token)
        if token == eos_id or len(new_ids) >= max_new_tokens:
            break
        values, indices, ms = await forward(stages, session_id, [token], fresh=False, timeout=timeout)
        page_ms += ms
    decode_s = time.perf_counter() - t1
    decode_steps = len(new_ids) - 1
    return {
        "token_ids": new_ids,
        "metrics": {
            "prefill_ms": prefill_ms,
            "decode_ms_per_token": decode_s * 1000 / decode_steps if decode_steps else None,
            "decode_tokens_per_s": decode_steps / decode_s if decode_steps and decode_s > 0 else None,
            "page_ms": page_ms,
            "shards": len(stages),
        },
    }
