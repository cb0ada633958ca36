"""The guide's ``ModelShardingManager``: layer-sharded generation through the ResourcePool actor.

It adds no machinery of its own: ``run_inference`` is one ``pool.generate(model, prompt, shards=num_shards)``
call, so placement, the per-shard KV caches, the TokensAppended events and the prefix replay of a failed
shard all stay in the pool (actors/pool.py, sharding/coordinator.py). The manager keeps the guide's client
side: a ``performance_history`` of ``ShardRunRecord`` (one per run, what ``ModelShardingAnalyzer`` reads)
and ``get_performance_metrics()``.

Recovery, and how it differs from the guide:
- A pool whose own fault-tolerance level recovers (low and up) replaces a shard that fails mid-generation
  and replays the session's prefix on it (the guide's "coordinated" recovery): the answer is unchanged and
  the result says ``recovery="prefix_replay"``.
- A pool at level none (the guide's basic pool) raises the failure. The manager, unless its own level is
  none, then recovers that browser through ``pool.recover_browser(..., strategy=recovery_strategy)`` and
  runs the generation again from the start (``recovery="rerun"``), up to ``max_recovery_attempts`` times.
  The pool offers no per-request level, so the manager cannot ask a level-none pool for a prefix replay.
- Memory per shard in the history is the planner's estimate (``sharding.plan.shard_memory_bytes``, the same
  figure a ``ShardPlan`` records); the browsers' measured memory is in ``get_performance_metrics()``.
- ``shutdown()`` releases the manager only: the pool belongs to whoever created it (the bridge's own
  ``shutdown`` closes the browsers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from actors.decisions.recovery import FaultToleranceLevel, RecoveryStrategy
from events.errors import BridgeNotReadyError, BrowserFailure, InputError
from sharding.analyzer import ShardRunRecord
from sharding.models.registry import SPECS, get_spec, llama_model
from sharding.plan import even_layer_ranges, shard_memory_bytes
from webpool.guide_calls import GENERATE_OPTIONS, pool_call

log = logging.getLogger(__name__)

SHARDING_STRATEGIES = ("layer_based",)
INPUT_KEYS = frozenset({"input_text"}) | GENERATE_OPTIONS
DEFAULT_MAX_NEW_TOKENS = 32
WARMUP_PROMPT = "Hello"


def shardable_models() -> list[str]:
    """The registry's models that can be split by layers (the llama family)."""
    return [name for name, spec in SPECS.items() if spec.family == "llama"]


def _positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(field, f"must be a positive int, got {value!r}")
    return value


