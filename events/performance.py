"""Performance analyses over a history table (pure): trends per model and browser type, the browser type
to prefer for a model, and recommendations, each a function of the table, a window and ``now``.

A history table has one row per finished operation, oldest first (events/history.py folds the log into it).
Columns of ``tracker.table`` (one row per finished operation, oldest first):
  op_id, seq (of the finishing record), ts (unix s, when it finished), started_ts, model, browser_id,
  browser_type, operation_type, status ("completed" | "failed"), duration_ms (null when failed),
  failure_category (null when completed).



Trends use the test in events/trends.py.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from events.errors import EventError, FailureCategory
from events.trends import Trend, linear_trend

LEVELS = ("none", "low", "medium", "high", "critical")
COMPLETED = "completed"
FAILED = "failed"
UNKNOWN = "unknown"

SCHEMA = pa.schema([
    ("op_id", pa.string()),
    ("seq", pa.int64()),
    ("ts", pa.float64()),
    ("started_ts", pa.float64()),
    ("model", pa.string()),
    ("browser_id", pa.string()),
    ("browser_type", pa.string()),
    ("operation_type", pa.string()),
    ("status", pa.string()),
    ("duration_ms", pa.float64()),
    ("failure_category", pa.string()),
])


_RECENT = 10               # the guide's recent / oldest segment length


class HistoryInputError(EventError, ValueError):
    """A history query or input was malformed (wrong type, non-positive window, unknown level, ...)."""


# --------------------------------------------------------------------------------------------------
# argument checks


def _check_opt_str(name: str, v: Any) -> str | None:
    if v is not None and type(v) is not str:
        raise HistoryInputError(f"{name} must be a str or None, got {type(v).__name__}")
    return v


def _check_window(v: Any) -> float | None:
    if v is None:
        return None
    if type(v) not in (int, float) or not (0 < v < math.inf):
        raise HistoryInputError(f"time_window_seconds must be a finite number > 0 or None, got {v!r}")
    return float(v)


def _check_now(v: Any) -> float:
    if v is None:
        return time.time()
    if type(v) not in (int, float) or not math.isfinite(v):
        raise HistoryInputError(f"now must be a finite number (unix seconds) or None, got {v!r}")
    return float(v)


def check_fraction(name: str, v: Any) -> float:
    if type(v) not in (int, float) or not (0 <= v < math.inf):
        raise HistoryInputError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def check_count(name: str, v: Any, minimum: int = 1) -> int:
    if type(v) is not int or v < minimum:
        raise HistoryInputError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def _check_level(v: Any) -> str | None:
    if v is not None and v not in LEVELS:
        raise HistoryInputError(f"fault_tolerance_level must be one of {', '.join(LEVELS)} or None, got {v!r}")
    return v


def check_table(table: Any) -> pa.Table:
    if not isinstance(table, pa.Table):
        raise HistoryInputError(f"expected a pyarrow.Table, got {type(table).__name__}")
    if not table.schema.equals(SCHEMA):
        raise HistoryInputError(f"history table schema differs from events.performance.SCHEMA: {table.schema}")
    return table


# --------------------------------------------------------------------------------------------------
# selecting rows


@dataclasses.dataclass(frozen=True)
class _Frame:
    """Rows of a table selected by a query, sorted by finish time, with numpy views of the numbers."""

    table: pa.Table
    ts: np.ndarray        # float64, sorted
    dur: np.ndarray       # float64, NaN where the operation failed
    ok: np.ndarray        # bool, completed

    def codes(self, column: str) -> tuple[np.ndarray, list[str]]:
        """Integer codes (-1 for null) and their labels, for grouping by a string column."""
        col = self.table.column(column)
        arr = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
        enc = arr.dictionary_encode()
        codes = pc.fill_null(enc.indices, -1).to_numpy()
        return codes, enc.dictionary.to_pylist()


def _select(table: pa.Table, columns: list[str], *, now: float, window: float | None,
            filters: Mapping[str, str | None]) -> _Frame | None:
    ts_col = table.column("ts")
    mask = pc.less_equal(ts_col, now)
    if window is not None:
        mask = pc.and_(mask, pc.greater_equal(ts_col, now - window))
    for name, value in filters.items():
        if value is not None:
            mask = pc.and_(mask, pc.equal(table.column(name), value))
    sub = table.select(columns)
    if not pc.all(mask).as_py():        # filtering copies every column: skip it when all rows match
        sub = sub.filter(mask)
    if sub.num_rows == 0:
        return None
    sub = sub.combine_chunks()
    ts = sub.column("ts").to_numpy()
    if len(ts) > 1 and not bool(np.all(ts[1:] >= ts[:-1])):
        # Rows are kept in finish order, which is time order unless the clock stepped back.
        order = np.argsort(ts, kind="stable")
        sub = sub.take(pa.array(order))
        ts = ts[order]
    dur = sub.column("duration_ms").to_numpy()
    # A row has a duration exactly when it completed (observe and from_table keep that invariant),
    # so success comes from the numbers without touching the status strings.
    return _Frame(sub, ts, dur, ~np.isnan(dur))


def _duration_stats(ts: np.ndarray, d: np.ndarray, min_relative_change: float) -> dict[str, Any]:
    if len(d) == 0:
        return {"avg_duration_ms": None, "min_duration_ms": None, "max_duration_ms": None,
                "trend_direction": "stable", "trend_magnitude": 0.0, "improvement_rate": 0.0,
                "avg_recent_duration_ms": None, "avg_oldest_duration_ms": None,
                "p50_duration_ms": None, "p95_duration_ms": None}
    trend = linear_trend(ts, d, min_relative_change)
    avg = float(d.mean())
    if len(d) >= _RECENT:
        recent = float(d[-_RECENT:].mean())
        oldest = float(d[:_RECENT].mean())
        improvement = (oldest - recent) / oldest if oldest > 0 else 0.0
    else:
        recent = oldest = avg
        improvement = 0.0
    p50, p95 = np.percentile(d, [50, 95])
    return {"avg_duration_ms": avg, "min_duration_ms": float(d.min()), "max_duration_ms": float(d.max()),
            "trend_direction": trend.direction, "trend_magnitude": abs(trend.relative_change),
            "improvement_rate": improvement, "avg_recent_duration_ms": recent, "avg_oldest_duration_ms": oldest,
            "p50_duration_ms": float(p50), "p95_duration_ms": float(p95)}


# --------------------------------------------------------------------------------------------------
# pure analyses over a history table


def analyze_trends(table: pa.Table, *, model_name: str | None = None, browser_type: str | None = None,
                   operation_type: str | None = None, browser_id: str | None = None,
                   time_window_seconds: float | None = 3600, now: float | None = None,
                   min_relative_change: float = 0.10) -> dict[str, Any]:
    """The guide's ``analyze_performance_trends`` over ``table`` (see the module doc for each key)."""
    check_table(table)
    filters = {"model": _check_opt_str("model_name", model_name),
               "browser_type": _check_opt_str("browser_type", browser_type),
               "operation_type": _check_opt_str("operation_type", operation_type),
               "browser_id": _check_opt_str("browser_id", browser_id)}
    window = _check_window(time_window_seconds)
    t_now = _check_now(now)
    min_rel = check_fraction("min_relative_change", min_relative_change)
    frame = _select(table, ["ts", "duration_ms"], now=t_now, window=window, filters=filters)
    if frame is None:
        return {"error": "No data available for the specified filters"}
    n = len(frame.ts)
    n_ok = int(frame.ok.sum())
    stats = _duration_stats(frame.ts[frame.ok], frame.dur[frame.ok], min_rel)
    return {
        "entries_analyzed": n,
        "time_window_seconds": time_window_seconds,
        "avg_duration_ms": stats["avg_duration_ms"],
        "min_duration_ms": stats["min_duration_ms"],
        "max_duration_ms": stats["max_duration_ms"],
        "success_rate": n_ok / n,
        "trend_direction": stats["trend_direction"],
        "trend_magnitude": stats["trend_magnitude"],
        "improvement_rate": stats["improvement_rate"],
        "avg_recent_duration_ms": stats["avg_recent_duration_ms"],
        "avg_oldest_duration_ms": stats["avg_oldest_duration_ms"],
        "p50_duration_ms": stats["p50_duration_ms"],
        "p95_duration_ms": stats["p95_duration_ms"],
    }


