"""webpool: a fault-tolerant pool of headless browsers used as AI accelerators, driven through Ray.

The public face. Implementation lives in ``actors/`` (Ray actors), ``events/`` (the event log) and
``sharding/`` (models and shards)::

    import ray
    from webpool import ResourcePool
    ray.init()
    pool = ResourcePool.remote(max_connections=2)
    out = ray.get(pool.infer.remote("all-minilm-l6-v2", {"text": "Example input"}))

Names are imported on first use, so ``import webpool`` (and the CLI) does not import Ray: Ray reads
its environment (e.g. ``RAY_AUTH_MODE``) when it is first imported.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ResourcePool": "actors.pool",
    "BrowserActor": "actors.browser_actor",
    "BrowserFailure": "events.errors",
    "NoBrowserAvailableError": "events.errors",
    "PoolBusyError": "events.errors",
    "WebpoolError": "events.errors",
    "FailureCategory": "events.errors",
    "InputError": "events.errors",
    "ModelNotFoundError": "events.errors",
    "FaultToleranceLevel": "actors.decisions.recovery",
    "RecoveryStrategy": "actors.decisions.recovery",
    "PerformanceHistoryTracker": "events.history",
    "ModelShardingAnalyzer": "sharding.analyzer",
    "ShardRunRecord": "sharding.analyzer",
    "plan_layers": "sharding.plan",
    "BrowserBudget": "sharding.plan",
    "ShardPlan": "sharding.plan",
    "PlanError": "sharding.plan",
    "ResourcePoolBridgeIntegration": "webpool.guide",
    "ResourcePoolRecoveryManager": "webpool.guide_recovery",
    "run_with_recovery": "webpool.guide",
    "BrowserStateManager": "webpool.guide_recovery",
    "BridgeNotReadyError": "events.errors",
    "ModelShardingManager": "webpool.guide_sharding",
}
_ALIASES = {
    "BrowserFailureCategory": ("events.errors", "FailureCategory"),
    "MODELS": ("sharding.models.registry", "SPECS"),
}

__all__ = sorted([*_EXPORTS, *_ALIASES])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name], name
    elif name in _ALIASES:
        module, attr = _ALIASES[name]
    else:
        raise AttributeError(f"module 'webpool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