class ModelShardingManager:
    """A model split by layers over ``num_shards`` browsers of a ResourcePool (see the module doc)."""

    def __init__(self, model_name: str, sharding_strategy: str = "layer_based", num_shards: int = 2,
                 fault_tolerance_level: str = "medium", recovery_strategy: str = "coordinated",
                 connection_pool: Any = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 max_recovery_attempts: int = 3, max_history: int = 10_000,
                 logger: logging.Logger | None = None) -> None:
        spec = get_spec(model_name)        # ModelNotFoundError (an InputError) names the models we have
        if spec.family != "llama":
            raise InputError("model_name", f"{spec.name} is a {spec.task} model and cannot be split by layers; "
                                           f"shardable models: {', '.join(shardable_models())}")
        if sharding_strategy not in SHARDING_STRATEGIES:
            raise InputError("sharding_strategy", f"must be one of {list(SHARDING_STRATEGIES)}, "
                                                  f"got {sharding_strategy!r}")
        try:
            level = FaultToleranceLevel(fault_tolerance_level)
        except ValueError:
            raise InputError("fault_tolerance_level", f"must be one of {[v.value for v in FaultToleranceLevel]}, "
                                                      f"got {fault_tolerance_level!r}") from None
        try:
            strategy = RecoveryStrategy(recovery_strategy)
        except ValueError:
            raise InputError("recovery_strategy", f"must be one of {[v.value for v in RecoveryStrategy]}, "
                                                  f"got {recovery_strategy!r}") from None
        if logger is not None and not isinstance(logger, logging.Logger):
            raise InputError("logger", f"must be a logging.Logger, got {type(logger).__name__}")
        if isinstance(max_recovery_attempts, bool) or not isinstance(max_recovery_attempts, int) \
                or max_recovery_attempts < 0:
            raise InputError("max_recovery_attempts", f"must be an int >= 0, got {max_recovery_attempts!r}")
        self.model_name = spec.name
        self.sharding_strategy = sharding_strategy
        self.num_shards = _positive_int("num_shards", num_shards)
        self.fault_tolerance_level = level.value
        self.recovery_strategy = strategy.value
        self.connection_pool = connection_pool
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.max_recovery_attempts = max_recovery_attempts
        self.max_history = _positive_int("max_history", max_history)
        self.logger = logger or log
        self.performance_history: list[ShardRunRecord] = []
        self.initialized = False
        self.initialize_ms: float | None = None
        self.layer_ranges: list[tuple[int, int]] = []
        self.browser_ids: list[str] = []
        self._model: Any = None
        self._runs: list[dict[str, Any]] = []            # per run: what get_performance_metrics summarises
        self._browser_memory_mb: dict[str, float] = {}

    # ----- life cycle ---------------------------------------------------------------------------
    def _require_pool(self) -> Any:
        if self.connection_pool is None:
            raise BridgeNotReadyError("ModelShardingManager has no connection_pool (pass the pool's "
                                      "connection_pool, e.g. ResourcePoolBridgeIntegration.connection_pool)")
        return self.connection_pool

    def _require_ready(self) -> Any:
        pool = self._require_pool()
        if not self.initialized:
            raise BridgeNotReadyError("call `await sharding_manager.initialize()` first")
        return pool

    async def initialize(self) -> None:
        """Load every shard into its own browser (a one-token generation places them). Idempotent."""
        if self.initialized:
            return
        pool = self._require_pool()
        # The model's config (layer count, tokenizer) lives in the driver too: validation and memory figures.
        self._model = await asyncio.to_thread(llama_model, self.model_name)
        n_layers = self._model.config.n_layers
        if self.num_shards > n_layers:
            raise InputError("num_shards", f"{self.num_shards} shards for {self.model_name}, which has "
                                           f"{n_layers} layers; at most {n_layers}")
        self.layer_ranges = even_layer_ranges(n_layers, self.num_shards)
        t0 = time.perf_counter()
        warm = await pool_call(pool.generate.remote(self.model_name, WARMUP_PROMPT, max_new_tokens=1,
                                                    shards=self.num_shards))
        self.initialize_ms = (time.perf_counter() - t0) * 1000
        self.browser_ids = list(warm["browser_ids"])
        self.initialized = True
        self.logger.info("%s: %d layer shards %s on browsers %s (%.0f ms)", self.model_name, self.num_shards,
                         self.layer_ranges, self.browser_ids, self.initialize_ms)

    async def shutdown(self) -> None:
        """Release the manager (the pool and its browsers stay with their owner; module doc)."""
        self.initialized = False
        self.connection_pool = None
        self.logger.info("%s sharding manager shut down after %d runs", self.model_name, len(self._runs))

    # ----- inference ----------------------------------------------------------------------------
    def _options(self, inputs: Any) -> tuple[str, dict[str, Any]]:
        if not isinstance(inputs, dict) or "input_text" not in inputs:
            raise InputError("inputs", 'must be a dict like {"input_text": "...", "max_new_tokens": 32}')
        unknown = set(inputs) - INPUT_KEYS
        if unknown:
            raise InputError("inputs", f"unknown key(s) {sorted(unknown)}; known: {sorted(INPUT_KEYS)}")
        options = {k: v for k, v in inputs.items() if k != "input_text"}
        options.setdefault("max_new_tokens", self.max_new_tokens)
        return inputs["input_text"], options

    async def run_inference(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Generate from ``{"input_text": str, "max_new_tokens"?: int, "temperature"?, "top_p"?, "seed"?}``.

        Returns {"success", "text", "token_ids", "prompt_token_ids", "browser_ids", "num_shards", "recovered",
        "recovery" (None | "prefix_replay" | "pool_retry" | "rerun"), "replays", "metrics"}. Bad input raises
        InputError before any browser is asked; a failure that recovery could not repair is raised (and
        recorded in the history as a failed run).
        """
        pool = self._require_ready()
        prompt, options = self._options(inputs)
        t0 = time.perf_counter()
        reruns: list[dict[str, Any]] = []
        while True:
            try:
                out = await pool_call(pool.generate.remote(self.model_name, prompt, shards=self.num_shards,
                                                           **options))
                break
            except BrowserFailure as failure:
                if (self.fault_tolerance_level == FaultToleranceLevel.NONE.value
                        or len(reruns) >= self.max_recovery_attempts):
                    self._record_failure(failure)
                    raise
                reruns.append(await self._recover(pool, failure))
            except InputError:
                raise
            except Exception as exc:
                self._record_failure(exc)
                raise
        total_ms = (time.perf_counter() - t0) * 1000
        return await self._record_success(pool, out, reruns, total_ms)

    async def _recover(self, pool: Any, failure: BrowserFailure) -> dict[str, Any]:
        """The pool reported the failure without recovering it (its level is none): recover it here."""
        category = failure.category.value
        self.logger.warning("shard browser %s failed (%s); recovering it by %s and running again",
                            failure.browser_id, category, self.recovery_strategy)
        outcome = await pool_call(pool.recover_browser.remote(failure.browser_id, category, str(failure),
                                                              strategy=self.recovery_strategy))
        if not outcome["success"]:
            self.logger.warning("recovery of %s failed: %s", failure.browser_id, outcome["error"])
        return {"browser_id": failure.browser_id, "category": category, "success": bool(outcome["success"]),
                "recovery_browser": outcome["recovery_browser"], "duration_ms": outcome["duration_ms"]}

    def _record_failure(self, exc: BaseException) -> None:
        self.logger.error("%s over %d shards failed: %s", self.model_name, self.num_shards, exc)
        self._append(ShardRunRecord(ts=time.time(), model=self.model_name, num_shards=self.num_shards,
                                    shard_compute_ms=(), hop_ms=(), prefill_ms=None, decode_ms_per_token=None,
                                    tokens=0, memory_bytes_per_shard=(), success=False))
        self._runs.append({"success": False, "error": f"{type(exc).__name__}: {exc}"})

    def _append(self, record: ShardRunRecord) -> None:
        self.performance_history.append(record)
        del self.performance_history[:-self.max_history]      # bounded, oldest dropped first

    async def _record_success(self, pool: Any, out: dict[str, Any], reruns: list[dict[str, Any]],
                              total_ms: float) -> dict[str, Any]:
        m = out["metrics"]
        replays = list(out.get("replays") or [])
        recovery = ("rerun" if reruns else "prefix_replay" if replays else
                    "pool_retry" if out.get("recovered") else None)
        context = len(out["prompt_token_ids"]) + len(out["token_ids"])
        config = self._model.config
        memory = tuple(shard_memory_bytes(config, a, b, context_tokens=min(context, config.max_context))
                       for a, b in self.layer_ranges)
        if m.get("decode_ms_per_token") is not None:    # a run that decoded no token tells nothing of speed
            self._append(ShardRunRecord(
                ts=time.time(), model=self.model_name, num_shards=int(m["shards"]),
                shard_compute_ms=tuple(m["shard_compute_ms"]), hop_ms=tuple(m["hop_ms"]),
                prefill_ms=float(m["prefill_ms"]), decode_ms_per_token=float(m["decode_ms_per_token"]),
                tokens=int(m["tokens"]), memory_bytes_per_shard=memory, success=True, memory_measured=False))
        self.browser_ids = list(out["browser_ids"])
        state = await pool.get_state.remote()
        self._browser_memory_mb = {b: state.resources[b].memory_mb for b in self.browser_ids
                                   if b in state.resources}
        metrics = dict(m) | {"total_ms": total_ms, "reruns": len(reruns)}
        self._runs.append({"success": True, "recovery": recovery, "total_ms": total_ms, "metrics": metrics})
        return {"success": True, "text": out["text"], "token_ids": list(out["token_ids"]),
                "prompt_token_ids": list(out["prompt_token_ids"]), "browser_ids": self.browser_ids,
                "num_shards": self.num_shards, "recovered": recovery is not None, "recovery": recovery,
                "replays": replays, "reruns": reruns, "metrics": metrics}

    # ----- monitoring ---------------------------------------------------------------------------
    def get_performance_metrics(self) -> dict[str, Any]:
        """Counts and timings over this manager's runs (medians; p95 of the per-run total)."""
        ok = [r for r in self._runs if r["success"]]

        def median(key: str) -> float | None:
            values = [r["metrics"][key] for r in ok if r["metrics"].get(key) is not None]
            return float(np.median(values)) if values else None

        totals = [r["total_ms"] for r in ok]
        compute = [r["metrics"]["shard_compute_ms"] for r in ok if r["metrics"].get("decode_ms_per_token")]
        hops = [r["metrics"]["hop_ms"] for r in ok if r["metrics"].get("decode_ms_per_token")]
        return {
            "model": self.model_name, "sharding_strategy": self.sharding_strategy, "num_shards": self.num_shards,
            "layer_ranges": [list(r) for r in self.layer_ranges], "browser_ids": list(self.browser_ids),
            "fault_tolerance_level": self.fault_tolerance_level, "recovery_strategy": self.recovery_strategy,
            "initialized": self.initialized, "initialize_ms": self.initialize_ms,
            "runs": len(self._runs), "successful_runs": len(ok), "failed_runs": len(self._runs) - len(ok),
            "recovered_runs": sum(r["recovery"] is not None for r in ok),
            "prefix_replays": sum(r["metrics"].get("replays", 0) for r in ok),
            "reruns": sum(r["metrics"]["reruns"] for r in ok),
            "tokens_generated": sum(r["metrics"]["tokens"] for r in ok),
            "median_prefill_ms": median("prefill_ms"),
            "median_decode_ms_per_token": median("decode_ms_per_token"),
            "median_decode_tokens_per_s": median("decode_tokens_per_s"),
            "median_total_ms": float(np.median(totals)) if totals else None,
            "p95_total_ms": float(np.percentile(totals, 95)) if totals else None,
            "median_shard_compute_ms": np.median(compute, axis=0).tolist() if compute else [],
            "median_hop_ms": np.median(hops, axis=0).tolist() if hops and hops[0] else [],
            "browser_memory_mb": dict(self._browser_memory_mb),
        }


__all__ = ["SHARDING_STRATEGIES", "ModelShardingManager", "shardable_models"]
