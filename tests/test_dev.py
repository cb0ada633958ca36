"""The README's set-up promise: `./dev demo` and `./dev test` install what is missing first and are a no-op
when everything is there. The suite runs after `./dev test`'s own set-up (CI runs exactly that), so a second
set-up here must find everything: no step runs, nothing is rewritten, one line is printed."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What the set-up steps write when they run (dev: ensure_python's stamp, ensure_ort_web's marker).
WRITTEN_BY_STEPS = [REPO / ".venv" / ".webpool-deps", REPO / "node_modules/onnxruntime-web/dist/ort.min.mjs"]


def test_dev_setup_is_a_no_op_when_everything_is_there():
    before = {p: p.stat().st_mtime_ns for p in WRITTEN_BY_STEPS}
    run = subprocess.run(["./dev", "setup"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "set-up complete" in lines[0], run.stderr      # no "installing ..." step
    assert run.stdout == ""
    assert {p: p.stat().st_mtime_ns for p in WRITTEN_BY_STEPS} == before


def test_dev_setup_leaves_our_sources_compiled():
    """Every pool, browser and log is a new Python process importing our modules: the set-up compiles them
    (``dev``: compile_sources), so none compiles them again where PYTHONDONTWRITEBYTECODE is set."""
    sources = [p for d in ("actors", "events", "sharding", "webpool", "benchmarks") for p in (REPO / d).rglob("*.py")]
    assert len(sources) > 50
    stale = [str(p.relative_to(REPO)) for p in sources
             if not (pyc := Path(importlib.util.cache_from_source(str(p)))).exists()
             or pyc.stat().st_mtime_ns < p.stat().st_mtime_ns]
    assert not stale, stale
