"""`webpool analyze`: performance trends, the recommended browser type per model and advice, from the event
log, with a latency plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text

from webpool import render
from webpool.logview import log_copy
from webpool.render import entry_time, table

if TYPE_CHECKING:
    from events.schema import Recorded


_TREND_KEYS = ("entries_analyzed", "success_rate", "avg_duration_ms", "p50_duration_ms", "p95_duration_ms",
               "min_duration_ms", "max_duration_ms", "trend_direction", "trend_magnitude", "improvement_rate")


def _distinct(table, column: str) -> list[str]:
    import pyarrow.compute as pc

    return sorted(v for v in pc.unique(table.column(column)).to_pylist() if v is not None)


def analysis_document(tracker, location: str, model: str | None, browser_type: str | None,
                      window: float | None) -> dict:
    """Trends per model and per browser type, the recommended browser type per model and the
    recommendations, over the tracker's operations. The window ends at the newest operation in the log
    (not at the wall clock), so an old log reads the same as it did when it was written."""
    import pyarrow.compute as pc

    from events.errors import EventError

    table = tracker.table
    if table.num_rows == 0:
        raise EventError(f"no finished operations in the event log at {location}: nothing to analyse")
    now = float(pc.max(table.column("ts")).as_py())
    models, types = _distinct(table, "model"), _distinct(table, "browser_type")
    for flag, value, known in (("--model", model, models), ("--browser-type", browser_type, types)):
        if value is not None and value not in known:
            raise ValueError(f"{flag} {value!r}: no operations of it in the log; there: {', '.join(known)}")
    chosen_models = [model] if model else models
    chosen_types = [browser_type] if browser_type else types
    by_model = {m: tracker.analyze_performance_trends(model_name=m, browser_type=browser_type,
                                                      time_window_seconds=window, now=now) for m in chosen_models}
    by_type = {t: tracker.analyze_performance_trends(model_name=model, browser_type=t,
                                                     time_window_seconds=window, now=now) for t in chosen_types}
    recommended = {m: tracker.recommend_browser_type(m, time_window_seconds=window, now=now)
                   for m in chosen_models}
    recs = tracker.get_performance_recommendations(time_window_seconds=window, now=now)["recommendations"]
    return {"location": location, "operations": table.num_rows, "now": now, "window_seconds": window,
            "model": model, "browser_type": browser_type, "anomalies": dict(tracker.anomalies),
            "fault_tolerance_level": tracker.fault_tolerance_level,
            "by_model": by_model, "by_browser_type": by_type,
            "recommended_browser_type": {m: {"browser_type": r["browser_type"], "reason": r["reason"]}
                                         for m, r in recommended.items()},
            "recommendations": recs}


def plot_latency(table, path: Path, title: str, marks: dict[str, list] | None = None) -> int:
    """``latency_figure`` as a PNG at ``path``; returns the operations plotted."""
    fig = latency_figure(table, title, marks)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return table.num_rows


def latency_figure(table, title: str, marks: dict[str, list] | None = None):
    """Operation latency over time. One colour per browser type (a browser's operations joined by a thin
    line of its type's colour), so the plot reads the same with 2 browsers or 50; the legend sits outside
    the axes. Failed operations are red crosses on the time axis; ``marks`` adds the log's browser failures
    (red lines) and recoveries (green spans, start to end)."""
    import numpy as np
    import pyarrow.compute as pc
    from matplotlib.figure import Figure  # no pyplot: no global backend, renders with Agg
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    marks = marks or {}
    ts = table.column("ts").to_numpy()
    t0 = float(ts.min())
    fig = Figure(figsize=(10, 5), dpi=100)
    ax = fig.add_subplot()
    types = _distinct(table, "browser_type")
    colours = {t: f"C{i % 10}" for i, t in enumerate(types)}
    browsers_of: dict[str, int] = dict.fromkeys(types, 0)
    done = table.column("duration_ms").to_numpy(zero_copy_only=False).astype(float)
    for browser_id in _distinct(table, "browser_id"):
        rows = table.filter(pc.equal(table.column("browser_id"), browser_id))
        x = rows.column("ts").to_numpy() - t0
        y = rows.column("duration_ms").to_numpy(zero_copy_only=False).astype(float)
        ok = ~np.isnan(y)
        kind = rows.column("browser_type")[0].as_py()
        browsers_of[kind] += 1
        ax.plot(x[ok], y[ok], marker=".", markersize=4, linewidth=0.6, alpha=0.8, color=colours[kind])
        if (~ok).any():
            ax.plot(x[~ok], np.zeros(int((~ok).sum())), "x", color="red", markersize=8, clip_on=False, zorder=5)
    for start, end in marks.get("recoveries", []):
        ax.axvspan(start - t0, end - t0, color="green", alpha=0.15, linewidth=0)
    for when in marks.get("failures", []):
        ax.axvline(when - t0, color="red", linewidth=0.8, alpha=0.6)
    handles = [Line2D([], [], color=colours[t], marker=".", linewidth=0.6,
                      label=f"{t} ({browsers_of[t]} browser{'s' if browsers_of[t] != 1 else ''})") for t in types]
    if np.isnan(done).any():
        handles.append(Line2D([], [], color="red", marker="x", linewidth=0, label="failed operation"))
    if marks.get("failures"):
        handles.append(Line2D([], [], color="red", linewidth=0.8, label="browser failed"))
    if marks.get("recoveries"):
        handles.append(Patch(color="green", alpha=0.15, label="recovering"))
    finite = done[~np.isnan(done)]
    # Recoveries make a few requests 10-100x slower than the rest: a log scale keeps both readable.
    if finite.size and finite.max() > 20 * max(float(np.median(finite)), 1e-9):
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel(f"seconds since {entry_time(t0)}")
    ax.set_ylabel("duration (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def _trend_rows(analyses: dict[str, dict]) -> list[list]:
    rows = []
    for key, a in analyses.items():
        if "error" in a:
            rows.append([key, 0, *([None] * (len(_TREND_KEYS) - 1))])
            continue
        rows.append([key, a["entries_analyzed"], f"{a['success_rate']:.0%}",
                     *(a[k] for k in _TREND_KEYS[2:7]), a["trend_direction"],
                     f"{a['trend_magnitude']:.0%}", f"{a['improvement_rate']:+.0%}"])
    return rows


def _print_analysis(doc: dict) -> None:
    span = "the whole log" if doc["window_seconds"] is None else f"the last {doc['window_seconds']:g} s of the log"
    filters = [f"{k} {doc[k]}" for k in ("model", "browser_type") if doc[k]]
    render.console.print(Text(f"{doc['location']}: {doc['operations']} finished operations, analysed over {span} "
                       f"(ending {entry_time(doc['now'])})" + (f"; {', '.join(filters)}" if filters else "")
                       + f"; fault-tolerance level {doc['fault_tolerance_level'] or 'not in the log'}"))
    cols = ["ops", "success", "avg ms", "p50 ms", "p95 ms", "min ms", "max ms", "trend", "magnitude", "improvement"]
    render.console.print(table("trends per model", ["model", *cols], _trend_rows(doc["by_model"])))
    render.console.print(table("trends per browser type (browser/backend)", ["browser type", *cols],
                         _trend_rows(doc["by_browser_type"])))
    render.console.print(table("recommended browser type per model", ["model", "browser type", "why"],
                         [[m, r["browser_type"] or "-", r["reason"]]
                          for m, r in doc["recommended_browser_type"].items()]))
    render.console.print(table("recommendations", ["key", "description", "recommendation"],
                         [[k, r["description"], r["recommendation"]] for k, r in doc["recommendations"].items()],
                         empty="none: no degrading model, failure pattern or better browser type found"))
    sharding = doc["sharding"]
    if sharding["by_model"] or sharding["skipped"]:
        render.console.print(table("sharded generation (sharding/analyzer.py)",
                                   ["model", "runs by shard count", "recommended shards", "why"],
                                   [[m, ", ".join(f"{n}: {k}" for n, k in a["runs_by_shards"].items()),
                                     a["recommended_shards"] or "-", a["reason"]]
                                    for m, a in sharding["by_model"].items()]))
        if sharding["skipped"]:
            render.console.print(Text(f"generations the sharding analyzer could not use: {sharding['skipped']}"))
    if doc["anomalies"]:
        render.console.print(Text("history anomalies (e.g. operations whose start was compacted away): "
                                  f"{doc['anomalies']}"))


class _Generations:
    """The records the sharding analyzer reads (generations, their sessions, the browsers' health reports),
    picked on their way to the tracker: the rest of the log is not kept."""

    def __init__(self) -> None:
        self.records: list[Recorded] = []
        self._ops: set[str] = set()

    def seen(self, rec: Recorded) -> Recorded:
        from events import schema as ev

        e = rec.event
        if isinstance(e, ev.OperationStarted) and e.kind == "generate":
            self._ops.add(e.op_id)
            keep = True
        else:
            keep = (isinstance(e, ev.SessionOpened | ev.BrowserHealthReported)
                    or (isinstance(e, ev.OperationCompleted | ev.OperationFailed) and e.op_id in self._ops))
        if keep:
            self.records.append(rec)
        return rec


def sharding_document(records: list[Recorded]) -> dict:
    """Per model generated: the sharding analyzer's runs per shard count and its shard-count recommendation
    (sharding/analyzer.py), from the log's generations; and the generations it could not use, by reason."""
    from sharding.analyzer import ModelShardingAnalyzer

    analyzer = ModelShardingAnalyzer.from_events(records)
    by_model = {}
    for model in analyzer.models():
        trends = analyzer.analyze_performance_trends(model=model)
        advice = analyzer.recommend_shard_count(model=model)
        by_model[model] = {"runs": trends["runs"], "successful": trends["successful"],
                           "runs_by_shards": {str(n): e["runs"] for n, e in trends["by_shards"].items()},
                           "recommended_shards": advice["recommended_shards"], "reason": advice["reason"],
                           "estimates": {str(n): e for n, e in advice["estimates"].items()}}
    return {"by_model": by_model, "skipped": dict(analyzer.skipped)}


class _FaultMarks:
    """Browser failures and recoveries (start, end) picked from the records on their way to the tracker."""

    def __init__(self) -> None:
        self.failures: list[float] = []
        self.recoveries: list[tuple[float, float]] = []
        self._started: dict[str, float] = {}

    def seen(self, rec: Recorded) -> Recorded:
        kind = rec.kind
        if kind == "BrowserFailed":
            self.failures.append(rec.ts)
        elif kind == "RecoveryStarted":
            self._started.setdefault(rec.subject, rec.ts)
        elif kind == "RecoveryCompleted" and rec.subject in self._started:
            self.recoveries.append((self._started.pop(rec.subject), rec.ts))
        return rec

    def within(self, start: float, end: float) -> dict[str, list]:
        return {"failures": [t for t in self.failures if start <= t <= end],
                "recoveries": [(a, b) for a, b in self.recoveries if b >= start and a <= end]}


def cmd_analyze(args: argparse.Namespace) -> int:
    """Performance trends and recommendations from the event log (read from a private copy)."""
    import orjson
    import pyarrow.compute as pc

    from events.history import PerformanceHistoryTracker

    if args.window is not None and not args.window > 0:
        raise ValueError(f"--window must be > 0 seconds, got {args.window}")
    with log_copy(args) as copy:
        store = copy.open()
        tracker = PerformanceHistoryTracker(max_entries=args.max_entries)
        marks, generations = _FaultMarks(), _Generations()
        tracker.observe_many(generations.seen(marks.seen(rec)) for rec in store.read(store.first_seq))
        doc = analysis_document(tracker, copy.location, args.model, args.browser_type, args.window)
        doc["sharding"] = sharding_document(generations.records)
    if args.png:
        table = tracker.table
        mask = pc.greater_equal(table.column("ts"), doc["now"] - (args.window or float("inf")))
        for column, value in (("model", args.model), ("browser_type", args.browser_type)):
            if value:
                mask = pc.and_(mask, pc.equal(table.column(column), value))
        title = "latency per browser" + "".join(f", {v}" for v in (args.model, args.browser_type) if v)
        doc["png"] = str(args.png)
        shown = marks.within(doc["now"] - (args.window or float("inf")), doc["now"])
        doc["png_operations"] = plot_latency(table.filter(mask), Path(args.png), title, shown)
        doc["png_browser_failures"], doc["png_recoveries"] = len(shown["failures"]), len(shown["recoveries"])
    if args.json:
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _print_analysis(doc)
        if args.png:
            render.console.print(Text(f"wrote {args.png} ({doc['png_operations']} operations plotted)"))
    return 0