def _candidates(frame: _Frame, types: tuple[np.ndarray, list[str]], rows: np.ndarray, recent_entries: int,
                min_samples: int) -> dict[str, dict[str, Any]]:
    """Per browser type (``types`` = frame.codes("browser_type")), over its last ``recent_entries``
    operations among ``rows`` (time-ordered indices into the frame)."""
    codes, labels = types
    out: dict[str, dict[str, Any]] = {}
    sub_codes = codes[rows]
    for code in np.unique(sub_codes):
        idx = rows[sub_codes == code][-recent_entries:]     # rows are time-ordered
        ok = frame.ok[idx]
        durations = frame.dur[idx][ok]
        success = float(ok.mean())
        p50 = float(np.median(durations)) if len(durations) else None
        # Expected time per successful answer if failures are retried: p50 / success (geometric retries).
        cost = p50 / success if p50 is not None and success > 0 else math.inf
        out[labels[code]] = {"entries": len(idx), "completed": int(ok.sum()), "success_rate": success,
                             "recent_p50_ms": p50, "expected_ms_per_success": cost,
                             "eligible": len(idx) >= min_samples and success > 0}
    return out


def _best(cands: Mapping[str, Mapping[str, Any]]) -> str | None:
    eligible = [(c["expected_ms_per_success"], bt) for bt, c in cands.items() if c["eligible"]]
    return min(eligible)[1] if eligible else None


