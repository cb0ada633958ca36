"""The seed guide's client API, as a thin layer over the ResourcePool actor.

``ResourcePoolBridgeIntegration`` (the pool as the guide's examples hold it), ``ResourcePoolRecoveryManager``
(the guide's recovery manager: classification, the five strategies, statistics, performance advice) and
``run_with_recovery`` (the guide's function, unchanged in behaviour). Every decision stays where it
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

import collections
import inspect
import logging
import time
import uuid
from typing import Any

import orjson
import ray

from actors.decisions.recovery import FaultToleranceConfig, FaultToleranceLevel, RecoveryStrategy, classify
from actors.pool import PoolCore, ResourcePool
from events.codec import decode
from events.errors import BridgeNotReadyError, FailureCategory, InputError, NoBrowserAvailableError, WebpoolError
from events.history import PerformanceHistoryTracker
from events.schema import Recorded
from events.state import BrowserState, PoolState

log = logging.getLogger(__name__)

BrowserFailureCategory = FailureCategory          # the guide's name

# The guide's operation names -> the pool method that runs them.
OPERATIONS = {"inference": "infer", "infer": "infer", "generate": "generate"}
GENERATE_OPTIONS = frozenset({"max_new_tokens", "temperature", "top_p", "seed"})
OPERATION_STATUSES = ("completed", "failed")

# What the bridge needs from the pool actor beyond infer/generate/shutdown (checked at initialize, so a
# pool without them fails there with one clear error instead of deep inside a recovery).
REQUIRED_POOL_API = {
    "place": ("model_name",),
    "recover_browser": ("browser_id", "category", "detail", "strategy"),
    "get_state": (),
    "get_recovery_statistics": (),
    "recent_events": ("n",),
}


def missing_pool_api(cls: type = PoolCore) -> list[str]:
    """Methods (and parameters) of REQUIRED_POOL_API that ``cls`` lacks, as readable strings."""
    missing = []
    for name, params in REQUIRED_POOL_API.items():
        method = getattr(cls, name, None)
        if method is None:
            missing.append(f"{name}({', '.join(params)})")
            continue
        have = inspect.signature(method).parameters
        missing.extend(f"{name}(..., {p}=...)" for p in params if p not in have)
    return missing


def _check_str(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(field, f"must be a non-empty str, got {value!r}")
    return value


async def pool_call(ref: ray.ObjectRef) -> Any:
    """Await a pool call; a failure raises the pool's own typed error (BrowserFailure, InputError,
    NoBrowserAvailableError), whose message is one line, rather than Ray's wrapper around it, whose message
    is the remote traceback (kept as ``__cause__``)."""
    try:
        return await ref
    except ray.exceptions.RayTaskError as exc:
        if exc.cause is None:
            raise
        raise exc.cause from exc


async def run_pool_operation(pool: Any, model_name: str, operation: str, inputs: Any) -> dict[str, Any]:
    """Run one guide operation through the pool: "inference"/"infer" embeds ``inputs`` ({"text"} or
    {"texts"}); "generate" takes {"prompt", "max_new_tokens"?, "temperature"?, "top_p"?, "seed"?}.

    Returns the pool's result dict (it carries ``browser_id`` and ``metrics``). Bad input raises InputError.
    """
    method = OPERATIONS.get(operation) if isinstance(operation, str) else None
    if method is None:
        raise InputError("operation", f"must be one of {sorted(OPERATIONS)}, got {operation!r}")
    if method == "generate":
        if not isinstance(inputs, dict) or "prompt" not in inputs:
            raise InputError("inputs", 'generate needs a dict like {"prompt": "...", "max_new_tokens": 16}')
        unknown = set(inputs) - GENERATE_OPTIONS - {"prompt"}
        if unknown:
            raise InputError("inputs", f"unknown generate option(s) {sorted(unknown)}; known: "
                                       f"{sorted(GENERATE_OPTIONS | {'prompt'})}")
    if method == "infer":
        return await pool_call(pool.infer.remote(model_name, inputs))
    options = {k: v for k, v in inputs.items() if k != "prompt"}
    return await pool_call(pool.generate.remote(model_name, inputs["prompt"], **options))


class PoolBrowser:
    """One browser of the pool, as ``get_browser_for_model`` hands it out: ``await browser.call(op, request)``."""

    def __init__(self, pool: Any, browser_id: str, browser_type: str) -> None:
        self.pool = pool
        self.id = browser_id
        self.type = browser_type

    async def call(self, operation: str, request: dict[str, Any]) -> dict[str, Any]:
        """Run ``operation`` with ``request = {"model_name": ..., "inputs": ...}`` (see run_pool_operation).

        The pool serves it on the least busy browser holding the model, normally this one (module doc).
        """
        if not isinstance(request, dict) or set(request) != {"model_name", "inputs"}:
            raise InputError("request", 'must be a dict with exactly the keys "model_name" and "inputs"')
        return await run_pool_operation(self.pool, request["model_name"], operation, request["inputs"])

    def __repr__(self) -> str:
        return f"PoolBrowser(id={self.id!r}, type={self.type!r})"


def recorded_from_entry(entry: dict[str, Any]) -> Recorded:
    """A log_entry dict (events.codec.log_entry) back as the Recorded it was made from."""
    event = decode(entry["action"], orjson.dumps(entry["data"]))
    return Recorded(int(entry["seq"]), float(entry["timestamp"]), event)


class PoolHistoryTracker(PerformanceHistoryTracker):
    """The guide's ``performance_tracker``: a PerformanceHistoryTracker fed from the pool's event log.

    Each analysis first reads the events appended since the last one (``refresh``), so the figures are
    as of the call. It reads through the pool's ``recent_events`` (log_entry dicts), asking for more
    until the answer reaches back to the last event already seen.
    """

    FIRST_FETCH = 256

    def __init__(self, manager: ResourcePoolRecoveryManager, max_entries: int = 100_000,
                 logger: logging.Logger | None = None) -> None:
        super().__init__(max_entries=max_entries, logger=logger)
        self._manager = manager

    def refresh(self) -> int:
        """Fold in the events the log gained since the last refresh; returns how many operations finished."""
        pool = self._manager.connection_pool
        if pool is None:
            return 0
        n = self.FIRST_FETCH
        while True:
            entries = ray.get(pool.recent_events.remote(n))
            # Stop when the answer reaches back to what we have seen, or is the whole (kept) log.
            if not entries or entries[0]["seq"] <= self.last_seq + 1 or len(entries) < n:
                break
            n *= 4
        return self.observe_many(recorded_from_entry(e) for e in entries if e["seq"] > self.last_seq)

    def analyze_performance_trends(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.refresh()
        return super().analyze_performance_trends(*args, **kwargs)

    def recommend_browser_type(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.refresh()
        return super().recommend_browser_type(*args, **kwargs)

    def get_performance_recommendations(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.refresh()
        return super().get_performance_recommendations(*args, **kwargs)


class BrowserStateManager:
    """The guide's ``state_manager``: reads of the pool's projected state and transaction log (synchronous)."""

    def __init__(self, manager: ResourcePoolRecoveryManager, max_transactions: int = 1000) -> None:
        self._manager = manager
        self.max_transactions = max_transactions

    @property
    def state(self) -> PoolState:
        return ray.get(self._manager._require_pool().get_state.remote())

    def get_browser(self, browser_id: str) -> BrowserState | None:
        return self.state.browsers.get(browser_id)

    @property
    def transaction_log(self) -> list[dict[str, Any]]:
        """The newest ``max_transactions`` events, oldest first: {seq, timestamp, action, subject, data}."""
        return ray.get(self._manager._require_pool().recent_events.remote(self.max_transactions))


class ResourcePoolRecoveryManager:
    """The guide's recovery manager over a ResourcePool actor handle (``connection_pool``).

    Subclass it for a custom strategy as in the guide: override ``handle_browser_failure`` and call
    ``self._classify_browser_failure``, ``self._reconnect_recovery`` / ``_restart_recovery`` /
    ``_failover_recovery`` / ``_progressive_recovery`` / ``_parallel_recovery`` and ``self.logger``.
    Each strategy method is ``async (browser_id, failure_category) -> dict`` with the keys success, error,
    recovery_attempt, browser_id, browser_type, recovery_browser ({"id", "type"} or None), duration_ms,
    strategy, steps.
    """

    def __init__(self, connection_pool: Any = None, fault_tolerance_level: str = "medium",
                 recovery_strategy: str = "progressive", logger: logging.Logger | None = None) -> None:
        try:
            self._level = FaultToleranceLevel(fault_tolerance_level)
        except ValueError:
            raise InputError("fault_tolerance_level", f"must be one of {[v.value for v in FaultToleranceLevel]}, "
                                                      f"got {fault_tolerance_level!r}") from None
        try:
            self._strategy = RecoveryStrategy(recovery_strategy)
        except ValueError:
            raise InputError("recovery_strategy", f"must be one of {[v.value for v in RecoveryStrategy]}, "
                                                  f"got {recovery_strategy!r}") from None
        if logger is not None and not isinstance(logger, logging.Logger):
            raise InputError("logger", f"must be a logging.Logger, got {type(logger).__name__}")
        self.connection_pool = connection_pool
        self.fault_tolerance_level = self._level.value
        self.recovery_strategy = self._strategy.value
        self.logger = logger or log
        self.recovery_attempts = 0            # strategy calls made by this manager (the guide's counter)
        self.operations: dict[str, dict[str, Any]] = {}                         # tracked, not yet completed
        self.completed_operations: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self.performance_tracker = PoolHistoryTracker(self, logger=self.logger)
        self.state_manager = BrowserStateManager(self)
        self._last_error: dict[str, str] = {}
        self.initialized = False

    def _require_pool(self) -> Any:
        if self.connection_pool is None:
            raise BridgeNotReadyError("the recovery manager has no connection_pool (pass the pool's "
                                      "connection_pool, e.g. ResourcePoolBridgeIntegration.connection_pool)")
        return self.connection_pool

    async def initialize(self) -> None:
        """Check the pool answers (its log opens here) and offers what recovery needs."""
        pool = self._require_pool()
        missing = missing_pool_api()
        if missing:
            raise BridgeNotReadyError(f"ResourcePool lacks {', '.join(missing)}, which the guide's API needs")
        await pool.get_recovery_statistics.remote()
        self.initialized = True

    # ----- the guide's operation tracking (client side; the pool logs the real operations) -------
    async def track_operation(self, operation: str, model_name: str, browser_id: str, browser_type: str) -> str:
        """Start tracking an operation; returns its entry id for ``complete_operation``."""
        entry_id = uuid.uuid4().hex
        self.operations[entry_id] = {
            "entry_id": entry_id, "operation": _check_str("operation", operation),
            "model_name": _check_str("model_name", model_name), "browser_id": _check_str("browser_id", browser_id),
            "browser_type": _check_str("browser_type", browser_type), "started": time.time(),
            "status": "running", "metrics": {},
        }
        return entry_id

    async def complete_operation(self, entry_id: str, metrics: dict[str, Any], status: str) -> None:
        """Finish a tracked operation with ``status`` "completed" or "failed"."""
        if status not in OPERATION_STATUSES:
            raise InputError("status", f"must be one of {OPERATION_STATUSES}, got {status!r}")
        if not isinstance(metrics, dict):
            raise InputError("metrics", f"must be a dict, got {type(metrics).__name__}")
        entry = self.operations.pop(entry_id, None) if isinstance(entry_id, str) else None
        if entry is None:
            raise InputError("entry_id", f"{entry_id!r} is not a tracked, unfinished operation")
        entry.update(status=status, metrics=dict(metrics), finished=time.time())
        self.completed_operations.append(entry)

    # ----- failures and recovery ---------------------------------------------------------------
    def _classify_browser_failure(self, error: BaseException) -> FailureCategory:
        """The category the error really carries (BrowserFailure.category; a dead actor is CRASH, an
        unreachable one CONNECTION, a timeout TIMEOUT); anything else is UNKNOWN. No message parsing."""
        return classify(error, "").category

    async def handle_browser_failure(self, browser_id: str, error: BaseException) -> dict[str, Any]:
        """Classify ``error`` and recover ``browser_id`` by this manager's level and strategy.

        Bad input (InputError) is not a browser failure: nothing is recovered and the result says so.
        """
        category = self._classify_browser_failure(error)
        self.logger.warning("browser %s failed (%s): %s", browser_id, category.value, error)
        if isinstance(error, InputError):
            return await self._not_recovered(browser_id, f"not a browser failure (bad input): {error}")
        self._last_error[browser_id] = f"{type(error).__name__}: {error}"[:500]
        return await self._recover(browser_id, category)

    async def _recover(self, browser_id: str, failure_category: FailureCategory) -> dict[str, Any]:
        """Dispatch by level (none: report only; low: reconnect only) and then by strategy."""
        if self._level is FaultToleranceLevel.NONE:
            return await self._not_recovered(browser_id, "fault tolerance level is none: failures are reported, "
                                                         "not recovered")
        if self._level is FaultToleranceLevel.LOW:
            return await self._reconnect_recovery(browser_id, failure_category)
        method = {
            RecoveryStrategy.RECONNECT: self._reconnect_recovery,
            RecoveryStrategy.RESTART: self._restart_recovery,
            RecoveryStrategy.FAILOVER: self._failover_recovery,
            RecoveryStrategy.PROGRESSIVE: self._progressive_recovery,
            RecoveryStrategy.COORDINATED: self._progressive_recovery,
            RecoveryStrategy.PARALLEL: self._parallel_recovery,
        }[self._strategy]
        return await method(browser_id, failure_category)

    async def _reconnect_recovery(self, browser_id: str, failure_category: FailureCategory) -> dict[str, Any]:
        """Re-attach to the same browser; its page and models are kept."""
        return await self._pool_recovery(browser_id, failure_category, RecoveryStrategy.RECONNECT)

    async def _restart_recovery(self, browser_id: str, failure_category: FailureCategory) -> dict[str, Any]:
        """A new browser process under the same id; its models are loaded again (replayed from the log)."""
        return await self._pool_recovery(browser_id, failure_category, RecoveryStrategy.RESTART)

    async def _failover_recovery(self, browser_id: str, failure_category: FailureCategory) -> dict[str, Any]:
        """Another browser takes the failed one's models; the failed one is retired."""
        return await self._pool_recovery(browser_id, failure_category, RecoveryStrategy.FAILOVER)

    async def _parallel_recovery(self, browser_id: str, failure_category: FailureCategory) -> dict[str, Any]:
        """Reconnect, restart and failover at once in the pool; the first success wins."""
        return await self._pool_recovery(browser_id, failure_category, RecoveryStrategy.PARALLEL)

    async def _progressive_recovery(self, browser_id: str, failure_category: FailureCategory) -> dict[str, Any]:
        """The guide's progressive strategy, as the pool plans it (actors/decisions/recovery.py): reconnect
        (only for CONNECTION and TIMEOUT: a crashed page has nothing to reconnect to), then restart, then
        failover; with a warm standby up, failover before restart; a hang first resumed in place."""
        self.logger.info("Attempting progressive recovery for browser %s", browser_id)
        result = await self._pool_recovery(browser_id, failure_category, RecoveryStrategy.PROGRESSIVE)
        if result["success"] and result["steps"]:
            # As in the guide, a progressive recovery answers as the strategy that worked; a resume kept the
            # same browser and page, which is the guide's reconnect (``steps`` says which it was).
            last = result["steps"][-1]
            result["strategy"] = "reconnect" if last == "resume" else last
        return result

    async def _pool_recovery(self, browser_id: str, failure_category: FailureCategory,
                             strategy: RecoveryStrategy) -> dict[str, Any]:
        """One recovery in the pool with ``strategy``; the pool records it (RecoveryStarted..Completed)."""
        pool = self._require_pool()
        category = FailureCategory(failure_category)
        self.recovery_attempts += 1
        attempt = self.recovery_attempts
        detail = self._last_error.get(browser_id, "reported to the recovery manager")
        outcome = await pool_call(pool.recover_browser.remote(browser_id, category.value, detail,
                                                              strategy=strategy.value))
        types = await self._browser_types()
        serving = outcome["recovery_browser"]
        if outcome["success"]:
            self.logger.info("browser %s recovered by %s (%s) in %.0f ms", browser_id, strategy.value,
                             ", ".join(outcome["steps"]) or "already replaced", outcome["duration_ms"])
        return {
            "success": bool(outcome["success"]),
            "error": outcome["error"],
            "recovery_attempt": attempt,
            "browser_id": browser_id,
            "browser_type": types.get(browser_id, "unknown"),
            "recovery_browser": None if serving is None else {"id": serving, "type": types.get(serving, "unknown")},
            "duration_ms": outcome["duration_ms"],
            "strategy": strategy.value,
            "steps": list(outcome["steps"]),
        }

    async def _not_recovered(self, browser_id: str, error: str, duration_ms: float = 0.0,
                             strategy: str | None = None) -> dict[str, Any]:
        types = await self._browser_types()
        return {"success": False, "error": error, "recovery_attempt": self.recovery_attempts,
                "browser_id": browser_id, "browser_type": types.get(browser_id, "unknown"),
                "recovery_browser": None, "duration_ms": duration_ms, "strategy": strategy, "steps": []}

    async def _browser_types(self) -> dict[str, str]:
        state = await self._require_pool().get_state.remote()
        return {b.browser_id: b.browser_type for b in state.browsers.values()}

    async def recover_operation(self, model_name: str, operation: str, inputs: Any) -> dict[str, Any]:
        """Run the operation again after a recovery: {"success", "result", "recovery_browser", "metrics", "error"}.

        A failure here is reported in the result (as the guide's run_with_recovery expects), not raised.
        """
        failed = {"success": False, "result": None, "recovery_browser": None, "metrics": {}}
        if self._level is FaultToleranceLevel.NONE:
            return failed | {"error": "fault tolerance level is none: operations are not recovered"}
        pool = self._require_pool()
        t0 = time.perf_counter()
        try:
            result = await run_pool_operation(pool, model_name, operation, inputs)
        except Exception as exc:   # the guide's contract: success False with the error, never a raise
            self.logger.error("recovering %s on %s failed: %s", operation, model_name, exc)
            return failed | {"error": f"{type(exc).__name__}: {exc}"}
        metrics = {"duration_ms": (time.perf_counter() - t0) * 1000} | dict(result.get("metrics", {}))
        serving = result.get("browser_id")
        types = await self._browser_types()
        return {"success": True, "result": result, "metrics": metrics, "error": None,
                "recovery_browser": None if serving is None else {"id": serving, "type": types.get(serving, "unknown")}}

    # ----- monitoring (synchronous, as in the guide) ----------------------------------------------
    def get_recovery_statistics(self) -> dict[str, Any]:
        """recovery_attempts / recovery_successes / recovery_failures / success_rate / active_browsers /
        total_browsers, from the pool's log (every recovery the pool made, also transparent ones)."""
        return ray.get(self._require_pool().get_recovery_statistics.remote())

    def get_performance_recommendations(self) -> dict[str, Any]:
        """The guide's {"recommendations": {key: {"description", "recommendation"}}} from the pool's history."""
        return self.performance_tracker.get_performance_recommendations(
            fault_tolerance_level=self.fault_tolerance_level)


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


__all__ = [
    "BridgeNotReadyError",
    "BrowserFailureCategory",
    "BrowserStateManager",
    "PoolBrowser",
    "PoolHistoryTracker",
    "ResourcePoolBridgeIntegration",
    "ResourcePoolRecoveryManager",
    "pool_call",
    "run_pool_operation",
    "run_with_recovery",
]
