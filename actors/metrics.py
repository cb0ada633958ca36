"""Prometheus metrics of a pool, through Ray's metrics agent (``ray.util.metrics``).

Every metric is derived from an event the pool has just applied (``observe``), so the numbers a
Prometheus server scrapes from each node's metrics export port tell the same story as the log:
requests by model and outcome, request latency, browser failures by category, recoveries by strategy
and outcome, requests refused as busy, hedged requests (sent, won), outside requests blocked, the
live browsers, and the WebAssembly threads each live browser's page computes with.
Ray exports them with its ``ray_`` prefix (e.g. ``ray_webpool_requests_total``).

The gauges are different from the counters: Ray's metrics agent drops a gauge value that has not been set
for two report intervals (20 s at Ray's default ``metrics_report_interval_ms``; docs/facts.md), so the live
browsers would vanish from the export of an idle pool. The pool's loop sets them again every report interval
(``refresh``, ``refresh_interval_s``); a browser that is gone is not set again, and leaves the export.
"""

from __future__ import annotations

import logging

from events import schema as ev
from events.state import PoolState, browsers_alive

log = logging.getLogger(__name__)

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000]


class PoolMetrics:
    """The pool's metrics; ``observe`` is called with each applied record and the states around it."""

    def __init__(self, pool_name: str) -> None:
        from ray.util import metrics

        self.tags = {"pool": pool_name}
        self.requests = metrics.Counter(
            "webpool_requests", "Requests by model and outcome (completed, failed, busy).",
            tag_keys=("pool", "model", "outcome"))
        self.latency = metrics.Histogram(
            "webpool_request_latency_ms", "Time a browser took to answer an operation, in ms.",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("pool", "model"))
        self.browser_failures = metrics.Counter(
            "webpool_browser_failures", "Browser failures by category.", tag_keys=("pool", "category"))
        self.recoveries = metrics.Counter(
            "webpool_recoveries", "Finished recoveries by strategy and outcome.",
            tag_keys=("pool", "strategy", "outcome"))
        self.hedges = metrics.Counter(
            "webpool_hedges", "Hedged requests by model and event (sent; won: the copy answered first).",
            tag_keys=("pool", "model", "event"))
        self.blocked = metrics.Counter(
            "webpool_page_requests_blocked", "Outside requests a page attempted and was refused.", tag_keys=("pool",))
        self.browsers = metrics.Gauge(
            "webpool_active_browsers", "Live browsers (serving and standby).", tag_keys=("pool",))
        self.wasm_threads = metrics.Gauge(
            "webpool_wasm_threads", "WebAssembly threads a live browser's page computes with.",
            tag_keys=("pool", "browser"))

    def refresh(self, state: PoolState) -> None:
        """Set the gauges again with what ``state`` says, so that an idle pool's values stay exported."""
        alive = browsers_alive(state)
        self.browsers.set(len(alive), self.tags)
        for b in alive:
            if b.wasm_threads:                   # 0: launched before the log recorded it
                self.wasm_threads.set(b.wasm_threads, {**self.tags, "browser": b.browser_id})

    def observe(self, before: PoolState, rec: ev.Recorded, after: PoolState) -> None:
        e = rec.event
        tags = self.tags
        if isinstance(e, ev.OperationCompleted | ev.OperationFailed):
            op = before.operations.get(e.op_id)
            if op is None or op.kind not in ("infer", "generate"):
                return
            completed = isinstance(e, ev.OperationCompleted)
            self.requests.inc(1, {**tags, "model": op.model, "outcome": "completed" if completed else "failed"})
            if completed:
                self.latency.observe(e.duration_ms, {**tags, "model": op.model})
        elif isinstance(e, ev.RequestRejected):
            self.requests.inc(1, {**tags, "model": e.model, "outcome": e.reason})
        elif isinstance(e, ev.BrowserFailed):
            self.browser_failures.inc(1, {**tags, "category": e.category.value})
        elif isinstance(e, ev.RecoveryCompleted):
            started = before.recoveries.get(e.recovery_id)
            strategy = started.strategy if started is not None else "unknown"
            self.recoveries.inc(1, {**tags, "strategy": strategy, "outcome": "success" if e.success else "failure"})
        elif isinstance(e, ev.HedgeSent):
            self.hedges.inc(1, {**tags, "model": e.model, "event": "sent"})
        elif isinstance(e, ev.HedgeWon):
            self.hedges.inc(1, {**tags, "model": e.model, "event": "won"})
        elif isinstance(e, ev.PageRequestsBlocked):
            self.blocked.inc(e.count, tags)
        if isinstance(e, ev.BrowserLaunched | ev.BrowserRetired | ev.BrowserFailed | ev.BrowserQuarantined
                      | ev.BrowserConnected):
            self.refresh(after)


def refresh_interval_s() -> float:
    """Ray's metrics report interval as this process sees it (at least 1 s, as Ray floors it): setting the
    gauges this often keeps them inside the agent's two-interval retention."""
    try:
        import ray

        return max(ray._config.metrics_report_interval_ms(), 1000) / 1000.0
    except Exception:              # a Ray without that (private) accessor: its documented default
        return 10.0