def _describe(bt: str, c: Mapping[str, Any]) -> str:
    p50 = "n/a" if c["recent_p50_ms"] is None else f"{c['recent_p50_ms']:.1f} ms"
    return f"{bt}: p50 {p50} at {c['success_rate']:.0%} success over its last {c['entries']} ops"


def recommend_browser(table: pa.Table, model_name: str, *, time_window_seconds: float | None = 3600,
                      now: float | None = None, recent_entries: int = 50, min_samples: int = 5) -> dict[str, Any]:
    """The browser type (browser/backend) with the lowest expected time per successful answer for a model.

    Score per candidate over its last ``recent_entries`` operations in the window:
    ``recent_p50_ms / success_rate`` (lower is better). Candidates with fewer than ``min_samples``
    operations, or with no success, are listed but not chosen.
    """
    check_table(table)
    if type(model_name) is not str:
        raise HistoryInputError(f"model_name must be a str, got {type(model_name).__name__}")
    window = _check_window(time_window_seconds)
    t_now = _check_now(now)
    recent_entries = check_count("recent_entries", recent_entries)
    min_samples = check_count("min_samples", min_samples)
    frame = _select(table, ["ts", "duration_ms", "browser_type"], now=t_now, window=window,
                    filters={"model": model_name})
    if frame is None:
        span = "ever" if window is None else f"in the last {window:g} s"
        return {"browser_type": None, "reason": f"no operations recorded for model {model_name!r} {span}",
                "candidates": {}}
    cands = _candidates(frame, frame.codes("browser_type"), np.arange(len(frame.ts)), recent_entries, min_samples)
    best = _best(cands)
    if best is None:
        return {"browser_type": None, "candidates": cands,
                "reason": f"no browser type has >= {min_samples} recent operations with some success for "
                          f"{model_name!r}: " + "; ".join(_describe(bt, c) for bt, c in cands.items())}
    others = [_describe(bt, c) for bt, c in sorted(cands.items()) if bt != best]
    reason = f"best recent latency x success for {model_name!r}: {_describe(best, cands[best])}"
    if others:
        reason += "; vs " + "; ".join(others)
    return {"browser_type": best, "reason": reason, "candidates": cands}


