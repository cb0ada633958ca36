"""The seed guide's client API, as a thin layer over the ResourcePool actor.

``ResourcePoolBridgeIntegration`` (the pool as the guide's examples hold it) and ``run_with_recovery`` (the
guide's function, unchanged in behaviour) are here; ``ResourcePoolRecoveryManager`` (the guide's recovery
manager: classification, the five strategies, statistics, performance advice) is in webpool/guide_recovery.py,
and how a guide call reaches the pool in webpool/guide_calls.py. Every decision stays where it
already is: placement and recovery steps in the pool (actors/router.py, actors/recovery.py), failure
classification in ``actors.decisions.recovery.classify``, statistics in ``events.state.recovery_statistics``,
performance history in ``events.history``. This module only turns the guide's calls into pool actor
calls and the pool's answers into the guide's result dicts. The pool's event log stays the one source of
truth: nothing here keeps state the log does not have, except the guide's client-side operation entries
(``track_operation``), which the pool's own operation events duplicate with real timings.

Where this differs from the guide, and why:
- ``get_browser_for_model`` asks the pool to place the model (``ResourcePool.place``), so the browser it
  names really holds the model. ``browser.call`` runs through the pool's public ``infer``/``generate``,
  which place by themselves: with one caller they pick that same browser (the least busy holder), but
  under concurrent load the pool may serve the call on another browser holding the model. The result's
  ``browser_id`` says which browser ran it.
- The strategies call ``ResourcePool.recover_browser(..., strategy=...)``: the manager's strategy is used
  for that one recovery, whatever the pool's own fault-tolerance configuration (level none included).
- ``get_recovery_statistics`` and the transaction log come from the pool's log, so they count every
  recovery (also those the pool did transparently inside ``infer``), not only this manager's.
- ``adaptive_scaling=True`` is the pool's own: it grows up to ``max_connections`` under load and retires
  idle browsers, each decision a PoolScaled event.
"""
from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import ray

from actors.decisions.recovery import FaultToleranceConfig
from actors.pool import PoolCore, ResourcePool
from events.errors import BridgeNotReadyError, FailureCategory, InputError, NoBrowserAvailableError, WebpoolError
from webpool.guide_calls import PoolBrowser, missing_pool_api, pool_call
from webpool.guide_recovery import ResourcePoolRecoveryManager

log = logging.getLogger(__name__)

BrowserFailureCategory = FailureCategory          # the guide's name


