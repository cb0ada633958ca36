"""Read the pool's metrics back from a Ray node's Prometheus export (``ray_`` prefixed, text format)."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from collections.abc import Callable

import ray

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Samples = list[tuple[str, dict[str, str], float]]


def report_interval_s() -> float:
    """Ray's metrics report interval for the processes this session's Ray started (tests/conftest.py sets
    it; Ray floors it at 1 s, and its default is 10 s)."""
    return max(float(os.environ.get("RAY_metrics_report_interval_ms", "10000")), 1000.0) / 1000.0


def export_port() -> int:
    return next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])


def scrape(port: int) -> Samples:
    """Every sample of the export: (name, labels, value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: Samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:                               # a "# HELP" or "# TYPE" line never matches
            name, labels, value = match.groups()
            out.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return out


def total(samples: Samples, name: str, **labels: str) -> float | None:
    """The sum of ``name``'s samples whose labels include ``labels`` (several worker processes may report
    one metric); None if there is none."""
    values = [v for n, ls, v in samples if n == name and all(ls.get(k) == want for k, want in labels.items())]
    return sum(values) if values else None


def wait_until(check: Callable[[Samples], list[str]], timeout: float = 90.0) -> Samples:
    """Scrape until ``check`` (the list of what is still missing) comes back empty; Ray's agent exports
    every few seconds. Fails with what was still missing."""
    port = export_port()
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        missing = check(samples)
        if not missing:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"not in the Prometheus export after {timeout:.0f} s: {missing}")
        time.sleep(0.5)