# Failure categories that mean the page or browser is gone (state must be rebuilt), vs a lost connection.
_LOST = (FailureCategory.CRASH.value, FailureCategory.MEMORY.value, FailureCategory.DEVICE_LOST.value,
         FailureCategory.TIMEOUT.value)

def _sentence(text: str) -> str:
    """First letter up, the rest as written (str.capitalize would turn "WebGPU" into "webgpu")."""
    return text[:1].upper() + text[1:]


_CATEGORY_ADVICE = {
    "crash": "use the restart or progressive strategy (state is replayed onto a new page), keep a warm standby "
             "for hot models, and check browser memory around the crashes",
    "memory": "load fewer models per browser, shard large models across more browsers, or add browsers",
    "timeout": "check for hung pages (terminateExecution) and whether the timeout budget fits the model; "
               "move the model to a faster backend",
    "connection": "use the reconnect or progressive strategy; the page state survives a reconnect",
    "device_lost": "recreate the WebGPU device on device.lost, or fall back to the wasm backend",
    "unknown": "read the OperationFailed errors in the event log to classify these failures",
}


def fault_tolerance_advice(level: str | None, total_ops: int, failures: Mapping[str, int],
                           min_failures: int = 3, high_rate: float = 0.05) -> tuple[str, str, str] | None:
    """Suggest a higher fault-tolerance level when failures call for it: (suggested, description, advice).

    - crash / memory / device_lost / timeout (the page or browser must be rebuilt): >= ``min_failures``
      of them need recovery with state replay, level "medium"; when they are >= ``high_rate`` of all
      operations, warm standbys pay off: "high".
    - only connection failures (>= ``min_failures``): reconnecting suffices: "low".
    Returns None when the current level already covers it (``level`` None = unknown, always advise).
    """
    _check_level(level)
    lost = sum(failures.get(c, 0) for c in _LOST)
    conn = failures.get(FailureCategory.CONNECTION.value, 0)
    if lost >= min_failures:
        rate = lost / total_ops if total_ops else 1.0
        suggested = "high" if rate >= high_rate else "medium"
        why = (f"{lost} operations failed because the page or browser was lost (crash/memory/device_lost/timeout), "
               f"{rate:.1%} of {total_ops}")
    elif conn >= min_failures:
        suggested = "low"
        why = f"{conn} operations failed on a lost connection"
    else:
        return None
    if level is not None and LEVELS.index(level) >= LEVELS.index(suggested):
        return None
    current = "unknown" if level is None else level
    advice = {
        "low": "reconnect attempts recover these without losing page state",
        "medium": "a durable log and recovery by strategy rebuild the lost state on a replacement browser",
        "high": "recovery with state replay plus warm standby browsers holding the hot models keeps failover fast",
    }[suggested]
    return suggested, f"{why}; fault-tolerance level is {current}", \
        f"Raise the fault-tolerance level to {suggested}: {advice}"