class ResourcePoolBridgeIntegration:
    """The guide's pool object: ``await initialize()`` starts a ResourcePool actor (``connection_pool``)
    and a ResourcePoolRecoveryManager (``recovery_manager``) configured by ``fault_tolerance_options``.

    ``pool_options`` go to ResourcePool unchanged (backend, num_threads, event_log, request_timeout, ...).
    Without ``fault_tolerance_options`` the pool itself reports failures (level none) and the recovery
    manager (level medium, progressive, the guide's defaults) recovers them when asked.
    """

    def __init__(self, max_connections: int = 4, browser_preferences: dict[str, str] | None = None,
                 adaptive_scaling: bool = False, fault_tolerance_options: dict[str, Any] | None = None,
                 **pool_options: Any) -> None:
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise InputError("max_connections", f"must be a positive int, got {max_connections!r}")
        if browser_preferences is not None and (
                not isinstance(browser_preferences, dict)
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in browser_preferences.items())):
            raise InputError("browser_preferences", "must be a dict of task family -> browser type (str -> str)")
        if not isinstance(adaptive_scaling, bool):
            raise InputError("adaptive_scaling", f"must be a bool, got {adaptive_scaling!r}")
        self.fault_tolerance = FaultToleranceConfig.from_options(fault_tolerance_options)   # validates now
        self.fault_tolerance.check_voters(max_connections)
        known = set(inspect.signature(PoolCore.__init__).parameters) - {"self"}
        unknown = set(pool_options) - known
        if unknown:
            raise InputError("pool_options", f"unknown ResourcePool option(s) {sorted(unknown)}; "
                                             f"known: {sorted(known)}")
        self.max_connections = max_connections
        self.browser_preferences = dict(browser_preferences or {})
        self.adaptive_scaling = adaptive_scaling
        self.fault_tolerance_options = dict(fault_tolerance_options) if fault_tolerance_options else None
        self.pool_options = pool_options
        self.connection_pool: Any = None
        self.recovery_manager: ResourcePoolRecoveryManager | None = None

    async def initialize(self) -> None:
        """Start the pool actor and the recovery manager. Calling it again does nothing."""
        if self.connection_pool is not None:
            return
        missing = missing_pool_api()
        if missing:
            raise BridgeNotReadyError(f"ResourcePool lacks {', '.join(missing)}, which the guide's API needs")
        kwargs: dict[str, Any] = {"max_connections": self.max_connections,
                                  "browser_preferences": self.browser_preferences,
                                  "fault_tolerance": self.fault_tolerance_options,
                                  "adaptive_scaling": self.adaptive_scaling, **self.pool_options}
        pool = ResourcePool.remote(**kwargs)
        try:
            await pool.get_recovery_statistics.remote()        # opens the log; a failed start surfaces here
        except Exception:
            ray.kill(pool)
            raise
        self.connection_pool = pool
        options = self.fault_tolerance_options
        manager = (ResourcePoolRecoveryManager(pool, self.fault_tolerance.level.value,
                                               self.fault_tolerance.recovery_strategy.value)
                   if options else ResourcePoolRecoveryManager(pool))
        await manager.initialize()
        self.recovery_manager = manager

    def _require_pool(self) -> Any:
        if self.connection_pool is None:
            raise BridgeNotReadyError("call `await initialize()` first")
        return self.connection_pool

    async def get_browser_for_model(self, model_name: str) -> dict[str, Any]:
        """A browser holding ``model_name`` (loaded now if none does): {"id", "type", "backend", "browser"}."""
        pool = self._require_pool()
        placed = await pool_call(pool.place.remote(model_name))
        return {"id": placed["browser_id"], "type": placed["browser_type"], "backend": placed["backend"],
                "browser": PoolBrowser(pool, placed["browser_id"], placed["browser_type"])}

    async def shutdown(self) -> None:
        """Close every browser of the pool and stop the pool actor."""
        pool, self.connection_pool = self.connection_pool, None
        if pool is None:
            return
        try:
            await pool.shutdown.remote()
        finally:
            ray.kill(pool)
            self.recovery_manager = None


async def run_with_recovery(pool: ResourcePoolBridgeIntegration, model_name: str, operation: str,
                            inputs: dict[str, Any], recovery_manager: ResourcePoolRecoveryManager) -> dict[str, Any]:
    """Run an operation with automatic recovery (the guide's function; same steps and result keys).

    Success: {"success": True, "result", "browser_id", "browser_type", "metrics"}; after a recovered failure
    {"success": True, "result", "recovered": True, "recovery_browser", "original_error", "metrics"};
    otherwise {"success": False, "error"}.
    """
    try:
        browser_data = await pool.get_browser_for_model(model_name)
        if not browser_data:
            raise NoBrowserAvailableError(f"No browser available for model {model_name}")
        browser_id = browser_data["id"]
        browser_type = browser_data["type"]
        browser = browser_data["browser"]

        entry_id = await recovery_manager.track_operation(operation, model_name, browser_id, browser_type)
        try:
            start_time = time.time()
            result = await browser.call(operation, {"model_name": model_name, "inputs": inputs})
            end_time = time.time()
            metrics = {"duration_ms": (end_time - start_time) * 1000}
            if isinstance(result, dict) and "metrics" in result:
                metrics.update(result["metrics"])
            await recovery_manager.complete_operation(entry_id, metrics, "completed")
            return {"success": True, "result": result, "browser_id": browser_id, "browser_type": browser_type,
                    "metrics": metrics}
        except Exception as e:
            await recovery_manager.complete_operation(entry_id, {"error": str(e)}, "failed")
            await recovery_manager.handle_browser_failure(browser_id, e)
            recovery_result = await recovery_manager.recover_operation(model_name, operation, inputs)
            if recovery_result["success"]:
                return {"success": True, "result": recovery_result["result"], "recovered": True,
                        "recovery_browser": recovery_result["recovery_browser"], "original_error": str(e),
                        "metrics": recovery_result["metrics"]}
            raise WebpoolError(f"Operation failed and recovery failed: {recovery_result['error']}") from e
    except Exception as e:
        return {"success": False, "error": str(e)}


__all__ = ["BrowserFailureCategory", "ResourcePoolBridgeIntegration", "run_with_recovery"]
