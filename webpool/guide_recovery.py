"""The guide's recovery manager over the pool actor: ``ResourcePoolRecoveryManager`` (classification, the five
strategies, statistics, performance advice), its ``BrowserStateManager`` and its history tracker, all read
from the pool's log (webpool/guide.py says where this differs from the guide, and why)."""

from __future__ import annotations

import collections
import logging
import time
import uuid
from typing import Any

import orjson
import ray

from actors.decisions.recovery import FaultToleranceLevel, RecoveryStrategy, classify
from events.codec import decode
from events.errors import BridgeNotReadyError, FailureCategory, InputError
from events.history import PerformanceHistoryTracker
from events.schema import Recorded
from events.state import BrowserState, PoolState
from webpool.guide_calls import OPERATION_STATUSES, _check_str, missing_pool_api, pool_call, run_pool_operation

log = logging.getLogger(__name__)


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