def performance_recommendations(table: pa.Table, *, fault_tolerance_level: str | None = None,
                                time_window_seconds: float | None = 3600, now: float | None = None,
                                min_samples: int = 5, recent_entries: int = 50, min_failures: int = 3,
                                min_relative_change: float = 0.10, min_advantage: float = 0.10) -> dict[str, Any]:
    """The guide's ``{"recommendations": {key: {"description", "recommendation"}}}`` over ``table``.

    Keys: ``degrading_model:<model>`` (a model's trend is "degrading"; names the browser types and
    browsers whose own trend degrades), ``browser_type:<model>`` (two or more eligible browser types
    and the best is at least ``min_advantage`` cheaper than the next), ``failure_pattern:<category>``
    (>= ``min_failures`` failures of that category), ``fault_tolerance_level`` (see
    ``fault_tolerance_advice``).
    """
    check_table(table)
    level = _check_level(fault_tolerance_level)
    window = _check_window(time_window_seconds)
    t_now = _check_now(now)
    min_samples = check_count("min_samples", min_samples)
    recent_entries = check_count("recent_entries", recent_entries)
    min_failures = check_count("min_failures", min_failures)
    min_rel = check_fraction("min_relative_change", min_relative_change)
    min_adv = check_fraction("min_advantage", min_advantage)
    recs: dict[str, dict[str, str]] = {}
    frame = _select(table, ["ts", "duration_ms", "model", "browser_type", "browser_id",
                            "failure_category"], now=t_now, window=window, filters={})
    if frame is None:
        return {"recommendations": recs}
    models, model_labels = frame.codes("model")
    types, type_labels = frame.codes("browser_type")
    bids, bid_labels = frame.codes("browser_id")

    def trend_of(rows: np.ndarray) -> Trend | None:
        rows = rows[frame.ok[rows]]
        if len(rows) < min_samples:
            return None
        return linear_trend(frame.ts[rows], frame.dur[rows], min_rel)

    for m in np.unique(models):
        name = model_labels[m]
        rows = np.flatnonzero(models == m)
        trend = trend_of(rows)
        if trend is not None and trend.direction == "degrading":
            # Which browser types and which browsers degrade on their own (each -> its relative change).
            where = [{labels[k]: t.relative_change for k in np.unique(key_codes[rows])
                      if (t := trend_of(rows[key_codes[rows] == k])) is not None and t.direction == "degrading"}
                     for key_codes, labels in ((types, type_labels), (bids, bid_labels))]
            parts = [f"{what} " + ", ".join(f"{w} (+{r:.0%})" for w, r in found.items())
                     for what, found in zip(("browser types", "browsers"), where, strict=True) if found]
            recs[f"degrading_model:{name}"] = {
                "description": f"Operations on {name!r} are getting slower: the fitted duration rose "
                               f"{trend.relative_change:.0%} across the window's operations (t = {trend.t_stat:.1f})"
                               + (f"; degrading on {'; '.join(parts)}" if parts else ""),
                "recommendation": (f"Drain and replace browsers {', '.join(where[1])}" if where[1]
                                   else "Check the browsers serving it")
                                  + f" and route {name!r} to the best browser type by recent latency x success",
            }
        cands = _candidates(frame, (types, type_labels), rows, recent_entries, min_samples)
        ranked = sorted((c["expected_ms_per_success"], bt) for bt, c in cands.items() if c["eligible"])
        if len(ranked) >= 2 and ranked[0][0] <= (1 - min_adv) * ranked[1][0]:
            best = ranked[0][1]
            recs[f"browser_type:{name}"] = {
                "description": f"For {name!r}, {_describe(best, cands[best])}; "
                               + "; ".join(_describe(bt, cands[bt]) for _, bt in ranked[1:]),
                "recommendation": f"Prefer {best} for {name!r} (browser_preferences / placement)",
            }

    failed = ~frame.ok
    total = len(frame.ts)
    cats, cat_labels = frame.codes("failure_category")
    by_cat: dict[str, int] = {}
    for c in np.unique(cats[failed]):
        label = UNKNOWN if c < 0 else cat_labels[c]
        rows = np.flatnonzero(failed & (cats == c))
        by_cat[label] = by_cat.get(label, 0) + len(rows)
        if len(rows) < min_failures:
            continue
        affected_models = sorted({model_labels[i] for i in np.unique(models[rows])})
        affected_types = sorted({type_labels[i] for i in np.unique(types[rows])})
        recs[f"failure_pattern:{label}"] = {
            "description": f"{len(rows)} {label} failures ({len(rows) / total:.1%} of {total} operations) on "
                           f"models {', '.join(affected_models)} in browser types {', '.join(affected_types)}",
            "recommendation": _sentence(_CATEGORY_ADVICE.get(label, _CATEGORY_ADVICE["unknown"])),
        }
    advice = fault_tolerance_advice(level, total, by_cat, min_failures)
    if advice is not None:
        recs["fault_tolerance_level"] = {"description": advice[1], "recommendation": advice[2]}
    return {"recommendations": recs}


__all__ = [
    "COMPLETED",
    "FAILED",
    "LEVELS",
    "SCHEMA",
    "UNKNOWN",
    "HistoryInputError",
    "analyze_trends",
    "fault_tolerance_advice",
    "performance_recommendations",
    "recommend_browser",
]
