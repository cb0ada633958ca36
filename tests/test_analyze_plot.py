"""The latency plot of `webpool analyze --png` reads at a glance however many browsers the log holds
(pure: a planted table; the plot of a real pool's log is checked in tests/test_cli.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg

from webpool.analyze import latency_figure


def _table(browsers: dict[str, int], ops: int = 10) -> pa.Table:
    rows = [(f"{kind}-{i}", kind) for kind, n in browsers.items() for i in range(n)]
    ts = [1000.0 + b * 0.1 + k for b in range(len(rows)) for k in range(ops)]
    duration = [float("nan") if (b + k) % 37 == 0 else 20.0 + b for b in range(len(rows)) for k in range(ops)]
    return pa.table({"ts": ts, "duration_ms": duration,
                     "browser_id": [r[0] for r in rows for _ in range(ops)],
                     "browser_type": [r[1] for r in rows for _ in range(ops)]})


def test_fifty_browsers_make_one_legend_entry_per_type_outside_the_axes():
    marks = {"failures": [1003.0], "recoveries": [(1003.0, 1004.5)]}
    fig = latency_figure(_table({"chromium": 40, "firefox": 10}), "latency", marks)
    [ax] = fig.axes
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "chromium (40 browsers)", "firefox (10 browsers)", "failed operation", "browser failed", "recovering"]
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1, "the legend covers the data"
    # Every browser is drawn (one line each), the failures on the time axis and the marks on top.
    assert len([line for line in ax.get_lines() if line.get_marker() == "."]) == 50
    failed = [line for line in ax.get_lines() if line.get_marker() == "x"]
    assert sum(len(line.get_xdata()) for line in failed) == int(np.isnan(_table({"chromium": 40, "firefox": 10})
                                                                     .column("duration_ms").to_numpy()).sum())
