"""What every benchmark shares: where results go, how a sample is summarised, how JSON is written.

Results go to ``$WEBPOOL_RESULTS`` (default ``results/``, ignored by git), read when a benchmark
writes, so a caller (a test, the CLI) can redirect them without touching module state.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson


def results_dir() -> Path:
    """The folder benchmark results are written to (created on demand)."""
    return Path(os.environ.get("WEBPOOL_RESULTS", "results"))


def summary(values: Sequence[float]) -> dict[str, float] | None:
    """n, median, p95, mean, min and max of a sample; None for no samples (never a made-up zero)."""
    if len(values) == 0:
        return None
    a = np.asarray(values, dtype=float)
    return {"n": len(a), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}


def summary_ms(samples_ms: Sequence[float]) -> dict[str, float] | None:
    """``summary`` of a sample of milliseconds, its keys named with the unit (``median_ms``, ...)."""
    s = summary(samples_ms)
    return None if s is None else {"n": s["n"]} | {f"{k}_ms": v for k, v in s.items() if k != "n"}


def machine() -> dict[str, Any]:
    """The machine a run is on, with its 1-minute load average as the run begins (``load_before``); ``ended``
    adds it as the run ends. On a shared machine the load is what makes two runs' numbers comparable or not."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "load_before": round(os.getloadavg()[0], 2)}


def ended(machine: dict[str, Any]) -> dict[str, Any]:
    """``machine`` with the load average as the run ends (``load_after``)."""
    machine["load_after"] = round(os.getloadavg()[0], 2)
    return machine


def load_text(machine: dict[str, Any]) -> str:
    """", load 1.62→2.51": the 1-minute load average before and after a run, for a table's title ("" if the
    run did not record it)."""
    if "load_before" not in machine:
        return ""
    after = machine.get("load_after")
    return f", load {machine['load_before']:.2f}" + ("" if after is None else f"→{after:.2f}")


def utc_now() -> str:
    """The time a run began, as every benchmark's JSON records it (ISO 8601, UTC, whole seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def save_chart(fig: Any, path: Path) -> Path:
    """Write a benchmark's matplotlib ``Figure`` as a PNG at ``path`` (its folder made if missing), laid out to
    fit; every benchmark chart is written this way, at the same resolution."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_json(result: dict[str, Any], path: Path) -> Path:
    """Write ``result`` as indented JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    tmp.replace(path)
    return path


def write_results(name: str, quick: bool, result: dict[str, Any]) -> Path:
    """``<results>/<name>.json``, or ``<name>-quick.json`` for a quick (CI-sized) run."""
    return write_json(result, results_dir() / f"{name}{'-quick' if quick else ''}.json")
