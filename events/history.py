"""Performance history: a projection of operation events into an Arrow table, with trend analysis.

``PerformanceHistoryTracker`` is fed recorded events (``observe`` / ``observe_many``). Each finished
operation (OperationStarted followed by OperationCompleted or OperationFailed) becomes one row, keyed by
its ``op_id``. The "browser type" of a row is ``f"{browser_type}/{backend}"`` (e.g. ``chromium/wasm``):
the browser type comes from the browser's latest BrowserLaunched, the backend from the ModelLoaded of
that model on that browser, both as known when the operation started.

Columns and analyses: events/performance.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from events.performance import (
    COMPLETED,
    FAILED,
    LEVELS,
    SCHEMA,
    UNKNOWN,
    HistoryInputError,
    analyze_trends,
    check_count,
    check_fraction,
    check_table,
    performance_recommendations,
    recommend_browser,
)
from events.schema import (
    BrowserLaunched,
    ModelLoaded,
    OperationCompleted,
    OperationFailed,
    OperationStarted,
    PoolConfigured,
    Recorded,
)

_BUFFER_ROWS = 8192        # rows gathered in Python lists before they become an Arrow batch
_MAX_CHUNKS = 32           # chunks allowed before the table is combined (keeps compute kernels fast)


class PerformanceHistoryTracker:
    """Keeps the last ``max_entries`` finished operations from the event log as an Arrow table.

    Feed it records in log order; records with a seq not above the last one seen are ignored (so
    replaying an overlapping range is harmless). Event kinds other than BrowserLaunched, ModelLoaded and
    the three operation kinds are ignored. An operation finishing without a known start, or starting
    under an op_id already kept, changes nothing but ``anomalies``.
    """

    def __init__(self, max_entries: int = 100_000, logger: logging.Logger | None = None,
                 min_relative_change: float = 0.10) -> None:
        self.max_entries = check_count("max_entries", max_entries)
        self.min_relative_change = check_fraction("min_relative_change", min_relative_change)
        self.log = logger or logging.getLogger(__name__)
        self.last_seq = 0
        self.anomalies: dict[str, int] = {}
        # The pool's fault-tolerance level as its log last recorded it (PoolConfigured); None before any.
        self.fault_tolerance_level: str | None = None
        self._browser_type: dict[str, str] = {}            # browser_id -> browser type of its latest launch
        self._backends: dict[str, dict[str, str]] = {}     # browser_id -> model -> backend
        self._pending: dict[str, tuple] = {}               # op_id -> (started_ts, model, browser_id, type, kind)
        self._ids: set[str] = set()                        # op_ids of kept rows (table + buffer)
        self._table = SCHEMA.empty_table()
        self._buf: dict[str, list] = {f.name: [] for f in SCHEMA}

    @classmethod
    def from_table(cls, table: pa.Table, max_entries: int | None = None, logger: logging.Logger | None = None,
                   min_relative_change: float = 0.10) -> PerformanceHistoryTracker:
        """A tracker holding ``table``'s rows (e.g. kept from an earlier run); op_ids must be unique."""
        check_table(table)
        ids = table.column("op_id").to_pylist()
        unique = set(ids)
        if len(unique) != len(ids) or None in unique:
            raise HistoryInputError("history table op_id column has nulls or duplicates")
        completed = pc.equal(table.column("status"), COMPLETED)
        bad = pc.sum(pc.or_kleene(
            pc.invert(pc.is_in(table.column("status"), pa.array([COMPLETED, FAILED]))),
            pc.not_equal(completed, pc.is_valid(table.column("duration_ms"))))).as_py()
        if bad:
            raise HistoryInputError(f"history table has {bad} rows whose status is not completed/failed, or whose "
                                    "duration_ms is missing on a completed or present on a failed operation")
        if max_entries is None:
            max_entries = max(table.num_rows, 1)
        tracker = cls(max_entries, logger, min_relative_change)
        tracker._table = table.combine_chunks()
        tracker._ids = unique
        if table.num_rows:
            tracker.last_seq = int(pc.max(table.column("seq")).as_py())
        tracker._cap()
        return tracker

    # ----- feeding ------------------------------------------------------------------------------
    def observe(self, recorded: Recorded) -> bool:
        """Fold one record in; True when it finished an operation (a row was added)."""
        if not isinstance(recorded, Recorded):
            raise HistoryInputError(f"expected a Recorded event, got {type(recorded).__name__}")
        if recorded.seq <= self.last_seq:
            return False
        self.last_seq = recorded.seq
        e = recorded.event
        if isinstance(e, OperationCompleted):
            return self._finish(recorded, e.op_id, COMPLETED, e.duration_ms, None)
        if isinstance(e, OperationFailed):
            return self._finish(recorded, e.op_id, FAILED, None, e.category.value)
        if isinstance(e, OperationStarted):
            if e.op_id in self._pending or e.op_id in self._ids:
                self._anomaly("duplicate_start", e.op_id)
                return False
            if e.browser_id not in self._browser_type:
                self._anomaly("unknown_browser", e.op_id)
            kind = self._browser_type.get(e.browser_id, UNKNOWN)
            backends = self._backends.get(e.browser_id, {})
            backend = backends.get(e.model)
            if backend is None:
                distinct = set(backends.values())
                backend = distinct.pop() if len(distinct) == 1 else UNKNOWN
            self._pending[e.op_id] = (recorded.ts, e.model, e.browser_id, f"{kind}/{backend}", e.kind)
            if len(self._pending) > self.max_entries:      # starts that never finish must not pile up
                self._pending.pop(next(iter(self._pending)))
                self._anomaly("pending_dropped", "")
        elif isinstance(e, BrowserLaunched):
            self._browser_type[e.browser_id] = e.browser_type
            self._backends[e.browser_id] = {}              # a fresh process holds no models
        elif isinstance(e, ModelLoaded):
            self._backends.setdefault(e.browser_id, {})[e.model] = e.backend
        elif isinstance(e, PoolConfigured):
            self.fault_tolerance_level = e.level if e.level in LEVELS else None
        return False

    def observe_many(self, records: Iterable[Recorded]) -> int:
        """Fold records in order; returns how many operations they finished."""
        return sum(self.observe(r) for r in records)

    def _anomaly(self, what: str, op_id: str) -> None:
        self.anomalies[what] = self.anomalies.get(what, 0) + 1
        self.log.debug("history anomaly %s (op %s)", what, op_id)

    def _finish(self, rec: Recorded, op_id: str, status: str, duration: float | None, category: str | None) -> bool:
        start = self._pending.pop(op_id, None)
        if start is None:
            self._anomaly("finish_without_start", op_id)
            return False
        started_ts, model, browser_id, btype, kind = start
        b = self._buf
        for name, value in (("op_id", op_id), ("seq", rec.seq), ("ts", rec.ts), ("started_ts", started_ts),
                            ("model", model), ("browser_id", browser_id), ("browser_type", btype),
                            ("operation_type", kind), ("status", status), ("duration_ms", duration),
                            ("failure_category", category)):
            b[name].append(value)
        self._ids.add(op_id)
        if len(b["op_id"]) >= min(_BUFFER_ROWS, self.max_entries):
            self._flush()
        return True

    def _flush(self) -> None:
        if self._buf["op_id"]:
            batch = pa.table({f.name: pa.array(self._buf[f.name], f.type) for f in SCHEMA}, schema=SCHEMA)
            self._buf = {f.name: [] for f in SCHEMA}
            self._table = pa.concat_tables([self._table, batch])
        self._cap()
        if self._table.column("op_id").num_chunks > _MAX_CHUNKS:
            self._table = self._table.combine_chunks()

    def _cap(self) -> None:
        excess = self._table.num_rows - self.max_entries
        if excess > 0:
            self._ids.difference_update(self._table.column("op_id").slice(0, excess).to_pylist())
            self._table = self._table.slice(excess)
            self.log.debug("history capped at %d entries (%d oldest dropped)", self.max_entries, excess)

    # ----- reading ------------------------------------------------------------------------------
    @property
    def table(self) -> pa.Table:
        """The kept rows, oldest first (an immutable Arrow table)."""
        self._flush()
        return self._table

    def __len__(self) -> int:
        return min(self._table.num_rows + len(self._buf["op_id"]), self.max_entries)

    @property
    def pending(self) -> int:
        """Operations started but not yet finished."""
        return len(self._pending)

    def analyze_performance_trends(self, model_name: str | None = None, browser_type: str | None = None,
                                   operation_type: str | None = None, time_window_seconds: float | None = 3600,
                                   now: float | None = None, browser_id: str | None = None) -> dict[str, Any]:
        """See ``analyze_trends``."""
        return analyze_trends(self.table, model_name=model_name, browser_type=browser_type,
                              operation_type=operation_type, browser_id=browser_id,
                              time_window_seconds=time_window_seconds, now=now,
                              min_relative_change=self.min_relative_change)

    def recommend_browser_type(self, model_name: str, time_window_seconds: float | None = 3600,
                               now: float | None = None, recent_entries: int = 50,
                               min_samples: int = 5) -> dict[str, Any]:
        """See ``recommend_browser``."""
        return recommend_browser(self.table, model_name, time_window_seconds=time_window_seconds, now=now,
                                 recent_entries=recent_entries, min_samples=min_samples)

    def get_performance_recommendations(self, fault_tolerance_level: str | None = None,
                                        time_window_seconds: float | None = 3600,
                                        now: float | None = None) -> dict[str, Any]:
        """See ``performance_recommendations``; the level defaults to the one the log recorded."""
        level = fault_tolerance_level if fault_tolerance_level is not None else self.fault_tolerance_level
        return performance_recommendations(self.table, fault_tolerance_level=level,
                                           time_window_seconds=time_window_seconds, now=now,
                                           min_relative_change=self.min_relative_change)


__all__ = ["PerformanceHistoryTracker"]
